"""Fine-tuning methods: each is a slot type, a function that swaps a model's slots (freezing the rest),
and merge/unmerge/export. The model code never changes.

Every method module (``full``, ``lora``, ``pissa``, ``sorsa``, ``s2ft``) offers the same small protocol:

    Config                             a frozen dataclass of the method's hyperparameters
    apply(model, config, rng)          swap/freeze the model's slots in place and return the model
    merge(model), unmerge(model)       fold the adapters into the frozen weights and back

and records what it did in ``model.meta["method"]``, a ``MethodRecord``. ``minift.methods.registry``
is the one table of methods by name: it binds each module to its adapter file format and to the
command-line options, and is what the tools (``minift finetune``, ``bench``, ``demo``, ``study``)
dispatch through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minift.model import Model

META_KEY = "method"


@dataclass
class MethodRecord:
    """Which fine-tuning method a model carries, in ``model.meta["method"]``.

    ``config`` is the method's ``Config`` (None while a method is half applied, e.g. after S2FT's
    ``co_permute`` alone); ``state`` is what the method must remember besides it, ready for JSON
    (S2FT: every permuted layer's layout; a loaded PEFT adapter: the folder it came from).
    """

    name: str
    config: Any = None
    state: dict[str, Any] = field(default_factory=dict)


def method_record(model: Model) -> MethodRecord | None:
    """The record of the method ``model`` carries; None for a plain (base or merged) model."""
    return model.meta.get(META_KEY)


def record_method(model: Model, record: MethodRecord) -> None:
    model.meta[META_KEY] = record


def carries(model: Model, name: str) -> bool:
    """Whether ``model`` carries the method called ``name``."""
    record = method_record(model)
    return record is not None and record.name == name
