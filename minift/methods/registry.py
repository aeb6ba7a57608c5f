"""The one table of fine-tuning methods by name, and the options they are built from.

A ``Method`` binds a method module's protocol (``Config``, ``apply``, ``merge``/``unmerge``; see
``minift.methods``) to what the tools need besides: how its config is built from the common
command-line options (``MethodSpec``), the gradient hooks its training needs, and how its adapter is
written and read. ``minift finetune/eval/generate/export``, ``minift bench``, ``minift demo`` and the
study take their method names, option help and dispatch from ``REGISTRY``; adding a method is one
``register(Method(...))`` call.

Methods are compared at a **matched trainable budget**: LoRA, PiSSA and SORSA at rank r on the chosen
projections, S2FT with the heads and channels whose parameter count is closest to that LoRA's
(``minift.methods.s2ft.match_lora_budget``), full fine-tuning with everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minift.config import ModelConfig
from minift.errors import CheckpointError, ConfigError
from minift.io.peft import CONFIG_NAME, export_peft_adapter, load_peft_adapter
from minift.methods import full, lora, pissa, s2ft, sorsa
from minift.methods.s2ft.adapter import INDEX as S2FT_INDEX
from minift.model import SLOT_NAMES, Model
from minift.serving import merge_adapter

CalibBatch = tuple[Any, Any]  # (tokens, targets) for S2FT's data-driven selection strategies


@dataclass(frozen=True)
class MethodSpec:
    """A method and the common options every method's config is built from (the command line's
    flags). Each method reads the options its ``Method.options`` names and ignores the rest."""

    method: str
    rank: int = 8  # LoRA/PiSSA/SORSA rank r; S2FT's budget is matched to LoRA at this rank
    alpha: float | None = None  # LoRA/PiSSA: scaling alpha / r (default alpha = r); SORSA: None = 1
    targets: tuple[str, ...] = SLOT_NAMES  # projections LoRA/PiSSA/SORSA adapt (and S2FT's budget counts)
    heads: int | None = None  # S2FT heads per layer (None: matched budget)
    channels: int | None = None  # S2FT FFN channels per layer (None: matched budget)
    strategy: str = "random"  # S2FT selection strategy
    gamma: float = 4e-4  # SORSA regularizer strength
    dropout: float = 0.0  # adapter dropout (LoRA/PiSSA/SORSA)
    variant: str = "large"  # S2FT scored strategies: keep the "large" or the "small" end
    head_targets: tuple[str, ...] = ("o",)  # S2FT matrices whose heads train (⊆ q k v o)
    channel_targets: tuple[str, ...] = ("down",)  # S2FT matrices whose channels train (⊆ gate up down)

    def __post_init__(self) -> None:
        get_method(self.method)


def _no_hooks(config: Any) -> list[Any]:
    return []


@dataclass(frozen=True)
class Method:
    """One fine-tuning method as the tools see it.

    ``Config``, ``apply``, ``merge`` and ``unmerge`` are the method module's (so a ``Method`` is used
    like the module: ``get_method("lora").apply(model, get_method("lora").Config(r=4), rng)``).
    ``configure`` builds its config from a ``MethodSpec`` and the model's config; ``grad_hooks`` gives
    the training loop's gradient hooks for a config (SORSA's regularizer); ``save_adapter(model,
    folder, base)`` writes the adapter (None: the method has none, its result is the merged model);
    ``adapter_file`` names the file that marks a folder as this method's adapter, which
    ``load_adapter(model, folder)`` puts on a base model.
    """

    name: str
    label: str  # for tables: "LoRA", "full FT"
    summary: str  # one line for --help
    options: tuple[str, ...]  # the MethodSpec fields it reads
    Config: type
    apply: Callable[..., Model]  # (model, config, rng, calib_batches=None) -> model, in place
    configure: Callable[[MethodSpec, ModelConfig], Any]
    merge: Callable[[Model], Model]
    unmerge: Callable[[Model], Model]
    save_adapter: Callable[[Model, Path, str], Path | None]
    grad_hooks: Callable[[Any], list[Any]] = _no_hooks
    adapter_file: str | None = None
    load_adapter: Callable[[Model, Path], Model] | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name already there is refused)."""
    if method.name in REGISTRY:
        raise ConfigError(f"a method called {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_method(name: str) -> Method:
    """The method called ``name``; ConfigError for an unknown one."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown fine-tuning method {name!r}: expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def apply_method(
    model: Model, spec: MethodSpec, rng: np.random.Generator, calib: Sequence[CalibBatch] | None = None
) -> list[Any]:
    """Apply ``spec`` to ``model`` in place; return the gradient hooks its training needs."""
    method = get_method(spec.method)
    config = method.configure(spec, model.config)
    method.apply(model, config, rng, calib)
    return method.grad_hooks(config)


def load_adapter(model: Model, folder: str | Path) -> Model:
    """Put the adapter in ``folder`` (any registered method's) on a base model, in place."""
    folder = Path(folder)
    for method in REGISTRY.values():
        if method.adapter_file and method.load_adapter and (folder / method.adapter_file).is_file():
            return method.load_adapter(model, folder)
    marks = ", ".join(sorted({f"{m.adapter_file} ({m.name})" for m in REGISTRY.values() if m.adapter_file}))
    raise CheckpointError(f"{folder}: not an adapter folder (expected one of: {marks})")


# ----------------------------------------------------------------------------------------------------
# the five methods


def _alpha(spec: MethodSpec) -> float:
    return float(spec.rank) if spec.alpha is None else spec.alpha


def _peft_save(model: Model, folder: Path, base: str) -> Path:
    return export_peft_adapter(model, folder, base_model_name_or_path=base)


def _s2ft_config(spec: MethodSpec, config: ModelConfig) -> s2ft.S2FTConfig:
    matched = s2ft.match_lora_budget(
        config, spec.rank, lora_targets=spec.targets, strategy=spec.strategy, variant=spec.variant,
        head_targets=spec.head_targets, channel_targets=spec.channel_targets,
    )
    if spec.heads is None and spec.channels is None:
        return matched
    return s2ft.S2FTConfig(
        heads=matched.heads if spec.heads is None else spec.heads,
        channels=matched.channels if spec.channels is None else spec.channels,
        head_targets=spec.head_targets,
        channel_targets=spec.channel_targets,
        strategy=spec.strategy,  # type: ignore[arg-type]
        variant=spec.variant,  # type: ignore[arg-type]
    )


def _s2ft_load(model: Model, folder: Path) -> Model:
    """An S2FT adapter is a sparse update of the original coordinates: it is merged into the weights."""
    merge_adapter(model, s2ft.load_adapter(folder))
    return model


def _without_calib(apply: Callable[..., Model]) -> Callable[..., Model]:
    def run(model: Model, config: Any, rng: np.random.Generator | None = None, calib: Any = None) -> Model:
        return apply(model, config, rng)

    run.__doc__ = apply.__doc__
    return run


_LOW_RANK = ("rank", "alpha", "targets", "dropout")

register(Method(
    "full", "full FT", "every weight trained; the result is the merged model",
    (), full.Config, _without_calib(full.apply), lambda spec, c: full.FullConfig(),
    full.merge, full.unmerge, save_adapter=lambda model, folder, base: None,
))
register(Method(
    "lora", "LoRA", "low-rank adapter B A on the frozen weights (Hu et al. 2021)",
    _LOW_RANK, lora.Config, _without_calib(lora.apply),
    lambda spec, c: lora.LoRAConfig(
        r=spec.rank, alpha=_alpha(spec), targets=spec.targets, dropout=spec.dropout
    ),
    lora.merge, lora.unmerge, _peft_save, adapter_file=CONFIG_NAME, load_adapter=load_peft_adapter,
))
register(Method(
    "pissa", "PiSSA", "LoRA initialised from the top singular vectors (Meng et al. 2024)",
    _LOW_RANK, pissa.Config, _without_calib(pissa.apply),
    lambda spec, c: pissa.PiSSAConfig(
        r=spec.rank, alpha=_alpha(spec), targets=spec.targets, dropout=spec.dropout
    ),
    pissa.merge, pissa.unmerge, _peft_save,
))
register(Method(
    "sorsa", "SORSA", "trainable singular values and orthonormal-regularised factors (Cao 2024)",
    (*_LOW_RANK, "gamma"), sorsa.Config, _without_calib(sorsa.apply),
    lambda spec, c: sorsa.SORSAConfig(
        r=spec.rank, alpha=spec.alpha, targets=spec.targets, dropout=spec.dropout, gamma=spec.gamma
    ),
    sorsa.merge, sorsa.unmerge, _peft_save, grad_hooks=lambda config: [sorsa.gradient_hook(config)],
))
register(Method(
    "s2ft", "S2FT", "a few heads and FFN channels trained in place (Yang et al. 2024)",
    ("rank", "targets", "heads", "channels", "strategy", "variant", "head_targets", "channel_targets"),
    s2ft.Config, s2ft.apply, _s2ft_config,
    s2ft.merge, s2ft.unmerge,
    lambda model, folder, base: s2ft.save_adapter(s2ft.extract_adapter(model), folder),
    adapter_file=S2FT_INDEX, load_adapter=_s2ft_load,
))
