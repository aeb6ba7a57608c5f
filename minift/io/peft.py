"""Adapters in Hugging Face PEFT's folder format, out and in: ``adapter_config.json`` plus
``adapter_model.safetensors`` (PEFT ``utils/save_and_load.py``), loadable with
``PeftModel.from_pretrained(base, folder)`` on the transformers model of the same base.

Keys and shapes (Llama, Mistral, Qwen2), for every adapted projection of layer i:

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
    lora_A.weight (r, in)      lora_B.weight (out, r)       ΔW = lora_alpha/r · lora_B lora_A

What is written, per method:

- LoRA: A and B as they are, with the run's ``r``, ``lora_alpha`` and ``use_rslora``.
- PiSSA and SORSA train on a residual base, which PEFT does not have. They are written as an exact
  rank-2r LoRA on the *original* weights (PEFT's own PiSSA→LoRA conversion, ``subtract_mutated_init``):

      ΔW = s (B diag(S) A − B₀ diag(S₀) A₀) = [s B, −s B₀] [diag(S) A ; diag(S₀) A₀]
      lora_A = [diag(S) A ; diag(S₀) A₀]  (2r, in),   lora_B = s [B, −B₀]  (out, 2r)

  with the scale baked into lora_B and ``lora_alpha = r = 2R`` (scaling 1), as PEFT's
  ``convert_to_lora`` does (S ≡ 1 for PiSSA).

``target_modules`` is always explicit (with ``null`` PEFT adapts only q and v of a Llama and silently
drops the other tensors). Loading checks more than PEFT does: a tensor for a module that the config
does not target, a missing factor, a wrong rank or a shape that does not fit the base model raise a
``CheckpointError`` naming the key and the file, where PEFT would ignore or warn.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from minift.backend import get_xp, to_numpy, to_xp
from minift.errors import CheckpointError, ConfigError
from minift.io.checkpoint import _write_atomic
from minift.io.jsonio import read_json_object
from minift.io.safetensors_io import read_safetensors, write_safetensors
from minift.methods.lora import LowRankLinear, adapt_slot, low_rank_slots
from minift.methods.targets import HF_MODULES, freeze, replace_slot
from minift.model import SLOT_NAMES, Model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
_KEY = re.compile(r"base_model\.model\.(model\.layers\.(\d+)\.(\w+\.\w+))\.lora_(A|B)\.weight")
_SLOT_OF = {path: name for name, path in HF_MODULES.items()}  # "self_attn.q_proj" → "q"


def hf_module(layer: int, name: str) -> str:
    """A projection's module path in a transformers CausalLM, e.g. ``model.layers.0.self_attn.q_proj``."""
    return f"model.layers.{layer}.{HF_MODULES[name]}"


def peft_key(layer: int, name: str, factor: str) -> str:
    """The safetensors key of a LoRA factor ("A" or "B"), as PEFT saves it."""
    return f"base_model.model.{hf_module(layer, name)}.lora_{factor}.weight"


def _check_arch(model: Model) -> None:
    if model.config.arch not in PEFT_ARCHS:
        raise ConfigError(
            f"PEFT adapter folders are supported for {', '.join(PEFT_ARCHS)} models, not "
            f"{model.config.arch!r} (GPT-2 fuses q, k, v into one Conv1D module)"
        )


def lora_factors(slot: LowRankLinear) -> tuple[np.ndarray, np.ndarray, float]:
    """(lora_A (r', I), lora_B (O, r'), scaling) with scaling · lora_B lora_A = the slot's change of the
    *original* weight, as float64 host arrays (see the module doc)."""
    A, B = to_numpy(slot.A).astype(np.float64), to_numpy(slot.B).astype(np.float64)
    if slot.S is not None:
        A = to_numpy(slot.S).astype(np.float64)[:, None] * A
    if slot.A0 is None or slot.B0 is None:  # LoRA: the frozen weight is the original one
        return A, B, slot.scaling
    A0, B0 = to_numpy(slot.A0).astype(np.float64), to_numpy(slot.B0).astype(np.float64)
    if slot.S0 is not None:
        A0 = to_numpy(slot.S0).astype(np.float64)[:, None] * A0
    return np.concatenate([A, A0], axis=0), slot.scaling * np.concatenate([B, -B0], axis=1), 1.0


def _target_spec(adapted: list[tuple[int, str]], n_layers: int) -> tuple[list[str], list[int] | None]:
    """``target_modules`` and ``layers_to_transform`` that select exactly the adapted projections:
    projection names (+ layer indices) when they form a grid, else every module's full path."""
    layers = sorted({i for i, _ in adapted})
    names = [n for n in SLOT_NAMES if any(m == n for _, m in adapted)]
    if len(adapted) == len(layers) * len(names):
        short = [HF_MODULES[n].split(".")[1] for n in names]
        return short, (None if layers == list(range(n_layers)) else layers)
    return [hf_module(i, n) for i, n in adapted], None


def export_peft_adapter(
    model: Model, path: str | Path, *, base_model_name_or_path: str = "", bf16: bool = False
) -> Path:
    """Write the model's LoRA/PiSSA/SORSA adapters as a PEFT adapter folder; returns the folder.

    Tensors are written in float32 (bf16 with ``bf16=True``). Each file is replaced atomically
    (temporary file + rename), so an interrupted export never leaves a truncated file.
    """
    _check_arch(model)
    slots = low_rank_slots(model)
    if not slots:
        raise ConfigError("the model has no LoRA/PiSSA/SORSA adapter to export")
    tensors: dict[str, np.ndarray] = {}
    adapted, ranks, scalings = [], set(), set()
    for p, slot in slots:
        if slot.merged:
            raise ConfigError(f"{p} is merged: unmerge the adapters before exporting them")
        _, layer, name = p.split(".")
        A, B, scaling = lora_factors(slot)
        tensors[peft_key(int(layer), name, "A")] = A.astype(np.float32)
        tensors[peft_key(int(layer), name, "B")] = B.astype(np.float32)
        adapted.append((int(layer), name))
        ranks.add(A.shape[0])
        scalings.add(scaling)
    if len(ranks) > 1 or len(scalings) > 1:
        raise ConfigError(f"adapters of different ranks {sorted(ranks)} or scalings cannot share one config")
    r, scaling = ranks.pop(), scalings.pop()
    meta = model.meta.get("adapter", {})
    is_lora = meta.get("method") == "lora"  # else the scale is baked into lora_B: scaling 1
    use_rslora = is_lora and bool(meta.get("use_rslora", False))
    alpha = float(meta["alpha"]) if is_lora else scaling * r
    targets, layers = _target_spec(adapted, len(model.blocks))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(meta.get("dropout", 0.0)),
        "use_rslora": use_rslora,
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"}, bf16=bf16)
    _write_atomic(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


# ----------------------------------------------------------------------------------------------------
# loading


def _is_targeted(config: dict[str, Any], module: str, layer: int) -> bool:
    """PEFT's ``check_target_module_exists`` for the keys this format uses."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return targets in ("all-linear",) or re.fullmatch(targets, module) is not None
    if targets is None:
        targets = ["q_proj", "v_proj"]  # PEFT's default for Llama-family models
    if module in targets:
        return True
    if not any(module.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    return layer == layers if isinstance(layers, int) else layer in layers


def _all_ints(values: list[Any]) -> bool:
    return all(type(v) is int for v in values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_config(folder: Path) -> tuple[Path, dict[str, Any]]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no adapter config (expected a PEFT adapter folder)")
    config = read_json_object(path)
    r = config.get("r", 8)
    if not (type(r) is int and r > 0):
        raise CheckpointError(f"{path}: 'r' must be a positive integer, got {r!r}")
    if not _is_number(config.get("lora_alpha", 8)):
        raise CheckpointError(f"{path}: 'lora_alpha' must be a number, got {config['lora_alpha']!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise CheckpointError(f"{path}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise CheckpointError(
                f"{path}: 'target_modules' {targets!r} is not a valid regular expression ({e})"
            ) from None
    elif not (targets is None or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(
            f"{path}: 'target_modules' must be a string or a list of strings, got {targets!r}"
        )
    layers = config.get("layers_to_transform")
    if not (layers is None or type(layers) is int or (isinstance(layers, list) and _all_ints(layers))):
        raise CheckpointError(
            f"{path}: 'layers_to_transform' must be null, an integer or a list of integers, got {layers!r}"
        )
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type={config.get('peft_type')!r}; minift loads 'LORA' adapters")
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise CheckpointError(
            f"{path}: init_lora_weights={config['init_lora_weights']!r} re-initialises the base weights at"
            " load (PiSSA-style); export such adapters as plain LoRA (true)"
        )
    for key, expected in (("bias", "none"), ("fan_in_fan_out", False), ("use_dora", False)):
        if config.get(key, expected) != expected:
            raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported; expected {expected!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise CheckpointError(f"{path}: {key} (per-module ranks) is not supported; expected {{}}")
    return path, config


def load_peft_adapter(model: Model, path: str | Path) -> Model:
    """Freeze ``model`` and attach the LoRA adapter of a PEFT folder to it (in place; returns it).

    Everything is checked before the model is touched: unknown or untargeted tensors, missing factors,
    ranks and shapes raise ``CheckpointError`` naming the key and the file.
    """
    _check_arch(model)
    folder = Path(path)
    config_path, config = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a PEFT adapter folder holds {WEIGHTS_NAME})")
    tensors, _ = read_safetensors(weights)
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    use_rslora = bool(config.get("use_rslora", False))

    n = len(model.blocks)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        name = _SLOT_OF.get(m[3]) if m else None
        if m is None or name is None:
            raise CheckpointError(f"{weights}: {key!r} is not the LoRA factor of a Llama-family projection")
        layer = int(m[2])
        if layer >= n:
            raise CheckpointError(f"{weights}: tensor {key!r} is for layer {layer}, the model has {n} layers")
        if not _is_targeted(config, m[1], layer):
            raise CheckpointError(
                f"{weights}: tensor {key!r} is for {m[1]}, which target_modules in {config_path} does not "
                "select (PEFT would silently ignore it)"
            )
        found.setdefault((layer, name), {})[m[4]] = value

    targeted = [
        (i, s) for i in range(n) for s, _ in model.blocks[i].slots()
        if _is_targeted(config, hf_module(i, s), i)
    ]
    if not targeted:
        raise CheckpointError(f"{config_path}: target_modules selects no projection of this model")
    for i, s in targeted:
        slot = getattr(model.blocks[i], s)
        expected = {"A": (r, slot.in_features), "B": (slot.out_features, r)}
        for factor, shape in expected.items():
            key = peft_key(i, s, factor)
            if factor not in found.get((i, s), {}):
                raise CheckpointError(
                    f"{weights}: missing tensor {key!r} ({config_path} targets {hf_module(i, s)})"
                )
            got = found[(i, s)][factor].shape
            if got != shape:
                raise CheckpointError(
                    f"{weights}: tensor {key!r} has shape {got}, expected {shape} "
                    f"(r={r} from {config_path}; {slot.out_features}×{slot.in_features} base weight)"
                )

    dense = {(i, s): adapt_slot(getattr(model.blocks[i], s), i, s) for i, s in targeted}

    freeze(model)
    scaling = alpha / (math.sqrt(r) if use_rslora else r)
    dropout = float(config.get("lora_dropout", 0.0))
    for (i, s), base in dense.items():
        xp, dtype = get_xp(base.weight), base.weight.dtype
        A, B = (to_xp(found[(i, s)][f].astype(dtype), xp) for f in "AB")
        slot = LowRankLinear(base.weight, A, B, scaling, bias=base.bias, dropout=dropout)
        replace_slot(model, i, s, slot)
    model.meta["adapter"] = {
        "method": "lora", "r": r, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora,
        "targets": sorted({s for _, s in targeted}, key=SLOT_NAMES.index),
        "layers": sorted({i for i, _ in targeted}), "source": str(folder),
    }
    return model
