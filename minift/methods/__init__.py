"""Fine-tuning methods: each is a slot type, a function that swaps a model's slots (freezing the rest),
and merge/unmerge/export. The model code never changes.

``METHODS`` maps a method's name to its module; every module offers ``Config``, ``apply(model, config,
rng)``, ``merge(model)`` and ``unmerge(model)`` (see ``minift.methods.full``). Modules are imported on
first use, so ``import minift.methods`` stays cheap. S2FT is not in ``METHODS``: its ``apply_s2ft`` also
takes calibration batches and it has no merge/unmerge pair (``unpermute`` returns the trained weights
to the original layout), so ``minift.methods.s2ft`` keeps its own names.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from minift.errors import ConfigError

METHODS: dict[str, str] = {
    "full": "minift.methods.full",
    "lora": "minift.methods.lora",
    "pissa": "minift.methods.pissa",
    "sorsa": "minift.methods.sorsa",
}


def get_method(name: str) -> ModuleType:
    """The module of the method called ``name`` (e.g. ``get_method("lora").apply(model, cfg, rng)``)."""
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(f"unknown fine-tuning method {name!r}: expected one of {known}")
    return importlib.import_module(METHODS[name])
