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
from minift.io.atomic import replace_folder, write_file_atomic
from minift.io.hf_names import SLOT_MODULES, module_name
from minift.io.jsonio import Fields, read_json_object
from minift.io.safetensors_io import read_safetensors, write_safetensors
from minift.methods import MethodRecord, method_record, record_method
from minift.methods.lora import LoRAConfig, LowRankLinear, low_rank_slots, require_dense
from minift.methods.targets import freeze, replace_slot
from minift.model import SLOT_NAMES, Model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
_MODULE_PATTERN = re.compile(r"[A-Za-z0-9_.\\]{1,200}")
MAX_ALPHA = 2.0**24  # real alphas are 8 to a few thousand
_KEY = re.compile(r"base_model\.model\.(model\.layers\.([0-9]{1,9})\.(\w+\.\w+))\.lora_(A|B)\.weight")
_SLOT_OF = {path: name for name, path in SLOT_MODULES.items()}  # "self_attn.q_proj" → "q"


def hf_module(layer: int, name: str) -> str:
    """A projection's module path in a transformers CausalLM, e.g. ``model.layers.0.self_attn.q_proj``."""
    return f"model.layers.{layer}.{SLOT_MODULES[name]}"


def peft_key(layer: int, name: str, factor: str) -> str:
    """The safetensors key of a LoRA factor ("A" or "B"), as PEFT saves it."""
    return f"base_model.model.{hf_module(layer, name)}.lora_{factor}.weight"


def _check_arch(model: Model) -> None:
    if model.config.arch not in PEFT_ARCHS:
        raise ConfigError(
            f"PEFT adapter folders are supported for {', '.join(PEFT_ARCHS)} models, not "
            f"{model.config.arch!r} (GPT-2 fuses q, k, v into one Conv1D module)"
        )


def peft_factors(slot: LowRankLinear) -> tuple[np.ndarray, np.ndarray, float]:
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
        short = [module_name(n) for n in names]
        return short, (None if layers == list(range(n_layers)) else layers)
    return [hf_module(i, n) for i, n in adapted], None


def export_peft_adapter(
    model: Model, path: str | Path, *, base_model_name_or_path: str = "", bf16: bool = False
) -> Path:
    """Write the model's LoRA/PiSSA/SORSA adapters as a PEFT adapter folder; returns the folder.

    Tensors are written in float32 (bf16 with ``bf16=True``). The folder is written under a temporary
    name and swapped in whole (``minift.io.atomic.replace_folder``), so an interrupted export leaves the
    previous adapter intact, never new weights beside an old config.
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
        A, B, scaling = peft_factors(slot)
        tensors[peft_key(int(layer), name, "A")] = A.astype(np.float32)
        tensors[peft_key(int(layer), name, "B")] = B.astype(np.float32)
        adapted.append((int(layer), name))
        ranks.add(A.shape[0])
        scalings.add(scaling)
    if len(ranks) > 1 or len(scalings) > 1:
        raise ConfigError(f"adapters of different ranks {sorted(ranks)} or scalings cannot share one config")
    r, scaling = ranks.pop(), scalings.pop()
    record = method_record(model)
    is_lora = record is not None and record.name == "lora"  # else the scale is baked into lora_B: scaling 1
    use_rslora = is_lora and bool(record.config.use_rslora)  # type: ignore[union-attr]
    alpha = float(record.config.alpha) if is_lora else scaling * r  # type: ignore[union-attr]
    dropout = float(getattr(record.config, "dropout", 0.0)) if record is not None else 0.0
    targets, layers = _target_spec(adapted, len(model.blocks))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
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
    # one swap of the whole folder: new weights never sit beside an old adapter_config.json
    with replace_folder(folder) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"}, bf16=bf16)
        write_file_atomic(tmp / CONFIG_NAME,
                          (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
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


# PEFT LoraConfig fields that change what an adapter computes, with the value meaning "not used".
# minift does not implement them, so any other value is refused rather than silently ignored.
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "bias": ("none",), "fan_in_fan_out": (False,), "use_dora": (False,),
    "layer_replication": (None,), "exclude_modules": (None, [], ""),
    "lora_bias": (False,), "use_qalora": (False,), "layers_pattern": (None, [], ""),
    "megatron_config": (None,), "loftq_config": ({}, None), "trainable_token_indices": (None,),
    "modules_to_save": (None, []), "target_parameters": (None, []), "eva_config": (None,),
    "corda_config": (None,), "runtime_config": (None, {}, {"ephemeral_gpu_offload": False}),
    "lora_ga_config": (None,), "velora_config": (None,), "alora_invocation_tokens": (None,),
    "monteclora_config": (None,), "use_bdlora": (None, False), "arrow_config": (None,),
    "kasa_config": (None,), "ensure_weight_tying": (False,),
}


def _read_config(folder: Path) -> tuple[Path, dict[str, Any]]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no adapter config (expected a PEFT adapter folder)")
    config = read_json_object(path)
    f = Fields(config, str(path), null_is_default=False)
    f.int("r", 8, lo=1)
    if abs(f.float("lora_alpha", 8)) > MAX_ALPHA:  # finite in JSON, but inf once scaled in float32
        raise f.fail("lora_alpha", f"a number of magnitude at most {MAX_ALPHA:g}", config["lora_alpha"])
    dropout = config.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise f.fail("lora_dropout", "a number in [0, 1)", dropout)
    f.bool("use_rslora", False)
    f.bool("inference_mode", True)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except (re.error, RecursionError, OverflowError) as e:
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
    init = config.get("init_lora_weights", True)
    if not (init is True or init is False or init == "gaussian"):
        raise CheckpointError(
            f"{path}: init_lora_weights={config['init_lora_weights']!r} re-initialises the base weights at"
            " load (PiSSA-style); export such adapters as plain LoRA (true)"
        )
    for key, defaults in _UNSUPPORTED_DEFAULTS.items():
        if key in config and not any(_same(config[key], d) for d in defaults):
            raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported by minift; expected "
                                  f"{' or '.join(json.dumps(d) for d in defaults)}")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise CheckpointError(f"{path}: {key} must map module patterns to numbers, got {pattern!r}")
        for k, v in pattern.items():
            ok = (type(v) is int and v > 0) if kind is int else (_is_number(v) and 0 < v <= MAX_ALPHA)
            if not ok:
                raise CheckpointError(f"{path}: {key}[{k!r}] must be a positive integer/number, got {v!r}")
            # PEFT reads the keys as regular expressions; minift accepts module paths (letters, digits,
            # "_", "." and "\."), which cannot backtrack catastrophically on a hostile pattern
            if not (isinstance(k, str) and _MODULE_PATTERN.fullmatch(k)):
                raise CheckpointError(f"{path}: {key} key {k!r} is not a module path (letters, digits, "
                                      "'_' and '.')")
    return path, config


def _same(value: Any, default: Any) -> bool:
    """JSON equality without Python's 0 == False == 0.0 coercions."""
    return type(value) is type(default) and value == default


def _per_module(config: dict[str, Any], key: str, module: str, default: Any) -> Any:
    """A module's value in PEFT's ``rank_pattern``/``alpha_pattern`` (``get_pattern_key``: the first
    pattern that matches the end of the module path), else the default ``r``/``lora_alpha``."""
    for pattern, value in (config.get(key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


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
    tensors, _ = read_safetensors(weights, floats="LoRA factors")
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    use_rslora = config.get("use_rslora", False) is True

    n = len(model.blocks)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        name = _SLOT_OF.get(m[3]) if m else None
        if m is None or name is None:
            raise CheckpointError(f"{weights}: {key!r} is not the LoRA factor of a Llama-family projection")
        layer = int(m[2])
        if key != peft_key(layer, name, m[4]):  # e.g. layers.00 beside layers.0: one would overwrite
            raise CheckpointError(f"{weights}: {key!r} is not written as PEFT writes it "
                                  f"({peft_key(layer, name, m[4])!r})")
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
    ranks = {(i, s): int(_per_module(config, "rank_pattern", hf_module(i, s), r)) for i, s in targeted}
    for i, s in targeted:
        slot = getattr(model.blocks[i], s)
        rm = ranks[(i, s)]
        expected = {"A": (rm, slot.in_features), "B": (slot.out_features, rm)}
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
                    f"(r={rm} from {config_path}; {slot.out_features}×{slot.in_features} base weight)"
                )

    dense = {(i, s): require_dense(getattr(model.blocks[i], s), i, s) for i, s in targeted}

    freeze(model)
    dropout = float(config.get("lora_dropout", 0.0))
    for (i, s), base in dense.items():
        rm, am = ranks[(i, s)], float(_per_module(config, "alpha_pattern", hf_module(i, s), alpha))
        scaling = am / (math.sqrt(rm) if use_rslora else rm)
        xp, dtype = get_xp(base.weight), base.weight.dtype
        A, B = (to_xp(found[(i, s)][f].astype(dtype), xp) for f in "AB")
        slot = LowRankLinear(base.weight, A, B, scaling, bias=base.bias, dropout=dropout)
        replace_slot(model, i, s, slot)
    lora_config = LoRAConfig(
        r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
        targets=tuple(sorted({s for _, s in targeted}, key=SLOT_NAMES.index)),
        layers=tuple(sorted({i for i, _ in targeted})),
    )
    record_method(model, MethodRecord("lora", lora_config, {"source": str(folder)}))
    return model
