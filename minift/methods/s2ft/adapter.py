"""The S2FT update as a decoupled adapter: (indices in original coordinates, dense block deltas).

After training, ΔW = W_ft − W_pre is non-zero only on the selected rows or columns, so it factors
as U Vᵀ with U a column selector and V dense (paper Sec. 6.2). Per matrix the adapter
stores the original indices S and the block: Δ = ΔW[:, S] (O, S) for column blocks (O, Down) or
Δ = ΔW[S, :] (S, I) for row blocks (Q, K, V, Gate, Up). Indices are always in the *original*
layout (the permutation is undone through the recorded order), so an adapter applies to the base
model as distributed. On disk: ``adapter.safetensors`` (``<key>.indices``, ``<key>.delta`` for
keys like ``blocks.3.o``) and ``adapter.json`` (axis and weight shape per key, model signature),
written together as one folder swap (``minift.io.atomic``); no pickle.
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
from minift.io.atomic import replace_folder, write_file_atomic
from minift.io.jsonio import Fields, ascii_int, read_json_object
from minift.io.safetensors_io import (
    check_finite,
    check_float_dtypes,
    read_header,
    read_tensor,
    write_safetensors,
)
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
    source: str = ""  # the folder it was loaded from, named in errors ("" when built in memory)


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
    """Write ``adapter.safetensors`` and ``adapter.json`` as the folder ``directory``, swapped in whole:
    an interrupted save leaves the previous adapter intact, never new tensors beside an old index."""
    out = Path(directory)
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
    with replace_folder(out) as tmp:
        write_safetensors(tmp / WEIGHTS, tensors)
        write_file_atomic(tmp / INDEX, json.dumps(index, indent=1).encode())
    return out


SIGNATURE_KEYS = ("n_layers", "hidden_size", "intermediate_size", "n_heads", "n_kv_heads", "head_dim")
_SLOT_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
MAX_SIZE = 2**24  # no weight of a real model has more rows or columns


def parse_key(key: str) -> tuple[int, str] | None:
    """(layer, slot) of a key ``blocks.<i>.<slot>`` written in canonical form (ASCII digits, no leading
    zero: ``blocks.03.q`` would alias ``blocks.3.q``), else None."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in _SLOT_NAMES:
        return None
    layer = ascii_int(parts[1])
    return None if layer is None or str(layer) != parts[1] else (layer, parts[2])


def load_adapter(directory: str | os.PathLike[str]) -> S2FTAdapter:
    """Read an adapter written by ``save_adapter``; CheckpointError names the file and what is missing
    or wrong. The blocks of adapter.json and the tensors of adapter.safetensors must match exactly
    (a block without tensors, or tensors without a block, is an error, never silently dropped)."""
    src = Path(directory)
    index_path, weights = src / INDEX, src / WEIGHTS
    index = read_json_object(index_path)
    f = Fields(index, str(index_path))
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{index_path}: 'format' must be {FORMAT!r}")
    f.int("version")
    if index["version"] != 1:
        raise CheckpointError(f"{index_path}: adapter version {index['version']}; this minift reads 1")
    entries, signature = index.get("blocks"), index.get("model", {})
    if not isinstance(entries, dict):
        raise CheckpointError(
            f"{index_path}: 'blocks' must map slot keys to {{axis, shape}}, got {entries!r}"
        )
    if not isinstance(signature, dict):
        raise CheckpointError(f"{index_path}: 'model' must map sizes to integers, got {signature!r}")
    sig = Fields(signature, f"{index_path}: 'model'")
    unknown = sorted(set(signature) - set(SIGNATURE_KEYS))
    if unknown:
        raise CheckpointError(f"{index_path}: 'model' has unknown sizes {unknown}; expected {SIGNATURE_KEYS}")
    for name in signature:
        sig.int(name, lo=0, hi=MAX_SIZE)
    infos, _ = read_header(weights)
    expected = {f"{key}.{part}" for key in entries for part in ("indices", "delta")}
    if set(infos) != expected:
        missing, extra = sorted(expected - set(infos)), sorted(set(infos) - expected)
        raise CheckpointError(f"{weights}: tensors do not match the blocks of {index_path}: missing "
                              f"{missing[:4]}, not listed there {extra[:4]}")
    check_float_dtypes(weights, {k: v for k, v in infos.items() if k.endswith(".delta")}, "S2FT deltas")
    blocks = {}
    for key, meta in entries.items():
        where = f"{weights}, key {key!r}"
        if parse_key(key) is None:
            raise CheckpointError(f"{index_path}: block key {key!r} is not of the form blocks.<layer>.<slot> "
                                  f"with slot one of {_SLOT_NAMES}")
        if not isinstance(meta, dict) or "axis" not in meta or "shape" not in meta:
            raise CheckpointError(f"{index_path}: block {key!r} needs 'axis' and a 2-entry 'shape'")
        m = Fields(meta, f"{index_path}: block {key!r}")
        axis = m.str("axis", choices=("rows", "columns"))
        shape = meta.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(type(d) is int and 1 <= d <= MAX_SIZE for d in shape)):
            raise m.fail("shape", f"a list of 2 integers in [1, {MAX_SIZE}]", shape)
        indices = read_tensor(weights, infos[f"{key}.indices"])
        delta = read_tensor(weights, infos[f"{key}.delta"])
        check_finite(weights, f"{key}.delta", delta)
        blk = AdapterBlock(axis, indices, delta, (shape[0], shape[1]))
        check_block(blk, where)
        blocks[key] = blk
    return S2FTAdapter(blocks, dict(signature), str(src))


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
