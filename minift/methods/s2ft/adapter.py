"""The S2FT update as a decoupled adapter: (indices in original coordinates, dense block deltas).

After training, ΔW = W_ft − W_pre is non-zero only on the selected rows or columns, so it factors
as U Vᵀ with U a column selector and V dense (paper Sec. 6.2). Per matrix the adapter
stores the original indices S and the block: Δ = ΔW[:, S] (O, S) for column blocks (O, Down) or
Δ = ΔW[S, :] (S, I) for row blocks (Q, K, V, Gate, Up). Indices are always in the *original*
layout (the permutation is undone through the recorded order), so an adapter applies to the base
model as distributed. On disk: ``adapter.safetensors`` (``<key>.indices``, ``<key>.delta`` for
keys like ``blocks.3.o``) and ``adapter.json`` (axis and weight shape per key, model signature),
each written atomically (temporary file + rename); no pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from minift.backend import Array, get_xp, to_numpy
from minift.config import ModelConfig
from minift.errors import CheckpointError
from minift.io.checkpoint import _write_atomic
from minift.io.jsonio import read_json_object
from minift.io.safetensors_io import read_safetensors, write_safetensors
from minift.methods.s2ft.config import COUPLING
from minift.methods.s2ft.permute import LayerLayout, expand, layouts_of, unit_order, unit_width
from minift.methods.s2ft.slots import ColumnBlock, RowBlock
from minift.model import Model

FORMAT = "minift-s2ft-adapter"
WEIGHTS, INDEX = "adapter.safetensors", "adapter.json"
Axis = Literal["rows", "columns"]


def model_signature(config: ModelConfig) -> dict[str, int]:
    """The sizes an adapter must agree with."""
    return {
        "n_layers": config.n_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "n_heads": config.n_heads,
        "n_kv_heads": int(config.n_kv_heads or 0),
        "head_dim": int(config.head_dim or 0),
    }


@dataclass(frozen=True)
class AdapterBlock:
    """ΔW restricted to rows or columns ``indices`` (original coordinates, ascending, distinct)."""

    axis: Axis
    indices: Array  # (S,) integer
    delta: Array  # (O, S) for columns, (S, I) for rows
    shape: tuple[int, int]  # (O, I) of the full weight


@dataclass
class S2FTAdapter:
    """Blocks by slot key (``blocks.<i>.<slot>``) and the signature of the model they belong to."""

    blocks: dict[str, AdapterBlock]
    signature: dict[str, int] = field(default_factory=dict)


def _feature_order(name: str, layout: LayerLayout, head_dim: int) -> list[int]:
    """Original feature index of each permuted row (Q, K, V, Gate, Up) or column (O, Down)."""
    unit = COUPLING[name].unit
    return expand(unit_order(layout, unit), unit_width(unit, head_dim))


def extract_adapter(model: Model) -> S2FTAdapter:
    """Δ = current block − the block at ``apply_s2ft`` time, for every S2FT slot, with the block's
    original indices (sorted ascending, the delta reordered with them)."""
    c = model.config
    assert c.head_dim is not None
    blocks = {}
    for i, layout in layouts_of(model).items():
        for name, slot in model.blocks[i].slots():
            if not isinstance(slot, ColumnBlock | RowBlock):
                continue
            xp = get_xp(slot.weight)
            order = _feature_order(name, layout, c.head_dim)
            positions = [p for a, b in slot.segments for p in range(a, b)]
            original = [order[p] for p in positions]
            sort = xp.asarray(sorted(range(len(original)), key=original.__getitem__), dtype=xp.int64)
            columns = isinstance(slot, ColumnBlock)
            current = xp.concatenate(list(slot.parameters().values()), axis=1 if columns else 0)
            delta = xp.take(current - slot.reference, sort, axis=1 if columns else 0)
            blocks[f"blocks.{i}.{name}"] = AdapterBlock(
                "columns" if columns else "rows",
                xp.asarray(sorted(original), dtype=xp.int64),
                xp.ascontiguousarray(delta),
                (slot.out_features, slot.in_features),
            )
    return S2FTAdapter(blocks, model_signature(c))


def save_adapter(adapter: S2FTAdapter, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapter.safetensors`` then ``adapter.json`` into ``directory`` (created if needed),
    each atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Array] = {}
    for key, blk in adapter.blocks.items():
        tensors[f"{key}.indices"] = to_numpy(blk.indices).astype(np.int64)
        tensors[f"{key}.delta"] = blk.delta
    index = {
        "format": FORMAT,
        "version": 1,
        "model": adapter.signature,
        "blocks": {k: {"axis": b.axis, "shape": list(b.shape)} for k, b in adapter.blocks.items()},
    }
    write_safetensors(out / WEIGHTS, tensors)
    _write_atomic(out / INDEX, json.dumps(index, indent=1).encode())
    return out


def load_adapter(directory: str | os.PathLike[str]) -> S2FTAdapter:
    """Read an adapter written by ``save_adapter``; CheckpointError names what is missing or wrong."""
    src = Path(directory)
    index = read_json_object(src / INDEX)
    tensors, _ = read_safetensors(src / WEIGHTS)
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{src / INDEX}: 'format' must be {FORMAT!r}")
    entries, signature = index.get("blocks", {}), index.get("model", {})
    if not isinstance(entries, dict):
        raise CheckpointError(
            f"{src / INDEX}: 'blocks' must map slot keys to {{axis, shape}}, got {entries!r}"
        )
    if not (isinstance(signature, dict) and all(type(v) is int for v in signature.values())):
        raise CheckpointError(f"{src / INDEX}: 'model' must map sizes to integers, got {signature!r}")
    blocks = {}
    for key, meta in entries.items():
        where = f"{src / WEIGHTS}, key {key!r}"
        if f"{key}.indices" not in tensors or f"{key}.delta" not in tensors:
            raise CheckpointError(f"{where}: '{key}.indices' and '{key}.delta' are both required")
        try:
            axis, shape = meta["axis"], (int(meta["shape"][0]), int(meta["shape"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(
                f"{src / INDEX}: block {key!r} needs 'axis' and a 2-entry 'shape'"
            ) from None
        blk = AdapterBlock(axis, tensors[f"{key}.indices"], tensors[f"{key}.delta"], shape)
        check_block(blk, where)
        blocks[key] = blk
    return S2FTAdapter(blocks, dict(signature))


def check_block(blk: AdapterBlock, where: str) -> None:
    """Raise CheckpointError unless indices and delta agree with the axis and the weight shape."""
    O, I = blk.shape
    n = int(blk.indices.shape[0]) if blk.indices.ndim == 1 else -1
    extent = I if blk.axis == "columns" else O
    expected = (O, n) if blk.axis == "columns" else (n, I)
    idx = to_numpy(blk.indices)
    if blk.axis not in ("rows", "columns") or n < 0 or idx.dtype.kind not in "iu":
        raise CheckpointError(f"{where}: expected axis 'rows'/'columns' and 1-D integer indices")
    if tuple(blk.delta.shape) != expected:
        raise CheckpointError(f"{where}: delta has shape {tuple(blk.delta.shape)}, expected {expected}")
    if n and (idx.min() < 0 or idx.max() >= extent or len(set(idx.tolist())) != n):
        raise CheckpointError(f"{where}: indices must be distinct and within [0, {extent})")
