"""``apply_s2ft``: select, co-permute, and swap in the partial-backpropagation slots, in one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from minift.config import ModelConfig
from minift.errors import ConfigError
from minift.methods import method_record
from minift.methods.s2ft.config import COUPLING, S2FTConfig
from minift.methods.s2ft.permute import co_permute, plan_layout, scale_segments, unit_segments, unit_width
from minift.methods.s2ft.selection import CalibBatch, select_units
from minift.methods.s2ft.slots import block_slot
from minift.model import Model, set_trainable
from minift.slots import Dense


def apply_s2ft(
    model: Model,
    config: S2FTConfig,
    calib_batches: Sequence[CalibBatch] | None = None,
    *,
    rng: np.random.Generator | None = None,
    selection: Mapping[int, tuple[Sequence[int], Sequence[int]]] | None = None,
) -> Model:
    """Turn a dense model into an S2FT model, in place, and return it.

    Everything is frozen; per layer, the selected heads and channels are co-permuted to the front
    and the target slots become ``ColumnBlock``/``RowBlock`` whose trainable arrays are views of the
    blocks. The units are chosen by ``config.strategy`` (scored on ``calib_batches`` where needed,
    random draws from ``rng``), or given as ``selection``: layer index → (query head ids, FFN channel
    ids), in original coordinates, which then replaces the strategy (``config.heads``/``channels``
    are not used).
    The model's ``MethodRecord`` holds the configuration and every layer's permutation; use
    ``unpermute`` to return to original coordinates and ``extract_adapter`` for the sparse update.
    """
    c = model.config
    config.check(c)
    if method_record(model) is not None:
        raise ConfigError(f"apply_s2ft: the model already carries {method_record(model).name}")
    for i, block in enumerate(model.blocks):
        for name, slot in block.slots():
            if not isinstance(slot, Dense):
                raise ConfigError(
                    f"apply_s2ft needs dense slots; blocks.{i}.{name} is a {type(slot).__name__}"
                )
    if selection is None:
        selection = select_units(model, config, calib_batches, rng=rng)
    return apply_selection(model, config, _checked(selection, c))


def _checked(
    selection: Mapping[int, tuple[Sequence[int], Sequence[int]]], c: ModelConfig
) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """A chosen selection as sorted, distinct ids, or a ConfigError naming the bad layer or id."""
    out = {}
    for i, (heads, channels) in selection.items():
        if not 0 <= int(i) < c.n_layers:
            raise ConfigError(f"S2FT selection names layer {i}; the model has layers 0…{c.n_layers - 1}")
        for kind, ids, n in (("head", heads, c.n_heads), ("channel", channels, c.intermediate_size)):
            bad = [u for u in ids if not 0 <= int(u) < n]
            if bad or len(set(ids)) != len(ids):
                raise ConfigError(
                    f"S2FT selection, layer {i}: {kind} ids must be distinct and in 0…{n - 1}, "
                    f"got {list(ids)}"
                )
        out[int(i)] = (tuple(sorted(int(h) for h in heads)), tuple(sorted(int(u) for u in channels)))
    return out


def apply_selection(
    model: Model, config: S2FTConfig, selection: Mapping[int, tuple[tuple[int, ...], tuple[int, ...]]]
) -> Model:
    """Co-permute and swap in the block slots for an explicit selection, in place: layer index →
    (query heads, FFN channels) in original ids. ``apply_s2ft`` is this after ``select_units``;
    ``config`` names the target matrices (its counts and strategy are not used here)."""
    c = model.config
    set_trainable(model, False)
    layouts = {
        i: plan_layout(h, ch, c.n_heads, c.n_kv_heads, c.intermediate_size)
        for i, (h, ch) in selection.items()
    }
    co_permute(model, layouts)
    for i, lay in layouts.items():
        block = model.blocks[i]
        for name in (*config.head_targets, *config.channel_targets):
            unit, axis = COUPLING[name]
            segments = scale_segments(unit_segments(lay, unit), unit_width(unit, c.head_dim))
            slot = getattr(block, name)
            if segments:
                setattr(block, name, block_slot(axis, slot.weight, segments, slot.bias))
    method_record(model).config = config  # type: ignore[union-attr]
    return model
