"""Measurements used by ``minift info`` and ``minift bench``: BLAS throughput, memory, FLOPs, speed."""

from __future__ import annotations

import dataclasses
import statistics
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from minift.data.datasets import Batch
from minift.model import (
    BlockCheckpoint,
    Model,
    ModelCache,
    attention_backward_needed,
    loss_and_grads,
    lowest_trainable_block,
    model_forward,
    named_modules,
    trainable_parameters,
)
from minift.optim import AdamW
from minift.train import train_step


def gemm_gflops(n: int = 1024, repeats: int = 5, dtype: type = np.float32) -> float:
    """Measured GEMM throughput (GFLOP/s) of this machine's BLAS in ``dtype`` (float32 by default): best
    of ``repeats`` n×n×n products, 2n³ FLOPs each. The ceiling against which model-FLOPs utilisation is
    reported."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------------------------------
# one training step: memory, FLOPs, speed


def model_bytes(model: Model) -> int:
    """Bytes of every array the model holds, frozen and trainable (views counted once, by their base)."""
    seen: dict[int, int] = {}
    for _, holder in named_modules(model):
        for value in vars(holder).values():
            if hasattr(value, "nbytes") and hasattr(value, "shape"):
                base = value if value.base is None else value.base
                seen[id(base)] = int(base.nbytes)
    return sum(seen.values())


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one training step, measured with ``tracemalloc`` (which traces NumPy's allocations;
    GPU memory is not traced).

    The weights and the optimizer state exist before the step and are NOT in ``step_peak_bytes``: that
    is the traced peak *above* them during forward + backward + clipping + AdamW (activations kept for
    the backward, gradients, temporaries). ``total_bytes`` adds the three.
    """

    weights_bytes: int  # every array of the model (model_bytes)
    optimizer_bytes: int  # AdamW moments: 2 × the trainable arrays
    step_peak_bytes: int  # traced peak during the step, above weights and optimizer state

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes + self.step_peak_bytes


def step_memory(
    model: Model,
    micro_batches: Sequence[Batch],
    *,
    optimizer: AdamW | None = None,
    lr: float = 0.0,
    activation_checkpointing: bool = False,
) -> MemoryReport:
    """Run one training step under ``tracemalloc`` and report its peak (see ``MemoryReport``).

    With the default ``lr = 0`` the weights do not change (AdamW's moments do); pass a fresh
    ``optimizer`` or none (one is made, before tracing starts).
    """
    optimizer = optimizer or AdamW(trainable_parameters(model))
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        train_step(model, optimizer, micro_batches, lr, activation_checkpointing=activation_checkpointing)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return MemoryReport(model_bytes(model), optimizer.state_bytes(), peak)


@dataclass(frozen=True)
class FlopReport:
    """Matmul FLOPs (2 per multiply-add) of one training step on B·T tokens; element-wise work (norms,
    softmax, activations) is not counted, the usual convention for model-FLOPs utilisation.

    ``by_kind`` splits them by slot class (``Dense``, a method's slot class, …), plus ``attention``
    (the score and value products) and ``lm_head``; each entry is (forward, backward).
    """

    forward: int
    backward: int
    by_kind: dict[str, tuple[int, int]]

    @property
    def total(self) -> int:
        return self.forward + self.backward


def step_flops(model: Model, batch_size: int, seq_len: int) -> FlopReport:
    """FLOPs of forward + backward for a (batch_size, seq_len) batch, following what the backward really
    computes: nothing below the lowest trainable block (partial backprop), no dx where nothing below
    needs it (nor the attention's backward, see ``minift.model.attention_backward_needed``), and
    each slot's own count (``slot.flops``). Products rerun to save memory (a ``minift.model.lean_mlp``
    rebuilding g and u, activation checkpointing) are not counted: these are model FLOPs, as in
    model-FLOPs utilisation (Chowdhery et al. 2022, "PaLM", App. B), not the hardware's.
    """
    c = model.config
    B, T, N = batch_size, seq_len, batch_size * seq_len
    H, D, C, V = c.n_heads, c.head_dim, c.hidden_size, c.vocab_size
    assert D is not None
    lowest = lowest_trainable_block(model)
    need_embed = bool(model.embed.parameters()) or (
        model.pos_embed is not None and bool(model.pos_embed.parameters())
    )
    by_kind: dict[str, list[int]] = {}

    def add(kind: str, fwd: int, bwd: int) -> None:
        entry = by_kind.setdefault(kind, [0, 0])
        entry[0] += fwd
        entry[1] += bwd

    for i, block in enumerate(model.blocks):
        backprop = i >= lowest
        need_dh = (i > lowest or need_embed or block.attn_norm.requires_grad) if backprop else False
        # the lowest block of S2FT on O and Down stops at O's weight gradient (no dx, no attention)
        attention = backprop and attention_backward_needed(block, i > lowest or need_embed)
        for name, slot in block.slots():
            need_dx = need_dh if name in ("q", "k", "v") else (attention if name == "o" else True)
            fwd, bwd = slot.flops(N, need_dx=need_dx)
            add(type(slot).__name__, fwd, bwd if backprop else 0)
        # scores q kᵀ and output p v: 2 products of B·H·T·T·D MACs; the backward has 4 (dv, dp, dq, dk)
        att = 2 * B * H * T * T * D
        add("attention", 2 * att, 4 * att if attention else 0)
    if model.lm_head is None:  # tied: x Eᵀ, its dx, and dE when the embedding is trained
        head = 2 * N * C * V
        add("lm_head", head, head * (1 + int(model.embed.requires_grad)))
    else:
        add("lm_head", *model.lm_head.flops(N, need_dx=True))
    kinds = {k: (v[0], v[1]) for k, v in by_kind.items()}
    return FlopReport(sum(v[0] for v in kinds.values()), sum(v[1] for v in kinds.values()), kinds)


@dataclass(frozen=True)
class StepTiming:
    """Wall time of training steps: the median over ``repeats`` after warm-up."""

    median_s: float
    tokens: int  # input tokens per step (padding excluded)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s


def time_step(
    model: Model,
    micro_batches: Sequence[Batch],
    *,
    optimizer: AdamW | None = None,
    lr: float = 0.0,
    repeats: int = 5,
    warmup: int = 1,
) -> StepTiming:
    """Time ``repeats`` training steps (forward + backward + clipping + AdamW) after ``warmup`` steps."""
    optimizer = optimizer or AdamW(trainable_parameters(model))
    times = []
    tokens = 0
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        tokens = train_step(model, optimizer, micro_batches, lr).tokens
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return StepTiming(statistics.median(times), tokens)


# ----------------------------------------------------------------------------------------------------
# where the bytes go


# What each entry of a block's cache is, for the breakdown (the kind of op that keeps it).
CACHE_KINDS = {
    "attn_norm": "norms", "mlp_norm": "norms", "final_norm": "norms", "q_norm": "norms", "k_norm": "norms",
    "post_attn_norm": "norms", "post_mlp_norm": "norms",
    "attn": "attention", "act": "mlp",
    "q": "slots", "k": "slots", "v": "slots", "o": "slots", "gate": "slots", "up": "slots", "down": "slots",
    "head": "slots", "x_final": "slots",  # the LM head's input, kept for its (tied) weight gradient
    "tokens": "other", "positions": "other", "rope": "other", "masks": "other",
}


def _arrays(obj: Any) -> Iterator[Any]:
    """Every array inside a cache: NamedTuples, tuples, lists, dicts and dataclasses are walked into."""
    if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _arrays(getattr(obj, f.name))
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _arrays(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _arrays(item)


def activation_bytes(cache: ModelCache) -> dict[str, int]:
    """Bytes the forward keeps for the backward, by kind: ``attention`` (q, k, v, row log-sum-exp),
    ``mlp`` (SwiGLU's gate/up pre-activations or GELU's input), ``norms`` (inputs and 1/rms), ``slots``
    (the linear slots' own caches: inputs of trained weights, adapter activations, S2FT column slices),
    ``checkpoints`` (the inputs of checkpointed blocks) and ``other`` (tokens, positions, RoPE tables,
    masks). A buffer shared by several entries (views, the input of q, k and v) is counted once, under
    the first kind that reaches it, block by block from the bottom."""
    out: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, obj: Any) -> None:
        for a in _arrays(obj):
            base = a if getattr(a, "base", None) is None else a.base
            if id(base) not in seen:
                seen.add(id(base))
                out[kind] = out.get(kind, 0) + int(base.nbytes)

    for entry in cache.blocks:
        if isinstance(entry, BlockCheckpoint):
            add("checkpoints", entry.x)
        elif entry is not None:
            for f in dataclasses.fields(entry):
                add(CACHE_KINDS[f.name], getattr(entry, f.name))
    for name in ("final_norm", "x_final", "head", "tokens", "positions", "rope", "masks"):
        add(CACHE_KINDS[name], getattr(cache, name))
    return out


@dataclass(frozen=True)
class MemoryBreakdown:
    """Where a training step's bytes go: the arrays that exist at once at the end of the forward
    (weights, optimizer state, the activations kept for the backward by kind) or of the backward (the
    gradients), and the measured ``tracemalloc`` peak of the whole step (``MemoryReport``), which adds
    the temporaries of the ops (logits and softmax, the backward's intermediate arrays)."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations: dict[str, int]  # kind → bytes (``activation_bytes``)
    step: MemoryReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights_bytes,
            "gradients": self.gradients_bytes,
            "optimizer": self.optimizer_bytes,
            "activations": dict(self.activations),
            "activations_total": sum(self.activations.values()),
            "step_peak": self.step.step_peak_bytes,
            "total": self.step.total_bytes,
        }


def memory_breakdown(
    model: Model, micro_batch: Batch, *, activation_checkpointing: bool = False
) -> MemoryBreakdown:
    """Measure ``MemoryBreakdown`` on one micro-batch: the kept activations from a training forward,
    the gradients from ``loss_and_grads``, then one traced training step (``step_memory``, lr 0)."""
    tokens, targets, mask = micro_batch
    _, cache = model_forward(model, tokens, attention_mask=mask, checkpoint=activation_checkpointing)
    assert cache is not None
    kept = activation_bytes(cache)
    del cache
    ckpt = activation_checkpointing
    _, grads = loss_and_grads(model, tokens, targets, attention_mask=mask, checkpoint=ckpt)
    grad_bytes = sum(int(g.nbytes) for g in grads.values())
    del grads
    step = step_memory(model, [micro_batch], activation_checkpointing=activation_checkpointing)
    return MemoryBreakdown(step.weights_bytes, grad_bytes, step.optimizer_bytes, kept, step)
