"""Which linear slots a method adapts: by projection name and by layer, as PEFT's ``target_modules``
and ``layers_to_transform``.

Projections are named as in ``minift.model.SLOT_NAMES`` (q, k, v, o, gate, up, down); the Hugging Face
names (``q_proj`` …) are accepted too, and ``"all"`` (PEFT: ``"all-linear"``) means every projection of
a block (the LM head is never adapted). A method freezes the whole model, then swaps the selected
slots for its own slot type with ``replace_slot``; the model code is never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from minift.errors import ConfigError
from minift.io.hf_names import SLOT_MODULES, module_name
from minift.model import SLOT_NAMES, Model, set_trainable
from minift.slots import LinearSlot

_ALIASES = {module_name(name): name for name in SLOT_MODULES}  # "q_proj" → "q"


def slot_names(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise target names to slot names in ``SLOT_NAMES`` order: ``["v_proj", "q"]`` → ("q", "v")."""
    if isinstance(targets, str):
        targets = SLOT_NAMES if targets in ("all", "all-linear") else (targets,)
    names = set()
    for t in targets:
        name = _ALIASES.get(t, t)
        if name not in SLOT_NAMES:
            raise ConfigError(
                f"unknown target module {t!r}: expected one of {', '.join(SLOT_NAMES)} "
                f"(or {', '.join(_ALIASES)}), or 'all'"
            )
        names.add(name)
    if not names:
        raise ConfigError("targets is empty: name at least one projection (q, k, v, o, gate, up, down)")
    return tuple(n for n in SLOT_NAMES if n in names)


def select_targets(
    model: Model, targets: str | Iterable[str], layers: Sequence[int] | None = None
) -> list[tuple[int, str, LinearSlot]]:
    """(layer index, slot name, slot) of every selected projection, bottom layer first.

    ``layers=None`` selects every layer; negative indices count from the top, as in Python.
    """
    names = slot_names(targets)
    n = len(model.blocks)
    if layers is None:
        indices = list(range(n))
    else:
        indices = []
        for i in layers:
            if not -n <= i < n:
                raise ConfigError(f"layer index {i} out of range: the model has {n} layers (0..{n - 1})")
            indices.append(i % n)
        indices = sorted(set(indices))
    selected = []
    for i in indices:
        for name in names:
            slot = getattr(model.blocks[i], name)
            if slot is None:
                raise ConfigError(
                    f"target {name!r} does not exist in a {model.config.arch} block (layer {i})"
                )
            selected.append((i, name, slot))
    return selected


def replace_slot(model: Model, layer: int, name: str, slot: LinearSlot) -> None:
    """Put ``slot`` in place of projection ``name`` of block ``layer`` (in place)."""
    setattr(model.blocks[layer], name, slot)


def freeze(model: Model) -> Model:
    """Freeze every array of the model (a method then makes its own slots trainable)."""
    return set_trainable(model, False)


def slot_paths(model: Model) -> Iterator[tuple[str, LinearSlot]]:
    """("blocks.{i}.{name}", slot) for every projection, the prefix of its keys in the gradient dict."""
    for i, block in enumerate(model.blocks):
        for name, slot in block.slots():
            yield f"blocks.{i}.{name}", slot
