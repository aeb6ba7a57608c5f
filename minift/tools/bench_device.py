"""``minift bench --device cuda``: minift on CuPy against PyTorch eager on the same GPU.

The same training step as the CPU bench (``minift.train.train_step``: forward, backward, gradient-norm
clipping at 1.0, the method's gradient hooks, AdamW), on a model moved to the GPU once
(``minift.device.to_device``), timed in turns with transformers' Llama and PEFT LoRA on the same
device. GPU work is asynchronous, so every timed step ends with a device synchronisation.

Both sides compute in plain float32: CuPy does not use TF32 unless ``CUPY_TF32=1`` and PyTorch does not
for matmuls unless ``torch.backends.cuda.matmul.allow_tf32`` is set; the GEMM that gives the MFU's
denominator is a float32 CuPy product measured in the same run.

Memory is what each caching allocator holds at its high-water mark after building the model and taking
one step: CuPy's default memory pool (``total_bytes``, which only grows until blocks are freed) and
PyTorch's ``max_memory_reserved``; PyTorch's ``max_memory_allocated`` (live tensors only) is reported too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from minift.backend import xp_for
from minift.config import ModelConfig
from minift.device import to_device
from minift.errors import ConfigError
from minift.model import trainable_parameters
from minift.optim import AdamW
from minift.tools.bench import (
    BENCH,
    LR,
    BenchSize,
    Key,
    batch,
    format_result,
    interleaved_step_seconds,
    prepare_model,
    ratio_of,
    torch_available,
    torch_step,
)
from minift.tools.measure import step_flops
from minift.train import train_step

DEVICES = ("cpu", "cuda")

# About ten times the bench configuration's FLOPs per step: twice the width (heads of 64 kept) and
# 2.5 times the tokens.
LARGE = replace(
    BENCH,
    config=ModelConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=2752, n_layers=8, n_heads=16, n_kv_heads=8
    ),
    seq=640,
)


@dataclass
class DeviceResult:
    """One record of a size's ``results`` in the JSON report."""

    impl: str  # "minift" or "torch"
    method: str
    step_seconds: float
    peak_bytes: int | None  # the allocator's high-water mark (see the module docstring); None on the CPU
    peak_allocated_bytes: int | None  # PyTorch only: live tensors at their peak
    trainable_params: int
    tokens_per_second: float
    mfu: float | None
    model_flops: int | None


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits until the device has finished the work queued so far (no-op on the CPU)."""
    if device == "cpu":
        return lambda: None
    xp = xp_for(device)
    return xp.cuda.Device().synchronize


def gemm_tflops(device: str, n: int = 4096, repeats: int = 10) -> float:
    """float32 n×n×n GEMM throughput on ``device`` (TFLOP/s): the median of ``repeats`` synchronised
    products after a warm-up."""
    xp, sync = xp_for(device), synchronizer(device)
    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    a @ b
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times)) / 1e12


def minift_step(method: str, size: BenchSize, seed: int, device: str) -> tuple[Callable[[], Any], Any]:
    """(one synchronised training step on ``device``, the model): the model is built on the host with
    the method applied at the bench's matched budget, then moved; AdamW's state is made on the device."""
    model, hooks = prepare_model(method, size, seed)
    to_device(model, device)
    opt = AdamW(trainable_parameters(model))
    micro_batches = [batch(size, seed)]
    sync = synchronizer(device)

    def step() -> None:
        train_step(model, opt, micro_batches, LR, grad_hooks=hooks)
        sync()

    return step, model


def torch_device_step(method: str, size: BenchSize, seed: int, device: str) -> tuple[Callable[[], Any], int]:
    """PyTorch's step from the CPU bench, on ``device``, synchronised."""
    step, n_params = torch_step(method, size, seed, device=device)
    if device == "cpu":
        return step, n_params
    import torch

    def synced() -> None:
        step()
        torch.cuda.synchronize()

    return synced, n_params


def allocator_peak(
    device: str, impl: str, build_and_step: Callable[[], Any]
) -> tuple[int | None, int | None]:
    """(allocator high-water mark, PyTorch's live-tensor peak) of building a model and taking one step,
    with the allocator emptied first. None on the CPU (the CPU bench traces memory with tracemalloc)."""
    if device == "cpu":
        build_and_step()
        return None, None
    if impl == "torch":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        build_and_step()
        torch.cuda.synchronize()
        peak = (int(torch.cuda.max_memory_reserved()), int(torch.cuda.max_memory_allocated()))
        torch.cuda.empty_cache()
        return peak
    pool = xp_for(device).get_default_memory_pool()
    pool.free_all_blocks()
    build_and_step()
    synchronizer(device)()
    peak_bytes = int(pool.total_bytes())
    pool.free_all_blocks()
    return peak_bytes, None


def measure_size(
    size: BenchSize,
    device: str,
    methods: tuple[str, ...],
    *,
    steps: int,
    warmup: int,
    seed: int,
    with_torch: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every method in minift and PyTorch's full FT and LoRA on ``size``, timed in turns on ``device``,
    then each one's memory on a fresh model."""
    peak_tflops = gemm_tflops(device)
    log(f"float32 GEMM on {device}: {peak_tflops:.1f} TFLOP/s")
    steps_by_key: dict[Key, Callable[[], Any]] = {}
    counts: dict[Key, tuple[int, int | None]] = {}
    for method in methods:
        step, model = minift_step(method, size, seed, device)
        steps_by_key["minift", method] = step
        n_params = sum(int(a.size) for a in trainable_parameters(model).values())
        counts["minift", method] = (n_params, step_flops(model, size.batch, size.seq).total)
    if with_torch:
        for method in ("full", "lora"):
            steps_by_key["torch", method], n_params = torch_device_step(method, size, seed, device)
            counts["torch", method] = (n_params, counts.get(("minift", method), (0, None))[1])
    seconds = interleaved_step_seconds(steps_by_key, steps, warmup)
    steps_by_key.clear()  # free every model before measuring memory one by one
    results = []
    for (impl, method), t in seconds.items():
        build = minift_step if impl == "minift" else torch_device_step
        one_step = lambda b=build, m=method: b(m, size, seed, device)[0]()  # noqa: E731
        peak, allocated = allocator_peak(device, impl, one_step)
        n_params, flops = counts[impl, method]
        mfu = None if flops is None else flops / t / (peak_tflops * 1e12)
        r = DeviceResult(impl, method, t, peak, allocated, n_params, size.batch * size.seq / t, mfu, flops)
        results.append(r)
        log(format_result(r))
    m, t_ = ("minift", "full"), ("torch", "full")
    ml, tl = ("minift", "lora"), ("torch", "lora")
    return {
        "model": size.config.to_dict(),
        "batch": size.batch,
        "seq": size.seq,
        "rank": size.rank,
        "gemm_tflops_in_run": peak_tflops,
        "results": [asdict(r) for r in results],
        "ratios": {
            "minift/torch_full_time": ratio_of(results, m, t_, "step_seconds"),
            "minift/torch_lora_time": ratio_of(results, ml, tl, "step_seconds"),
            "minift/torch_full_memory": ratio_of(results, m, t_, "peak_bytes"),
            "minift/torch_lora_memory": ratio_of(results, ml, tl, "peak_bytes"),
            "s2ft/full_time": ratio_of(results, ("minift", "s2ft"), m, "step_seconds"),
            "s2ft/lora_time": ratio_of(results, ("minift", "s2ft"), ml, "step_seconds"),
        },
    }


def print_device_report(report: dict[str, Any]) -> None:
    """One line per size and ratio: what ``minift bench --device`` prints."""
    for name, entry in report["sizes"].items():
        for ratio, value in entry["ratios"].items():
            print(f"{name:<6}{ratio:<26}{'—' if value is None else f'{value:.3f}'}")


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "numpy": np.__version__}
    if device == "cuda":
        cupy = xp_for(device)
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        info["gpu"] = props["name"].decode()
        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    if torch_available():
        import torch

        info["torch"] = torch.__version__
    return info


def run_device(
    device: str,
    sizes: dict[str, BenchSize],
    *,
    methods: tuple[str, ...],
    steps: int,
    warmup: int,
    seed: int = 0,
    with_torch: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The device benchmark as a JSON-ready report: ``{"machine", "sizes": {name: measure_size(...)}}``."""
    if device not in DEVICES:
        raise ConfigError(f"bench --device: unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    xp_for(device)  # a clear ConfigError when CuPy or the GPU is missing, before any work
    with_torch = with_torch and torch_available()
    report: dict[str, Any] = {"machine": device_info(device), "steps": steps, "warmup": warmup, "sizes": {}}
    for name, size in sizes.items():
        log(f"{name}: C={size.config.hidden_size} L={size.config.n_layers} B={size.batch} T={size.seq}")
        report["sizes"][name] = measure_size(
            size, device, methods, steps=steps, warmup=warmup, seed=seed, with_torch=with_torch, log=log
        )
    return report
