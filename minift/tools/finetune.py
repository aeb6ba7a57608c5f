"""Fine-tuning with any method by name: what ``minift finetune``, ``eval``, ``generate`` and ``export``
do, and what ``minift demo`` reuses. The command line stays a thin layer over these functions.

A fine-tuning run writes one folder:

    OUT/
      adapter/          LoRA, PiSSA, SORSA: a PEFT adapter folder (``PeftModel.from_pretrained`` loads it);
                        S2FT: minift's S2FT adapter (original indices + dense blocks); full FT: none.
                        minift_base.json: the base model's folder and fingerprint (io/provenance)
      merged/           the fine-tuned model as a Hugging Face folder (always for full FT; else ``merge``)
      checkpoints/      training checkpoints; a rerun with ``resume`` continues bitwise from the latest
                        (``extend``: a finished run trains on to more steps, the schedule re-planned)
      finetune.json     the run: base model, data, method and its options, training settings, result,
                        the trainable count and S2FT's heads and channels per layer

Methods are compared at a **matched trainable budget**: LoRA, PiSSA and SORSA at rank r on the chosen
projections, S2FT with the heads and channels whose parameter count is closest to that LoRA's
(``minift.methods.s2ft.match_lora_budget``), full fine-tuning with everything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minift.data.datasets import BatchStream, encode_example, read_jsonl
from minift.data.tokenizer import Tokenizer
from minift.errors import CheckpointError, ConfigError
from minift.io.hub import load_pretrained, save_pretrained
from minift.io.peft import CONFIG_NAME, export_peft_adapter, load_peft_adapter
from minift.io.provenance import EMBEDDED_NAME, PROVENANCE, check_base, recorded_base, write_provenance
from minift.methods import full, lora, pissa, sorsa
from minift.methods import s2ft as s2ft_method
from minift.methods.s2ft.adapter import INDEX as S2FT_INDEX
from minift.methods.s2ft.permute import layouts_of
from minift.model import SLOT_NAMES, Model, trainable_parameters
from minift.serving import merge_adapter
from minift.tools.pretrain import EMBEDDED
from minift.train import GradHook, TrainConfig, TrainResult, train

METHOD_NAMES = ("full", "lora", "pissa", "sorsa", "s2ft")


@dataclass(frozen=True)
class MethodSpec:
    """A method and its options, as the command line's flags give them."""

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
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"unknown method {self.method!r}: expected one of {', '.join(METHOD_NAMES)}")


def apply_method(
    model: Model, spec: MethodSpec, rng: np.random.Generator, calib: list[Any] | None = None
) -> list[GradHook]:
    """Apply ``spec`` to ``model`` in place; return the gradient hooks its training needs (SORSA's).

    ``calib`` holds (tokens, targets) batches for S2FT's data-driven selection strategies.
    """
    r = spec.rank
    alpha = float(r) if spec.alpha is None else spec.alpha
    if spec.method == "full":
        full.apply_full(model)
    elif spec.method == "lora":
        lora.apply_lora(
            model, lora.LoRAConfig(r=r, alpha=alpha, targets=spec.targets, dropout=spec.dropout), rng
        )
    elif spec.method == "pissa":
        pissa.apply_pissa(
            model, pissa.PiSSAConfig(r=r, alpha=alpha, targets=spec.targets, dropout=spec.dropout), rng
        )
    elif spec.method == "sorsa":
        config = sorsa.SORSAConfig(
            r=r, alpha=spec.alpha, targets=spec.targets, dropout=spec.dropout, gamma=spec.gamma
        )
        sorsa.apply_sorsa(model, config, rng)
        return [sorsa.gradient_hook(config)]
    else:
        config = s2ft_method.match_lora_budget(
            model.config, r, lora_targets=spec.targets, strategy=spec.strategy, variant=spec.variant,
            head_targets=spec.head_targets, channel_targets=spec.channel_targets,
        )
        if spec.heads is not None or spec.channels is not None:
            config = s2ft_method.S2FTConfig(
                heads=config.heads if spec.heads is None else spec.heads,
                channels=config.channels if spec.channels is None else spec.channels,
                head_targets=spec.head_targets,
                channel_targets=spec.channel_targets,
                strategy=spec.strategy,  # type: ignore[arg-type]
                variant=spec.variant,  # type: ignore[arg-type]
            )
        s2ft_method.apply_s2ft(model, config, calib, rng=rng)
    return []


def s2ft_selection(model: Model) -> dict[str, Any] | None:
    """An S2FT model's configuration and, per layer, the query heads and FFN channels it trains
    (original ids); None for other methods."""
    if "s2ft" not in model.meta:
        return None
    layers = layouts_of(model)
    return {
        "config": model.meta["s2ft"]["config"],
        "layers": {
            str(i): {"heads": list(lay.heads), "channels": list(lay.channels)} for i, lay in layers.items()
        },
    }


def describe_selection(selection: dict[str, Any]) -> list[str]:
    """The lines that show an S2FT selection: targets, then one line per layer."""
    c = selection["config"]
    lines = [f"S2FT {c['strategy']}: heads on {','.join(c['head_targets']) or '-'}, "
             f"channels on {','.join(c['channel_targets']) or '-'}"]
    for i, layer in selection["layers"].items():
        lines.append(f"  layer {i}: heads {layer['heads']} channels {layer['channels']}")
    return lines


def trainable_count(model: Model) -> int:
    return sum(int(a.size) for a in trainable_parameters(model).values())


# ----------------------------------------------------------------------------------------------------
# models, adapters, merged models


def resolve_model_dir(model: str | Path) -> Path:
    """``embedded`` names the shipped base model; anything else is a Hugging Face model folder."""
    return EMBEDDED if str(model) == EMBEDDED_NAME else Path(model)


def load_model(model: str | Path) -> tuple[Model, Tokenizer]:
    """A model folder (or ``embedded``) and its tokenizer."""
    folder = resolve_model_dir(model)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder (expected config.json, model.safetensors)")
    return load_pretrained(folder), Tokenizer.from_pretrained(folder)


def save_adapter(model: Model, folder: str | Path, *, base: str = "") -> Path | None:
    """Write the model's adapter (PEFT folder for LoRA/PiSSA/SORSA, S2FT adapter for S2FT); None for
    full fine-tuning, which has no adapter (its result is the merged model). With ``base`` (a model
    folder or ``embedded``) the folder also records its base model (``minift.io.provenance``)."""
    if "s2ft" in model.meta:
        out = s2ft_method.save_adapter(s2ft_method.extract_adapter(model), folder)
    elif model.meta.get("adapter", {}).get("method") == "full":
        return None
    else:
        out = export_peft_adapter(model, folder, base_model_name_or_path=str(resolve_model_dir(base)))
    if base:
        base_dir = resolve_model_dir(base)
        write_provenance(out, base_dir, EMBEDDED_NAME if base_dir == EMBEDDED else None)
    return out


def base_of_adapter(adapter: str | Path, model: str | Path | None = None) -> Path:
    """The base model folder to put ``adapter`` on: ``model`` if given, else the one the adapter
    records; checked against the recorded fingerprint. CheckpointError when it does not fit."""
    recorded = recorded_base(adapter)
    if model is None:
        if recorded is None:
            raise CheckpointError(
                f"{adapter}: the adapter does not record its base model ({PROVENANCE} or "
                "base_model_name_or_path); pass it with --model"
            )
        folder = resolve_model_dir(recorded[0])
        if not folder.is_dir():
            raise CheckpointError(
                f"{adapter}: its base model {recorded[0]} is not a folder here; pass it with --model"
            )
    else:
        folder = resolve_model_dir(model)
    if recorded is not None:
        check_base(adapter, folder, recorded[1])
    return folder


def load_with_adapter(model: str | Path | None, adapter: str | Path | None) -> tuple[Model, Tokenizer, Path]:
    """(model with the adapter attached, tokenizer, base folder); without ``model`` an adapter's
    recorded base is used, without either the embedded model."""
    folder = resolve_model_dir("embedded" if model is None else model)
    if adapter is not None:
        folder = base_of_adapter(adapter, model)
    loaded, tokenizer = load_model(folder)
    if adapter is not None:
        attach_adapter(loaded, adapter)
    return loaded, tokenizer, folder


def attach_adapter(model: Model, folder: str | Path) -> Model:
    """Put an adapter written by ``save_adapter`` (or any PEFT LoRA folder) on a base model, in place.

    A PEFT adapter becomes LoRA slots; an S2FT adapter is merged into the weights (it is a sparse
    update of the original coordinates). A folder that does not fit the model raises CheckpointError.
    """
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():
        return load_peft_adapter(model, folder)
    if (folder / S2FT_INDEX).is_file():
        merge_adapter(model, s2ft_method.load_adapter(folder))
        return model
    raise CheckpointError(
        f"{folder}: not an adapter folder (expected {CONFIG_NAME} for PEFT/LoRA or {S2FT_INDEX} for S2FT)"
    )


def merged_model(model: Model) -> Model:
    """The dense model a fine-tuned model computes, in the base model's original coordinates (a copy;
    an S2FT model is unpermuted in place first)."""
    if "s2ft" in model.meta:
        s2ft_method.unpermute(model)
    return full.to_dense(model)


# ----------------------------------------------------------------------------------------------------
# a fine-tuning run


@dataclass(frozen=True)
class RunConfig:
    """Training settings of ``minift finetune``."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int | None = None
    checkpoint_every: int = 50
    merge: bool = False  # also write the merged model (always done for full fine-tuning)
    progress: bool = True


def finetune(
    model_dir: str | Path,
    data_path: str | Path,
    spec: MethodSpec,
    out_dir: str | Path,
    run: RunConfig,
    *,
    resume: bool = False,
    extend: bool = False,
) -> tuple[Model, TrainResult]:
    """Fine-tune ``model_dir`` on the JSONL file ``data_path`` with ``spec``; write ``out_dir`` (see the
    module docstring). With ``resume`` a run continues from ``out_dir/checkpoints``; with ``extend`` too, a
    finished run trains on to ``run.steps`` (``minift.train.train``: the schedule is re-planned)."""
    out = Path(out_dir)
    model, tokenizer = load_model(model_dir)
    examples = [encode_example(tokenizer, r, max_length=run.max_length) for r in read_jsonl(data_path)]
    data = BatchStream(examples, run.batch_size, tokenizer.pad_id, seed=run.seed)
    calib = [data.batch(i)[:2] for i in range(min(4, data.batches_per_epoch))]
    hooks = apply_method(model, spec, np.random.default_rng(run.seed), calib)
    config = TrainConfig(
        steps=run.steps,
        lr=run.lr,
        schedule=run.schedule,  # type: ignore[arg-type]
        warmup_steps=run.warmup_steps,
        weight_decay=run.weight_decay,
        seed=run.seed,
        checkpoint_every=run.checkpoint_every,
        checkpoint_dir=str(out / "checkpoints"),
        progress=run.progress,
    )
    result = train(model, data, config, grad_hooks=hooks, resume=resume or extend, extend=extend)
    base = str(resolve_model_dir(model_dir))
    adapter = save_adapter(model, out / "adapter", base=str(model_dir))
    trainable = trainable_count(model)
    selection = s2ft_selection(model)  # before merging: that returns the model to original coordinates
    method = asdict(spec)
    if selection:  # S2FT's counts as used (the matched budget's, where the options left them open)
        method |= {k: selection["config"][k] for k in ("heads", "channels")}
    if run.merge or spec.method == "full":
        save_pretrained(merged_model(model), out / "merged", tokenizer_path=resolve_model_dir(model_dir))
    record = {
        "base_model": base,
        "data": str(data_path),
        "method": method,
        "run": asdict(run),
        "trainable_parameters": trainable,
        "s2ft": selection,
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "adapter": None if adapter is None else str(adapter),
    }
    (out / "finetune.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return model, result
