"""Fine-tuning with any method by name: what ``minift finetune``, ``eval``, ``generate`` and ``export``
do, and what ``minift demo`` reuses. The command line stays a thin layer over these functions.

A fine-tuning run writes one folder:

    OUT/
      adapter/          LoRA, PiSSA, SORSA: a PEFT adapter folder (``PeftModel.from_pretrained`` loads it);
                        S2FT: minift's S2FT adapter (original indices + dense blocks); full FT: none
      merged/           the fine-tuned model as a Hugging Face folder (always for full FT; else ``merge``)
      checkpoints/      training checkpoints; a rerun with ``resume`` continues bitwise from the latest
      finetune.json     the run: base model, data, method and its options, training settings, result

The methods, their options (``MethodSpec``) and their adapter formats come from
``minift.methods.registry``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minift.data.datasets import BatchStream, encode_example, read_jsonl
from minift.data.tokenizer import Tokenizer
from minift.errors import CheckpointError
from minift.io.hub import load_pretrained, save_pretrained
from minift.methods import META_KEY, MethodRecord, full, method_record
from minift.methods import s2ft as s2ft_method
from minift.methods.registry import MethodSpec, apply_method, get_method, load_adapter
from minift.model import Model, trainable_parameters
from minift.tools.pretrain import EMBEDDED
from minift.train import TrainConfig, TrainResult, train


def trainable_count(model: Model) -> int:
    return sum(int(a.size) for a in trainable_parameters(model).values())


# ----------------------------------------------------------------------------------------------------
# models, adapters, merged models


def resolve_model_dir(model: str | Path) -> Path:
    """``embedded`` names the shipped base model; anything else is a Hugging Face model folder."""
    return EMBEDDED if str(model) == "embedded" else Path(model)


def load_model(model: str | Path) -> tuple[Model, Tokenizer]:
    """A model folder (or ``embedded``) and its tokenizer."""
    folder = resolve_model_dir(model)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder (expected config.json, model.safetensors)")
    return load_pretrained(folder), Tokenizer.from_pretrained(folder)


def write_adapter(model: Model, folder: str | Path, *, base: str = "") -> Path | None:
    """Write the adapter of the method ``model`` carries (its registry entry says how: a PEFT folder
    for LoRA/PiSSA/SORSA, minift's S2FT adapter for S2FT); None for a method without one (full
    fine-tuning, whose result is the merged model) and for a plain model."""
    record = method_record(model)
    if record is None:
        return None
    return get_method(record.name).save_adapter(model, Path(folder), base)


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


def finetune(
    model_dir: str | Path,
    data_path: str | Path,
    spec: MethodSpec,
    out_dir: str | Path,
    run: RunConfig,
    *,
    resume: bool = False,
) -> tuple[Model, TrainResult]:
    """Fine-tune ``model_dir`` on the JSONL file ``data_path`` with ``spec``; write ``out_dir`` (see the
    module docstring). With ``resume`` a run continues from ``out_dir/checkpoints``."""
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
    result = train(model, data, config, grad_hooks=hooks, resume=resume)
    base = str(resolve_model_dir(model_dir))
    adapter = write_adapter(model, out / "adapter", base=base)
    trainable = trainable_count(model)
    if run.merge or adapter is None:  # a method without an adapter (full FT): its result is the merged model
        save_pretrained(merged_model(model), out / "merged", tokenizer_path=resolve_model_dir(model_dir))
    record = {
        "base_model": base,
        "data": str(data_path),
        "method": asdict(spec),
        "run": asdict(run),
        "trainable_parameters": trainable,
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "adapter": None if adapter is None else str(adapter),
    }
    (out / "finetune.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return model, result
