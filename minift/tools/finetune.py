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

The methods, their options (``MethodSpec``) and their adapter formats come from
``minift.methods.registry``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minift.data.datasets import BatchStream, encode_example, read_jsonl
from minift.data.tokenizer import Tokenizer
from minift.errors import CheckpointError
from minift.io.atomic import write_file_atomic
from minift.io.hub import load_pretrained, save_pretrained
from minift.io.provenance import EMBEDDED_NAME, PROVENANCE, check_base, recorded_base, write_provenance
from minift.methods import META_KEY, MethodRecord, full, method_record
from minift.methods import s2ft as s2ft_method
from minift.methods.registry import MethodSpec, apply_method, get_method, load_adapter
from minift.methods.s2ft.permute import layouts_of
from minift.model import Model, trainable_parameters
from minift.tools.pretrain import EMBEDDED
from minift.train import TrainConfig, TrainResult, train


def s2ft_selection(model: Model) -> dict[str, Any] | None:
    """An S2FT model's configuration and, per layer, the query heads and FFN channels it trains
    (original ids); None for other methods."""
    record = method_record(model)
    if record is None or record.name != "s2ft":
        return None
    layers = layouts_of(model)
    return {
        "config": asdict(record.config),
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


def write_adapter(model: Model, folder: str | Path, *, base: str = "") -> Path | None:
    """Write the adapter of the method ``model`` carries (its registry entry says how: a PEFT folder
    for LoRA/PiSSA/SORSA, minift's S2FT adapter for S2FT); None for a method without one (full
    fine-tuning, whose result is the merged model) and for a plain model. With ``base`` (a model folder
    or ``embedded``) the folder also records its base model (``minift.io.provenance``)."""
    record = method_record(model)
    if record is None:
        return None
    base_dir = resolve_model_dir(base) if base else None
    out = get_method(record.name).save_adapter(model, Path(folder), "" if base_dir is None else str(base_dir))
    if out is not None and base_dir is not None:
        record_base(out, base_dir)
    return out


def record_base(adapter: Path, base_dir: Path) -> None:
    """Write the adapter folder's record of its base model (``minift.io.provenance``), naming the
    embedded model by name rather than by its installed path."""
    write_provenance(adapter, base_dir, EMBEDDED_NAME if base_dir == EMBEDDED else None)


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
    """Put an adapter written by ``write_adapter`` (or any PEFT LoRA folder) on a base model, in place.

    A PEFT adapter becomes LoRA slots; an S2FT adapter is merged into the weights (it is a sparse
    update of the original coordinates). A folder that does not fit the model raises CheckpointError.
    """
    return load_adapter(model, folder)


def merged_model(model: Model) -> Model:
    """The dense model a fine-tuned model computes, in the base model's original coordinates: a copy
    that shares no array with ``model``, which is left as it is (an S2FT model stays co-permuted)."""
    dense = full.to_dense(model)
    record = method_record(model)
    if record is not None and record.name == "s2ft":
        # to_dense copied the permuted weights; the record tells how to gather them back
        dense.meta[META_KEY] = MethodRecord("s2ft", record.config, record.state)
        s2ft_method.unpermute(dense)
    return dense


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
    activation_checkpointing: bool = False  # rerun each block's forward in the backward: less memory


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
        activation_checkpointing=run.activation_checkpointing,
    )
    result = train(model, data, config, grad_hooks=hooks, resume=resume or extend, extend=extend)
    base = str(resolve_model_dir(model_dir))
    adapter = write_adapter(model, out / "adapter", base=str(model_dir))
    trainable = trainable_count(model)
    selection = s2ft_selection(model)  # before merging: that returns the model to original coordinates
    method = asdict(spec)
    if selection:  # S2FT's counts as used (the matched budget's, where the options left them open)
        method |= {k: selection["config"][k] for k in ("heads", "channels")}
    if run.merge or adapter is None:  # a method without an adapter (full FT): its result is the merged model
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
    write_file_atomic(out / "finetune.json", (json.dumps(record, indent=2) + "\n").encode())
    return model, result
