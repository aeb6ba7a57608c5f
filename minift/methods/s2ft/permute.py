"""Co-permutation: gather the selected heads and channels of a layer into contiguous ranges.

A head couples Q rows, K/V rows (through its key/value group), and O input columns; an FFN channel
couples Gate and Up rows with a Down input column (paper Sec. 3.1, Eq. 1–2). Permuting all of them
with the same permutation leaves the network function unchanged, so the selected part of each
matrix becomes one (or a few) contiguous block(s): a NumPy view, trained in place (paper Sec. 3.3).

RoPE: heads move as whole D-row blocks, never dimensions inside a head, so the rotary pairing of
dimension i with i + D/2 inside each head (``rotate_half``) is untouched.

Grouped-query attention (K < H, G = H / K query heads per group): query head h reads key/value head
h // G (``minift.layers.attention``). A permutation is valid iff it moves whole groups and permutes
query heads only *within* their group: new head i must be original head ``head_order[i]`` with
``head_order[i] // G == kv_order[i // G]``. Any head selection is then laid out as follows. Call a
group *full*, *partial* or *empty* by how many of its G heads are selected. Order the groups

    partial₀, full…, partial₁, partial₂, partial₃, …, empty…

and inside each group put the selected heads last for partial₀, partial₂, partial₄, … and first for
every other group. The selected heads then form ⌈p/2⌉ contiguous segments for p partial groups
(one segment when p ≤ 2, always one for MHA, where G = 1), and the key/value heads of the touched
groups form one segment at the front. A selection with more than two partial groups cannot be made
contiguous by any valid permutation (each segment can straddle at most two partial groups), so the
block slots carry a short list of segments (``minift.methods.s2ft.slots``); the computation stays
exact for every selection.

The orders are recorded in the model's ``MethodRecord``; ``unpermute`` restores original coordinates
bitwise (a permutation is a gather, and the inverse gather moves every value back unchanged), so
merged models and adapters are always written in the original layout, which any other tool can load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from minift.backend import Array, get_xp
from minift.errors import ConfigError
from minift.methods import META_KEY, MethodRecord, carries, method_record, record_method
from minift.methods.s2ft.config import COUPLING
from minift.methods.s2ft.slots import ColumnBlock, RowBlock, Segments
from minift.model import Block, Model
from minift.slots import Dense


def runs(flags: list[bool]) -> Segments:
    """Maximal [start, stop) ranges where ``flags`` is True."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return tuple(out)


def scale_segments(segments: Segments, width: int) -> Segments:
    """Segments of units (heads) as segments of features (head_dim rows or columns per head)."""
    return tuple((a * width, b * width) for a, b in segments)


@dataclass(frozen=True)
class LayerLayout:
    """One layer's selection (original ids) and its permutation: new position i holds original
    unit ``*_order[i]``. Segments are in the permuted layout, in units (heads or channels)."""

    heads: tuple[int, ...]  # selected query heads
    channels: tuple[int, ...]  # selected FFN channels
    head_order: tuple[int, ...]  # (H,)
    kv_order: tuple[int, ...]  # (K,)
    channel_order: tuple[int, ...]  # (F,)
    head_segments: Segments  # selected query heads
    kv_segments: Segments  # key/value heads of the groups touched by the selection
    channel_segments: Segments

    def to_dict(self) -> dict[str, Any]:
        return {
            k: [list(s) for s in v] if k.endswith("segments") else list(v) for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerLayout:
        return cls(
            **{k: tuple(tuple(s) for s in v) if k.endswith("segments") else tuple(v) for k, v in d.items()}
        )


def unit_order(layout: LayerLayout, unit: str) -> tuple[int, ...]:
    """The permutation of one kind of unit (``Coupling.unit``): new position i holds original unit i."""
    return {"heads": layout.head_order, "kv_heads": layout.kv_order, "channels": layout.channel_order}[unit]


def unit_segments(layout: LayerLayout, unit: str) -> Segments:
    """The selected segments of one kind of unit, in units."""
    return {"heads": layout.head_segments, "kv_heads": layout.kv_segments,
            "channels": layout.channel_segments}[unit]


def unit_width(unit: str, head_dim: int) -> int:
    """Rows or columns per unit: a head is D of them, a channel one."""
    return 1 if unit == "channels" else head_dim


def plan_layout(
    heads: tuple[int, ...], channels: tuple[int, ...], n_heads: int, n_kv_heads: int, n_channels: int
) -> LayerLayout:
    """The permutation that gathers ``heads`` (query heads, any subset, GQA included) and
    ``channels`` to the front, as described in the module docstring."""
    G = n_heads // n_kv_heads
    chosen = set(heads)
    count = [sum(g * G + j in chosen for j in range(G)) for g in range(n_kv_heads)]
    partial = [g for g in range(n_kv_heads) if 0 < count[g] < G]
    full = [g for g in range(n_kv_heads) if count[g] == G]
    empty = [g for g in range(n_kv_heads) if count[g] == 0]
    groups = partial[:1] + full + partial[1:] + empty
    last = set(partial[0::2])  # partial groups whose selected heads go to the end
    head_order: list[int] = []
    for g in groups:
        members = range(g * G, (g + 1) * G)
        sel, rest = [h for h in members if h in chosen], [h for h in members if h not in chosen]
        head_order += rest + sel if g in last else sel + rest
    picked = set(channels)
    channel_order = sorted(picked) + [j for j in range(n_channels) if j not in picked]
    return LayerLayout(
        heads=tuple(sorted(chosen)),
        channels=tuple(sorted(picked)),
        head_order=tuple(head_order),
        kv_order=tuple(groups),
        channel_order=tuple(channel_order),
        head_segments=runs([h in chosen for h in head_order]),
        kv_segments=runs([count[g] > 0 for g in groups]),
        channel_segments=runs([j in picked for j in channel_order]),
    )


def expand(order: tuple[int, ...], width: int) -> list[int]:
    """Feature indices of whole units: unit u covers features [u·width, (u+1)·width)."""
    return [u * width + d for u in order for d in range(width)]


def inverse(order: list[int] | tuple[int, ...]) -> list[int]:
    """The permutation p⁻¹ with p⁻¹[p[i]] = i."""
    inv = [0] * len(order)
    for i, o in enumerate(order):
        inv[o] = i
    return inv


def _gather(a: Array | None, idx: list[int], axis: int) -> Array | None:
    if a is None:
        return None
    xp = get_xp(a)
    return xp.ascontiguousarray(xp.take(a, xp.asarray(idx, dtype=xp.int64), axis=axis))


def _permute_slot(slot: Any, idx: list[int], axis: int) -> None:
    """Gather the weight along ``axis`` (0: output rows, with the bias; 1: input columns)."""
    if not isinstance(slot, Dense | ColumnBlock | RowBlock):
        raise ConfigError(f"S2FT co-permutation needs dense or S2FT slots, got {type(slot).__name__}")
    slot.weight = _gather(slot.weight, idx, axis)
    if axis == 0:
        slot.bias = _gather(slot.bias, idx, 0)


def permute_block(block: Block, layout: LayerLayout, head_dim: int, *, undo: bool = False) -> None:
    """Apply the layer's permutation (or its inverse) to every coupled matrix of one block, in place."""

    for name, (unit, axis) in COUPLING.items():
        slot = getattr(block, name)
        if slot is not None:
            idx = expand(unit_order(layout, unit), unit_width(unit, head_dim))
            _permute_slot(slot, inverse(idx) if undo else idx, 0 if axis == "rows" else 1)


def co_permute(model: Model, layouts: dict[int, LayerLayout]) -> Model:
    """Physically permute the given layers (in place) and record the layouts in ``model.meta``."""
    if method_record(model) is not None:
        raise ConfigError(
            f"the model already carries {method_record(model).name}"  # type: ignore[union-attr]
            + (" (it is already co-permuted; call unpermute first)" if carries(model, "s2ft") else "")
        )
    c = model.config
    G = c.n_heads // c.n_kv_heads
    for i, layout in layouts.items():
        valid = (
            sorted(layout.head_order) == list(range(c.n_heads))
            and sorted(layout.kv_order) == list(range(c.n_kv_heads))
            and sorted(layout.channel_order) == list(range(c.intermediate_size))
            and all(h // G == layout.kv_order[j // G] for j, h in enumerate(layout.head_order))
        )
        if not valid:
            raise ConfigError(
                f"layer {i}: the S2FT layout must permute the model's {c.n_heads} heads, {c.n_kv_heads} "
                f"key/value heads and {c.intermediate_size} channels, keeping each head in its group"
            )
    for i, layout in layouts.items():  # validated first, so a bad layout leaves the model untouched
        permute_block(model.blocks[i], layout, c.head_dim)
    layers = {str(i): lay.to_dict() for i, lay in layouts.items()}
    record_method(model, MethodRecord("s2ft", None, {"layers": layers}))
    return model


def layouts_of(model: Model) -> dict[int, LayerLayout]:
    """The recorded layouts of a co-permuted model, by layer."""
    record = method_record(model)
    if record is None or record.name != "s2ft":
        raise ConfigError("the model is not co-permuted for S2FT (its method record is not S2FT's)")
    return {int(i): LayerLayout.from_dict(d) for i, d in record.state["layers"].items()}


def unpermute(model: Model) -> Model:
    """Restore original coordinates in place: S2FT slots become frozen dense slots holding the
    (trained) weights, every permuted matrix is gathered back, and the record is removed."""
    c = model.config
    for i, layout in layouts_of(model).items():
        block = model.blocks[i]
        for name, slot in block.slots():
            if isinstance(slot, ColumnBlock | RowBlock):
                setattr(block, name, Dense(slot.weight, slot.bias))
        permute_block(block, layout, c.head_dim, undo=True)
    del model.meta[META_KEY]
    return model
