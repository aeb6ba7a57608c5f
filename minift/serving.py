"""Serving fine-tuned adapters on one base model: merge, unmerge, switch, fuse, and batches in which
every request uses its own adapter (paper Sec. 6.2).

Two adapter kinds, on weights W (O, I) of the base model in its *original* layout:

- S2FT (``S2FTAdapter``): per matrix, indices S and a dense block Δ; W[:, S] += Δ (columns) or
  W[S, :] += Δ (rows). Merging or switching is a scatter-add of S·O (or S·I) values.
- LoRA (``LoraFactors`` per slot key, the baseline; ``lora_factors`` reads them off a LoRA model):
  W += s·B A, a rank-R matmul over all O·I entries.

Batched serving (S-LoRA style) keeps W shared and adds each request group's update on the fly:

    S2FT columns:  y_r = x_r Wᵀ + x_r[:, S] Δᵀ              gather + one small matmul
    S2FT rows:     y_r = x_r Wᵀ;  y_r[:, S] += x_r Δᵀ        one small matmul + scatter-add
    LoRA:          y_r = x_r Wᵀ + s·(x_r Aᵀ) Bᵀ               two thin matmuls

where x_r holds the tokens of the requests that share an adapter. Adapters are keyed by slot,
``blocks.<i>.<slot>``; one that does not fit the model raises CheckpointError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from minift.backend import Array, get_xp
from minift.errors import CheckpointError, ShapeError
from minift.methods import carries
from minift.methods.lora import LowRankLinear, low_rank_slots
from minift.methods.s2ft.adapter import AdapterBlock, S2FTAdapter, check_block, model_signature, parse_key
from minift.model import KVCache, Model, model_forward


class LoraFactors(NamedTuple):
    """ΔW = scaling · B A of one slot (A and B named as in the LoRA paper and the model's slots)."""

    A: Array  # (R, I)
    B: Array  # (O, R)
    scaling: float


LoraAdapter = Mapping[str, LoraFactors]
Adapter = S2FTAdapter | LoraAdapter
Entry = AdapterBlock | LoraFactors


def lora_factors(model: Model) -> dict[str, LoraFactors]:
    """The LoRA adapter of a model trained with ``minift.methods.lora`` (unmerged LowRankLinear slots
    on the original weights), as factors for serving on the base model."""
    out = {}
    for path, slot in low_rank_slots(model):
        assert isinstance(slot, LowRankLinear)
        if slot.merged or slot.S is not None or slot.A0 is not None:
            raise CheckpointError(
                f"{path}: only an unmerged plain LoRA slot is a delta on the original weight"
            )
        out[path] = LoraFactors(slot.A, slot.B, slot.scaling)
    return out


def _entries(adapter: Adapter) -> Mapping[str, Entry]:
    return adapter.blocks if isinstance(adapter, S2FTAdapter) else adapter


def _weight(model: Model, key: str, origin: str = "") -> Array:
    """The weight of slot ``blocks.<i>.<name>``, or CheckpointError."""
    parsed = parse_key(key)
    ok = parsed is not None and parsed[0] < len(model.blocks)
    slot = getattr(model.blocks[parsed[0]], parsed[1], None) if ok and parsed else None
    if slot is None or not hasattr(slot, "weight"):
        raise CheckpointError(
            f"{origin}adapter key {key!r} names no dense slot of this {len(model.blocks)}-layer model"
        )
    return slot.weight


def _origin(adapter: Adapter) -> str:
    """``"<folder>: "`` for an adapter loaded from disk, so errors name the file; else ""."""
    return f"{adapter.source}: " if isinstance(adapter, S2FTAdapter) and adapter.source else ""


def check_adapter(model: Model, adapter: Adapter) -> None:
    """Raise CheckpointError unless every entry fits the model (shapes, indices, signature) and the
    model is in its original layout."""
    if carries(model, "s2ft"):
        raise CheckpointError(
            "the model is co-permuted for S2FT training; unpermute it before serving adapters"
        )
    origin = _origin(adapter)
    if (
        isinstance(adapter, S2FTAdapter)
        and adapter.signature
        and adapter.signature != model_signature(model.config)
    ):
        raise CheckpointError(
            f"{origin}the S2FT adapter was made for a model with {adapter.signature}, "
            f"not {model_signature(model.config)}"
        )
    for key, e in _entries(adapter).items():
        w = _weight(model, key, origin)
        if isinstance(e, AdapterBlock):
            if tuple(e.shape) != tuple(w.shape):
                raise CheckpointError(
                    f"{origin}adapter key {key!r}: made for a weight of shape {e.shape}, the model's "
                    f"is {w.shape}"
                )
            check_block(e, f"{origin}adapter key {key!r}")
        elif e.A.shape[1] != w.shape[1] or e.B.shape[0] != w.shape[0] or e.A.shape[0] != e.B.shape[1]:
            raise CheckpointError(
                f"LoRA adapter key {key!r}: A {e.A.shape} and B {e.B.shape} "
                f"do not fit a weight of shape {w.shape}"
            )


def _add(w: Array, e: Entry, scale: float) -> None:
    """W += scale · ΔW of one entry, in place."""
    xp = get_xp(w)
    if isinstance(e, LoraFactors):
        w += (scale * e.scaling) * (xp.asarray(e.B, dtype=w.dtype) @ xp.asarray(e.A, dtype=w.dtype))
        return
    delta = scale * xp.asarray(e.delta, dtype=w.dtype)
    idx = xp.asarray(e.indices)
    # A scatter-add; the indices of one block are distinct (``check_block``), so the buffered fancy
    # ``+=`` is exact and much faster than an unbuffered ``add.at``.
    if e.axis == "rows":
        w[idx] += delta
    else:
        w[:, idx] += delta


def merge_adapter(model: Model, adapter: Adapter, scale: float = 1.0) -> None:
    """W ← W + scale·ΔW for every entry, in place (S2FT: one scatter-add of the block per matrix)."""
    check_adapter(model, adapter)
    for key, e in _entries(adapter).items():
        _add(_weight(model, key), e, scale)


def unmerge_adapter(model: Model, adapter: Adapter, scale: float = 1.0) -> None:
    """W ← W − scale·ΔW. Entries outside the blocks are untouched; inside, (W + Δ) − Δ returns W up
    to one rounding of each sum (use ``snapshot``/``restore`` where bitwise identity matters)."""
    merge_adapter(model, adapter, -scale)


def switch_adapter(model: Model, old: Adapter, new: Adapter) -> None:
    """Unmerge ``old`` and merge ``new``: two scatter-adds per matrix for S2FT adapters."""
    check_adapter(model, new)
    unmerge_adapter(model, old)
    merge_adapter(model, new)


def snapshot(model: Model, adapter: S2FTAdapter) -> dict[str, Array]:
    """Copies of the rows/columns an S2FT adapter will touch (block-sized), for ``restore``."""
    check_adapter(model, adapter)
    out = {}
    for key, e in adapter.blocks.items():
        w = _weight(model, key)
        xp = get_xp(w)
        out[key] = xp.take(w, xp.asarray(e.indices), axis=0 if e.axis == "rows" else 1)
    return out


def restore(model: Model, adapter: S2FTAdapter, saved: Mapping[str, Array]) -> None:
    """Write back the blocks saved by ``snapshot``: undoes a merge bitwise."""
    for key, e in adapter.blocks.items():
        w = _weight(model, key)
        idx = get_xp(w).asarray(e.indices)
        if e.axis == "rows":
            w[idx] = saved[key]
        else:
            w[:, idx] = saved[key]


def fuse_adapters(adapters: Sequence[S2FTAdapter], weights: Sequence[float]) -> S2FTAdapter:
    """One adapter equal to Σ_k λ_k ΔW_k: per matrix, the union of the index sets, with overlapping
    entries summed (disjoint sets simply sit side by side)."""
    if len(adapters) != len(weights) or not adapters:
        raise CheckpointError(
            f"fuse_adapters needs one weight per adapter, got {len(adapters)} and {len(weights)}"
        )
    signature = adapters[0].signature
    if any(a.signature != signature for a in adapters):
        raise CheckpointError("fuse_adapters: the adapters were made for different models")
    fused: dict[str, AdapterBlock] = {}
    for key in sorted({k for a in adapters for k in a.blocks}):
        parts = [(a.blocks[key], lam) for a, lam in zip(adapters, weights, strict=True) if key in a.blocks]
        first = parts[0][0]
        if any(p.axis != first.axis or tuple(p.shape) != tuple(first.shape) for p, _ in parts):
            raise CheckpointError(
                f"fuse_adapters: {key!r} has different axes or shapes in different adapters"
            )
        xp = get_xp(first.delta)
        union = sorted({int(i) for p, _ in parts for i in p.indices.tolist()})
        where = {u: n for n, u in enumerate(union)}
        O, I = first.shape
        delta = xp.zeros(
            (O, len(union)) if first.axis == "columns" else (len(union), I), dtype=first.delta.dtype
        )
        for p, lam in parts:
            pos = xp.asarray([where[int(i)] for i in p.indices.tolist()], dtype=xp.int64)
            if first.axis == "columns":
                delta[:, pos] += lam * p.delta
            else:
                delta[pos] += lam * p.delta
        fused[key] = AdapterBlock(first.axis, xp.asarray(union, dtype=xp.int64), delta, first.shape)
    return S2FTAdapter(fused, dict(signature))


@dataclasses.dataclass(eq=False)
class _GroupedAdapterSlot:
    """Inference-only slot: the shared base slot plus, per request group, that group's update."""

    base: Any
    groups: list[tuple[list[int], Entry]]  # (request ids, entry)
    n_requests: int

    def forward(self, x: Array, *, keep: bool, rng: np.random.Generator | None = None) -> tuple[Array, None]:
        xp = get_xp(x)
        y, _ = self.base.forward(x, keep=False)
        T = x.shape[0] // self.n_requests  # rows are request-major: row b·T + t
        for requests, e in self.groups:
            rows = xp.asarray([b * T + t for b in requests for t in range(T)], dtype=xp.int64)
            xr = x[rows]
            if isinstance(e, LoraFactors):
                y[rows] += e.scaling * (
                    (xr @ xp.asarray(e.A, dtype=x.dtype).T) @ xp.asarray(e.B, dtype=x.dtype).T
                )
            elif e.axis == "columns":
                y[rows] += xr[:, xp.asarray(e.indices)] @ xp.asarray(e.delta, dtype=x.dtype).T
            else:
                yr = y[rows]
                yr[:, xp.asarray(e.indices)] += xr @ xp.asarray(e.delta, dtype=x.dtype).T
                y[rows] = yr
        return y, None


def batched_forward(
    model: Model,
    tokens: Array,
    adapters: Sequence[Adapter],
    assignment: Sequence[int],
    *,
    attention_mask: Array | None = None,
    kv_cache: KVCache | None = None,
) -> Array:
    """Logits of a batch in which request b uses ``adapters[assignment[b]]`` (−1: the base model).

    The base weights are shared and never modified; per slot, the requests that share an adapter
    form one group and get one gather/scatter and one small matmul (S2FT) or two thin matmuls (LoRA).

    Shapes:
        tokens: (B, T)   assignment: (B,)   returns: (B, T, V)
    """
    B = tokens.shape[0]
    if len(assignment) != B or any(not -1 <= k < len(adapters) for k in assignment):
        raise ShapeError(
            f"assignment must give each of the {B} requests an adapter index in [-1, {len(adapters)})"
        )
    per_slot: dict[str, list[tuple[list[int], Entry]]] = {}
    for k, adapter in enumerate(adapters):
        requests = [b for b in range(B) if assignment[b] == k]
        if not requests:
            continue
        check_adapter(model, adapter)
        for key, e in _entries(adapter).items():
            per_slot.setdefault(key, []).append((requests, e))
    blocks = []
    for i, block in enumerate(model.blocks):
        swaps = {
            name: _GroupedAdapterSlot(slot, per_slot[f"blocks.{i}.{name}"], B)
            for name, slot in block.slots()
            if f"blocks.{i}.{name}" in per_slot
        }
        blocks.append(dataclasses.replace(block, **swaps))
    served = dataclasses.replace(model, blocks=blocks)
    logits, _ = model_forward(served, tokens, attention_mask=attention_mask, kv_cache=kv_cache, train=False)
    return logits
