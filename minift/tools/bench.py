"""``minift bench``: training-step time, peak memory and model-FLOPs utilisation of every method.

One training step = forward + backward + AdamW update (``minift.optim``) on one batch of random tokens.
Each method is measured on a fresh copy of the same base model at matched trainable-parameter counts
(LoRA/PiSSA/SORSA at rank r on every projection; S2FT on O+Down with the same budget), and, when
PyTorch is installed, the same configuration in PyTorch eager mode on the CPU (full fine-tuning with
``torch.optim.AdamW``, and PEFT LoRA) in the same run, so that ratios compare like with like.

What is measured:
- ``step_seconds``: the median of ``steps`` timed steps after ``warmup`` untimed ones, the
  implementations and methods taking turns step by step so that a shared machine's changing load
  affects them alike.
- ``<method>_ckpt`` rows: full FT and S2FT again with activation checkpointing.
- ``peak_bytes`` (minift only): ``minift.tools.measure.step_memory(...).total_bytes`` on a fresh model: every
  weight of the model (frozen and trainable), the AdamW state, and the ``tracemalloc`` peak of one
  step above them (gradients, activations kept for the backward, temporaries). PyTorch's CPU
  allocator is not traced by ``tracemalloc``, so its records carry ``None``. ``memory_breakdown``
  splits it: weights, gradients, optimizer state and the kept activations by kind.
- ``mfu``: model FLOPs of the step (``minift.tools.measure.step_flops``: the matmuls the method's backward
  really does, partial backpropagation included; products rerun to save memory, by a lean MLP or by
  checkpointing, are not) / step time / float32 GEMM throughput. The GEMM
  takes its turn among the steps, so it is measured under the same load (``blas_gflops_in_run``);
  ``machine.blas_gflops`` is ``minift.tools.measure.gemm_gflops`` before the run. The optimizer's
  element-wise work is not counted.
"""

from __future__ import annotations

import copy
import importlib
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from minift.config import ModelConfig
from minift.data.datasets import Batch
from minift.io.hf_names import module_name
from minift.methods.registry import MethodSpec, apply_method, get_method, method_names
from minift.model import Model, init_model, set_trainable, trainable_parameters
from minift.tools.measure import gemm_gflops, memory_breakdown, step_flops
from minift.train import GradHook

CHECKPOINTED = ("full", "s2ft")  # also measured with activation checkpointing, as "<method>_ckpt"
CKPT = "_ckpt"
Key = tuple[str, str]  # (impl, method)
LR = 1e-4  # any small learning rate: the step's cost does not depend on it
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # LoRA/PiSSA/SORSA adapt every projection


@dataclass(frozen=True)
class BenchSize:
    """The model and batch of one measurement; ``rank`` sets the matched trainable budget."""

    config: ModelConfig
    batch: int  # B
    seq: int  # T
    rank: int  # LoRA/PiSSA/SORSA rank r; S2FT gets the same parameter count


BENCH = BenchSize(
    ModelConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1376, n_layers=8, n_heads=8, n_kv_heads=4
    ),
    batch=4,
    seq=256,
    rank=4,  # ≈ 1.1% of the 27M parameters trainable
)
QUICK = BenchSize(
    ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160, n_layers=2, n_heads=4, n_kv_heads=2),
    batch=2,
    seq=16,
    rank=2,
)


DEFINITIONS = {
    "step": "forward + backward + gradient-norm clipping at 1.0 + the method's gradient hooks + AdamW "
    "(minift.train.train_step; PyTorch: loss.backward, clip_grad_norm_, torch.optim.AdamW)",
    "step_seconds": "median over the timed steps, implementations and methods taking turns step by step",
    "peak_bytes": "weights + AdamW state + tracemalloc peak of one step above them (minift.tools.measure."
    "step_memory); BLAS work buffers are not traced, nor is PyTorch's allocator (hence null)",
    "<method>_ckpt": "the method with activation checkpointing (TrainConfig(activation_checkpointing=True)): "
    "each block keeps only its input and reruns its forward in the backward",
    "memory_breakdown": "per minift row, bytes of weights, gradients, AdamW state, the activations the "
    "forward keeps for the backward by kind (minift.tools.measure.activation_bytes), the traced step "
    "peak and the total (= peak_bytes)",
    "mfu": "model FLOPs per step (minift.tools.measure.step_flops: the matmuls of forward and partial "
    "backward; products rerun to save memory are not counted) / step_seconds / blas_gflops_in_run (the "
    "median of a 1024³ GEMM's turns among the steps)",
}


@dataclass
class Result:
    """One record of ``results`` in the JSON report."""

    impl: str  # "minift" or "torch"
    method: str
    step_seconds: float
    peak_bytes: int | None
    trainable_params: int
    tokens_per_second: float
    mfu: float | None  # None when the method's FLOPs are unknown (PyTorch LoRA without minift's LoRA)
    model_flops: int | None


# ----------------------------------------------------------------------------------------------------
# timing and memory


def interleaved_step_seconds(
    steps: dict[Key, Callable[[], Any]], rounds: int, warmup: int
) -> dict[Key, float]:
    """Median wall time of every step over ``rounds`` rounds, after ``warmup`` untimed ones.

    Each round runs every step once, so a change in the machine's load (other processes on a shared
    machine) slows all of them alike and the ratios between them stay meaningful.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[Key, list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(ts) for key, ts in times.items()}


# ----------------------------------------------------------------------------------------------------
# minift


def batch(size: BenchSize, seed: int) -> Batch:
    """Random tokens and targets, no padding: every position counts."""
    rng = np.random.default_rng(seed)
    shape = (size.batch, size.seq)
    V = size.config.vocab_size
    return Batch(rng.integers(0, V, shape), rng.integers(0, V, shape), np.ones(shape, dtype=np.int64))


def prepare_model(method: str, size: BenchSize, seed: int) -> tuple[Model, list[GradHook]]:
    """A fresh base model with ``method`` applied at the matched budget, and its gradient hooks.

    LoRA, PiSSA and SORSA adapt every projection at rank r; S2FT trains O heads and Down channels with
    the parameter count of that LoRA (``match_lora_budget``: half to heads, the rest to channels).
    The alpha of LoRA-like methods is 2r, as in the PyTorch reference (it does not change a step's cost).
    """
    rng = np.random.default_rng(seed)
    model = init_model(size.config, rng)
    spec = MethodSpec(method, rank=size.rank, alpha=2.0 * size.rank if method == "lora" else None,
                      targets=TARGETS)
    return model, apply_method(model, spec, rng)


def split_checkpointed(row: str) -> tuple[str, bool]:
    """A result row's method and whether it runs with activation checkpointing (``s2ft_ckpt``)."""
    return (row.removesuffix(CKPT), True) if row.endswith(CKPT) else (row, False)


def minift_step(method: str, size: BenchSize, seed: int) -> tuple[Callable[[], Any], Model]:
    """Build the model and optimizer; return (one training step, the model). ``method`` may carry the
    ``_ckpt`` suffix: the same method with activation checkpointing.

    The step is the trainer's own ``train_step``: forward, backward, gradient-norm clipping at 1.0, the
    method's gradient hooks (SORSA's regularizer) and the AdamW update.
    """
    from minift.optim import AdamW
    from minift.train import train_step

    method, ckpt = split_checkpointed(method)
    model, hooks = prepare_model(method, size, seed)
    micro_batches = [batch(size, seed)]
    opt = AdamW(trainable_parameters(model))
    return (
        lambda: train_step(model, opt, micro_batches, LR, grad_hooks=hooks, activation_checkpointing=ckpt)
    ), model


def _result(
    impl: str,
    method: str,
    seconds: float,
    peak: int | None,
    n_params: int,
    flops: int | None,
    size: BenchSize,
    blas_gflops: float,
) -> Result:
    return Result(
        impl=impl,
        method=method,
        step_seconds=seconds,
        peak_bytes=peak,
        trainable_params=n_params,
        tokens_per_second=size.batch * size.seq / seconds,
        mfu=None if flops is None else flops / seconds / (blas_gflops * 1e9),
        model_flops=flops,
    )


# ----------------------------------------------------------------------------------------------------
# PyTorch


def torch_available() -> bool:
    try:
        importlib.import_module("torch")
        importlib.import_module("transformers")
    except ImportError:
        return False
    return True


def torch_step(
    method: str, size: BenchSize, seed: int, device: str = "cpu"
) -> tuple[Callable[[], float], int]:
    """The same model in transformers (eager PyTorch, float32, on ``device``): (one training step,
    trainable count).

    Full fine-tuning uses ``torch.optim.AdamW`` on every parameter; ``lora`` wraps the model with PEFT
    LoRA at the same rank and targets as minift's. The step mirrors minift's ``train_step``: forward,
    backward, ``clip_grad_norm_`` at 1.0, AdamW (no weight decay, as minift's default).
    """
    import torch
    import transformers

    c = size.config
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    model: Any = transformers.LlamaForCausalLM(cfg).float()
    if method == "lora":
        import peft

        lora = peft.LoraConfig(
            r=size.rank,
            lora_alpha=2 * size.rank,
            lora_dropout=0.0,
            target_modules=[module_name(t) for t in TARGETS],
        )
        with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, lora)
    elif method != "full":
        raise ValueError(f"no PyTorch reference for {method!r}")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)  # as minift's AdamW
    b = batch(size, seed)
    tokens, targets, mask = (torch.from_numpy(a).to(device) for a in b)

    def step() -> float:
        logits = model(input_ids=tokens, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, c.vocab_size), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------------------
# the report


def ratio_of(results: list[Any], a: Key, b: Key, field: str) -> float | None:
    """``field`` of result ``a`` over that of ``b``, results keyed by (impl, method); None where a side
    or its value is missing."""
    by_key = {(r.impl, r.method): r for r in results}
    if a not in by_key or b not in by_key:
        return None
    num, den = getattr(by_key[a], field), getattr(by_key[b], field)
    return None if num is None or den is None else num / den


def ratios(results: list[Result]) -> dict[str, float | None]:
    """The headline ratios; None where a side is missing (a method not installed, no PyTorch)."""
    m = "minift"
    return {
        "s2ft/full_time": ratio_of(results, (m, "s2ft"), (m, "full"), "step_seconds"),
        "s2ft/full_memory": ratio_of(results, (m, "s2ft"), (m, "full"), "peak_bytes"),
        "s2ft/lora_time": ratio_of(results, (m, "s2ft"), (m, "lora"), "step_seconds"),
        "s2ft/lora_memory": ratio_of(results, (m, "s2ft"), (m, "lora"), "peak_bytes"),
        "pissa/lora_time": ratio_of(results, (m, "pissa"), (m, "lora"), "step_seconds"),
        "sorsa/lora_time": ratio_of(results, (m, "sorsa"), (m, "lora"), "step_seconds"),
        "lora/full_time": ratio_of(results, (m, "lora"), (m, "full"), "step_seconds"),
        "lora/full_memory": ratio_of(results, (m, "lora"), (m, "full"), "peak_bytes"),
        "minift/torch_full_time": ratio_of(results, (m, "full"), ("torch", "full"), "step_seconds"),
        "minift/torch_lora_time": ratio_of(results, (m, "lora"), ("torch", "lora"), "step_seconds"),
        # activation checkpointing, against the same method without it (full: without checkpointing)
        "s2ft_ckpt/full_memory": ratio_of(results, (m, "s2ft" + CKPT), (m, "full"), "peak_bytes"),
        "s2ft_ckpt/s2ft_time": ratio_of(results, (m, "s2ft" + CKPT), (m, "s2ft"), "step_seconds"),
        "full_ckpt/full_memory": ratio_of(results, (m, "full" + CKPT), (m, "full"), "peak_bytes"),
        "full_ckpt/full_time": ratio_of(results, (m, "full" + CKPT), (m, "full"), "step_seconds"),
    }


GEMM_N, GEMM_REPEATS = 1024, 16  # one round's GEMM turn: 16 products of 1024³, ~0.1–0.3 s
GEMM_FLOPS = 2 * GEMM_N**3 * GEMM_REPEATS


def _gemm_round() -> Callable[[], Any]:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_N, GEMM_N)).astype(np.float32) for _ in range(2))
    return lambda: [a @ b for _ in range(GEMM_REPEATS)]


def _minift_entry(method: str, size: BenchSize, seed: int) -> tuple[Callable[[], Any], tuple[int, int]]:
    """(the step, (trainable parameters, model FLOPs)); the step alone keeps the model alive."""
    step, model = minift_step(method, size, seed)
    n_params = sum(int(a.size) for a in trainable_parameters(model).values())
    return step, (n_params, step_flops(model, size.batch, size.seq).total)


def measure(
    size: BenchSize,
    methods: tuple[str, ...],
    *,
    steps: int,
    warmup: int,
    seed: int,
    with_torch: bool,
    checkpointed: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> tuple[list[Result], float, dict[str, Any]]:
    """Every method in minift (those in ``checkpointed`` also with activation checkpointing) and
    PyTorch's full FT and LoRA on ``size``: timed side by side (interleaved), then minift's memory
    method by method on a fresh model. Returns (results, GEMM GFLOP/s in the run, memory breakdown of
    every minift row: ``minift.tools.measure.memory_breakdown``).

    A GEMM takes its turn in every round too, and its median throughput (returned, GFLOP/s) is the
    MFU's denominator: measured under the same load as the steps, not only on an idle machine.
    """
    step_fns: dict[Key, Callable[[], Any]] = {("blas", "gemm"): _gemm_round()}
    counts: dict[Key, tuple[int, int | None]] = {}  # (trainable parameters, model FLOPs)
    rows = list(methods) + [m + CKPT for m in checkpointed if m in methods]
    for method in rows:
        step_fns["minift", method], counts["minift", method] = _minift_entry(method, size, seed)
    if with_torch:
        for method in ("full", "lora"):
            step_fns["torch", method], n_params = torch_step(method, size, seed)
            # PyTorch does the same matmuls: its FLOPs are minift's for the method (unknown without it)
            counts["torch", method] = (n_params, counts.get(("minift", method), (0, None))[1])
    seconds = interleaved_step_seconds(step_fns, steps, warmup)
    step_fns.clear()  # free every model before tracing memory
    blas_gflops = GEMM_FLOPS / seconds.pop(("blas", "gemm")) / 1e9
    log(f"float32 GEMM throughput during the run: {blas_gflops:.1f} GFLOP/s")
    results, breakdown = [], {}
    for (impl, method), t in seconds.items():
        peak = None
        if impl == "minift":
            base, ckpt = split_checkpointed(method)
            model, _ = prepare_model(base, size, seed)
            report = memory_breakdown(model, batch(size, seed), activation_checkpointing=ckpt)
            peak, breakdown[method] = report.step.total_bytes, report.to_dict()
            del model
        n_params, flops = counts[impl, method]
        results.append(_result(impl, method, t, peak, n_params, flops, size, blas_gflops))
        log(format_result(results[-1]))
    return results, blas_gflops, breakdown


def format_breakdown(method: str, parts: dict[str, Any]) -> str:
    """One line of where a method's bytes go, in MiB."""
    mib = 2**-20
    by_size = sorted(parts["activations"].items(), key=lambda kv: -kv[1])
    kinds = " ".join(f"{k} {v * mib:.1f}" for k, v in by_size)
    return (
        f"memory {method:<10} weights {parts['weights'] * mib:.1f}  gradients {parts['gradients'] * mib:.1f}"
        f"  optimizer {parts['optimizer'] * mib:.1f}  kept activations {parts['activations_total'] * mib:.1f}"
        f" ({kinds})  step peak {parts['step_peak'] * mib:.1f}  total {parts['total'] * mib:.1f} MiB"
    )


# ----------------------------------------------------------------------------------------------------
# serving: adapter switch and batched multi-adapter inference, S2FT against LoRA


def serving_adapters(size: BenchSize, seed: int) -> tuple[Model, list[Any], list[Any]]:
    """The frozen base and two random adapters of each kind at the matched budget: S2FT adapters
    extracted from perturbed S2FT models (``match_lora_budget``, original coordinates), and LoRA
    factors of rank r on every projection."""
    from minift.methods.s2ft import apply_s2ft, extract_adapter, match_lora_budget
    from minift.serving import LoraFactors

    rng = np.random.default_rng(seed)
    base = init_model(size.config, rng)
    s2_config = match_lora_budget(size.config, size.rank, lora_targets=TARGETS)
    s2ft, lora = [], []
    for k in range(2):
        tuned = apply_s2ft(copy.deepcopy(base), s2_config, rng=np.random.default_rng(seed + k))
        for p in trainable_parameters(tuned).values():
            p += rng.normal(0.0, 0.01, p.shape).astype(p.dtype)
        s2ft.append(extract_adapter(tuned))
        lora.append({
            f"blocks.{i}.{name}": LoraFactors(
                rng.normal(0.0, 0.01, (size.rank, slot.in_features)).astype(np.float32),
                rng.normal(0.0, 0.01, (slot.out_features, size.rank)).astype(np.float32),
                1.0,
            )
            for i, block in enumerate(base.blocks)
            for name, slot in block.slots()
        })
    return base, s2ft, lora


def _switcher(model: Model, adapters: list[Any]) -> Callable[[], None]:
    """A step that switches ``model`` (which holds adapters[0] merged) to the other adapter, in turn."""
    from minift.serving import merge_adapter, switch_adapter

    merge_adapter(model, adapters[0])
    current = [0]

    def step() -> None:
        switch_adapter(model, adapters[current[0]], adapters[1 - current[0]])
        current[0] = 1 - current[0]

    return step


def measure_serving(size: BenchSize, *, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    """Seconds of an adapter switch (unmerge one adapter, merge another, whole model) and of one
    batched forward in which the B requests alternate between two adapters, S2FT and LoRA timed in
    turns, with the plain base forward for reference."""
    from minift.model import model_forward
    from minift.serving import batched_forward

    base, s2ft, lora = serving_adapters(size, seed)
    tokens = batch(size, seed).tokens
    assignment = [b % 2 for b in range(size.batch)]
    seconds = interleaved_step_seconds(
        {
            ("switch", "s2ft"): _switcher(copy.deepcopy(base), s2ft),
            ("switch", "lora"): _switcher(copy.deepcopy(base), lora),
            ("serve", "base"): lambda: model_forward(base, tokens, train=False),
            ("serve", "s2ft"): lambda: batched_forward(base, tokens, s2ft, assignment),
            ("serve", "lora"): lambda: batched_forward(base, tokens, lora, assignment),
        },
        steps,
        warmup,
    )
    return {
        "batch": size.batch,
        "seq": size.seq,
        "assignment": assignment,
        "seconds": {f"{what}/{method}": t for (what, method), t in seconds.items()},
        "ratios": {
            "s2ft/lora_switch_time": seconds["switch", "s2ft"] / seconds["switch", "lora"],
            "s2ft/lora_serving_time": seconds["serve", "s2ft"] / seconds["serve", "lora"],
            "s2ft/base_serving_time": seconds["serve", "s2ft"] / seconds["serve", "base"],
        },
    }


def format_result(r: Any) -> str:
    """One result as a printed line (a CPU ``Result`` or a GPU ``DeviceResult``)."""
    peak = "—" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:8.1f} MiB"
    mfu = "—" if r.mfu is None else f"{r.mfu:6.1%}"
    return (
        f"{r.impl:<7}{r.method:<10}{r.step_seconds * 1e3:9.1f} ms/step {r.tokens_per_second:9.0f} tok/s"
        f"  MFU {mfu:>6}  peak {peak:>12}  trainable {r.trainable_params:,}"
    )


def scaling_sizes(base: BenchSize) -> list[tuple[str, BenchSize]]:
    """The base size varied along one axis at a time: width C (heads of 64, F ≈ 2.69 C) halved and
    ×1.5, and length T halved and doubled. The base point itself is the report's ``results``."""
    c = base.config
    out = []
    for C in (c.hidden_size // 2, c.hidden_size * 3 // 2):
        H = max(1, C // 64)
        cfg = c.replace(
            hidden_size=C,
            intermediate_size=C * c.intermediate_size // c.hidden_size,
            n_heads=H,
            n_kv_heads=max(1, H // 2),
            head_dim=C // H,
        )
        out.append(("width", replace(base, config=cfg)))
    for T in (base.seq // 2, base.seq * 2):
        out.append(("seq", replace(base, seq=T)))
    return out


def machine_info(blas_gflops: float) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "blas_gflops": blas_gflops,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        # the BLAS and PyTorch thread counts and the OpenBLAS kernel follow these when they are set
        "env": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE")
        },
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ]
    except ImportError:
        pass
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def run(
    size: BenchSize,
    *,
    steps: int,
    warmup: int,
    seed: int = 0,
    with_torch: bool = True,
    scaling: bool = False,
    methods: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole benchmark as the JSON-ready report (machine, config, results, ratios[, scaling]);
    ``methods`` default to every registered method."""
    present = method_names() if methods is None else tuple(get_method(m).name for m in methods)
    with_torch = with_torch and torch_available()
    blas = gemm_gflops()
    log(f"float32 GEMM throughput: {blas:.1f} GFLOP/s (best of 5, before the run)")
    kw = dict(steps=steps, warmup=warmup, seed=seed, with_torch=with_torch, log=log)
    results, blas_in_run, breakdown = measure(size, present, checkpointed=CHECKPOINTED, **kw)
    for method, parts in breakdown.items():
        log(format_breakdown(method, parts))
    n_params = sum(
        int(a.size)
        for a in trainable_parameters(
            set_trainable(init_model(size.config, np.random.default_rng(seed)))
        ).values()
    )
    report: dict[str, Any] = {
        "machine": machine_info(blas),
        "config": {
            "model": size.config.to_dict(),
            "params": n_params,
            "batch": size.batch,
            "seq": size.seq,
            "rank": size.rank,
            "lora_targets": list(TARGETS),
            "steps": steps,
            "warmup": warmup,
            "seed": seed,
        },
        "blas_gflops_in_run": blas_in_run,
        "results": [asdict(r) for r in results],
        "ratios": ratios(results),
        "memory_breakdown": breakdown,
        "definitions": DEFINITIONS,
    }
    if "s2ft" in present and "lora" in present:
        report["serving"] = measure_serving(size, steps=steps, warmup=warmup, seed=seed)
        for what, t in report["serving"]["seconds"].items():
            log(f"serving {what:<12}{t * 1e3:9.1f} ms")
    if scaling:
        report["scaling"] = []
        for axis, s in scaling_sizes(size):
            log(f"scaling {axis}: C={s.config.hidden_size} T={s.seq}")
            rs, blas_in_run, _ = measure(s, tuple(m for m in present if m in ("full", "lora", "s2ft")), **kw)
            report["scaling"].append(
                {
                    "axis": axis,
                    "hidden_size": s.config.hidden_size,
                    "seq": s.seq,
                    "blas_gflops_in_run": blas_in_run,
                    "results": [asdict(r) for r in rs],
                    "ratios": ratios(rs),
                }
            )
    return report


def print_report(report: dict[str, Any]) -> None:
    """One line per ratio (training, then serving): what ``minift bench`` prints."""
    for name, value in {**report["ratios"], **report.get("serving", {}).get("ratios", {})}.items():
        print(f"{name:<24}{'—' if value is None else f'{value:.3f}'}")
