"""Hugging Face model folders in and out: Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text) and GPT-2.

``load_pretrained(folder)`` reads ``config.json`` (the transformers 4 format with top-level
``rope_theta``/``rope_scaling`` and the transformers 5 ``rope_parameters`` format), ``model.safetensors``
or a sharded ``model.safetensors.index.json``, and ``generation_config.json`` when present. Every tensor's
name, shape and dtype is checked against the config before any math; a missing, extra, misshapen or
corrupt tensor raises ``CheckpointError`` naming the file and the key. Pickle files
(``pytorch_model.bin``) are refused: unpickling can execute arbitrary code.

``save_pretrained(model, folder)`` writes a folder transformers loads (``config.json`` in the format of
the architecture, ``model.safetensors`` with metadata ``{"format": "pt"}``, ``generation_config.json``,
tokenizer files when known). It saves each slot's effective weight (``slot.dense_weight()``), so a model
with merged or unmerged adapters is written as the dense model it computes.

What ``load_pretrained`` leaves in ``model.meta``:

    source             str, the folder read
    hf_config          dict, config.json as read
    tokenizer_path     str | None, the folder's tokenizer.json (its tokenizer_config.json and
                       chat_template.jinja, when present, lie beside it)
    generation_config  dict | None, generation_config.json as read

Sliding windows become ``ModelConfig.sliding_window`` and ``layer_types``: Mistral's ``sliding_window``
applies to every layer; Qwen2/Qwen3 apply it only with ``use_sliding_window``, to the layers that
``layer_types`` marks ``sliding_attention`` (transformers 5), else to layers i >= ``max_window_layers``.
Gemma 3 (``gemma3_text``) applies it to the layers ``layer_types`` marks, else (transformers 4's
``sliding_window_pattern`` P, default 6) to every layer but each P-th; its sliding layers rotate by their
own base: ``rope_parameters["sliding_attention"]`` (5) or ``rope_local_base_freq`` (4), while
``rope_parameters["full_attention"]`` or ``rope_theta`` with ``rope_scaling`` (4) apply to the others.
Keys a Gemma 3 config.json leaves out take ``Gemma3TextConfig``'s defaults. Softcapping
(``attn_logit_softcapping``, ``final_logit_softcapping``) and bidirectional attention are refused. A
multimodal ``gemma3`` folder is read as its decoder: ``text_config``, and the tensors under
``language_model.model.`` (or ``model.language_model.``); the vision tower and projector are skipped.

Name and layout rules (as transformers' ``modeling_llama.py`` and ``modeling_gpt2.py`` save them):
- Llama family: ``model.layers.{i}.self_attn.q_proj.weight`` etc., PyTorch's [out, in] layout as minift.
- GPT-2: an optional ``transformer.`` prefix; ``Conv1D`` weights are stored [in, out] and transposed once
  here; ``attn.c_attn`` holds q, k and v side by side ([C, 3C]) and is split into three slots.
- Skipped by exact name: ``model.layers.{i}.self_attn.rotary_emb.inv_freq`` (old Llama checkpoints) and
  GPT-2's causal-mask buffers ``h.{i}.attn.bias`` / ``h.{i}.attn.masked_bias``.
- Tied heads (``tie_word_embeddings``): no ``lm_head.weight`` in the file, the logits reuse the token
  embedding; a stored copy must equal the embedding. An untied config without ``lm_head.weight`` is a
  missing tensor (transformers would initialise a random head there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from minift.backend import Array, to_numpy, to_xp
from minift.config import ModelConfig, RopeScaling
from minift.errors import CheckpointError, ConfigError
from minift.io.atomic import replace_folder, write_file_atomic
from minift.io.hf_names import GEMMA3_MODULES, GPT2_MODULES, LLAMA_MODULES
from minift.io.hfconfig import check_hf_config, check_token_ids
from minift.io.jsonio import read_json_object
from minift.io.safetensors_io import (
    FLOAT_CODES,
    TensorInfo,
    check_finite,
    read_header,
    read_tensor,
    write_safetensors,
)
from minift.model import Block, Model, named_modules, slot_shapes
from minift.slots import Dense, Embedding, Norm

ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                "gpt2": "GPT2LMHeadModel"}
MODEL_TYPES = {arch: arch for arch in ARCH_CLASSES} | {"gemma3": "gemma3_text"}  # minift arch → model_type
_ARCH_OF = {model_type: arch for arch, model_type in MODEL_TYPES.items()}
# Gemma3TextConfig's defaults for the keys minift reads: a config.json may leave any of them out.
GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation":
    "gelu_pytorch_tanh", "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "pad_token_id": 0,
    "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "attention_bias": False,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}
GEMMA3_REFUSED = {"attn_logit_softcapping": None, "final_logit_softcapping": None,
                  "use_bidirectional_attention": False}  # key → the only value minift computes
ROPE_TYPES = ("default", "linear", "llama3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")

# minift holder name → HF module name inside one block
_LLAMA_NAMES = LLAMA_MODULES
_GPT2_NAMES = GPT2_MODULES  # q, k, v live together in attn.c_attn
_CONV1D = ("o", "up", "down")  # GPT-2 slots stored by Conv1D as [in, out]
# The multimodal Gemma 3 (Gemma3ForConditionalGeneration) keeps its decoder under another prefix
# (transformers 5: model.language_model., 4: language_model.model.) beside a vision tower, which is skipped.
_MULTIMODAL_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                        "language_model.lm_head.": "lm_head."}
_VISION = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\..*")
_SKIPPED = {  # buffers that are not parameters, matched by their whole name
    "llama": re.compile(r"model\.layers\.[0-9]+\.self_attn\.rotary_emb\.inv_freq"),
    "gpt2": re.compile(r"transformer\.h\.[0-9]+\.attn\.(masked_)?bias"),
}


# ----------------------------------------------------------------------------------------------------
# config.json


def _rope_from_hf(cfg: Mapping[str, Any], source: str) -> tuple[float, RopeScaling]:
    """θ and the scaling, from v4 ``rope_theta``/``rope_scaling`` or v5 ``rope_parameters``.

    Mirrors transformers' ``standardize_rope_params``: a non-empty ``rope_scaling`` wins over
    ``rope_parameters``; the type is ``rope_type`` (legacy key ``type``), else "default".
    """
    scaling = cfg.get("rope_scaling")
    params = scaling if isinstance(scaling, dict) and scaling else cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be a JSON object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported RoPE type {kind!r} (rope_type); minift supports "
                          f"{', '.join(ROPE_TYPES)}")
    try:
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if kind == "default":
            return theta, RopeScaling()
        if kind == "linear":
            return theta, RopeScaling(kind, float(params["factor"]))
        rs = RopeScaling(
            kind=kind,
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
            ),
        )
    except KeyError:
        raise ConfigError(f"{source}: {kind} RoPE scaling needs a 'factor'") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: rope_theta and the RoPE scaling parameters must be numbers, got "
                          f"rope_theta={cfg.get('rope_theta')!r} and {dict(params)}") from None
    return theta, rs


def _require(cfg: Mapping[str, Any], source: str, *keys: str) -> Any:
    """The first of ``keys`` present in the config (aliases), or a ConfigError naming it."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise ConfigError(f"{source}: missing required key {keys[0]!r}")


def _eos_ids(value: Any, source: str) -> tuple[int, ...]:
    """``eos_token_id``: an int, a list of ints (e.g. Llama-3-Instruct), or null."""
    ids = () if value is None else tuple(value) if isinstance(value, list) else (value,)
    if not all(type(i) is int for i in ids):
        raise ConfigError(f"{source}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return ids


def config_from_hf(cfg: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Map a Hugging Face ``config.json`` dict onto ``ModelConfig``; unsupported settings are errors."""
    check_hf_config(cfg, source)  # types and ranges first: nothing below coerces or allocates
    model_type = cfg.get("model_type")
    if model_type == "gemma3":  # the multimodal model: its decoder is text_config, the vision tower is left
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: a gemma3 (multimodal) config needs its decoder in 'text_config', "
                              f"a JSON object; got {text!r}")
        tie = {"tie_word_embeddings": cfg["tie_word_embeddings"]} if "tie_word_embeddings" in cfg else {}
        return config_from_hf(text | tie | {"model_type": "gemma3_text"}, source=f"{source}: text_config")
    if model_type not in _ARCH_OF:
        raise ConfigError(f"{source}: unsupported architecture model_type={model_type!r}; minift supports "
                          f"{', '.join(_ARCH_OF)}")
    arch = _ARCH_OF[model_type]
    if arch == "gemma3":
        cfg = GEMMA3_DEFAULTS | dict(cfg)
    common: dict[str, Any] = {
        "arch": arch, "vocab_size": _require(cfg, source, "vocab_size"),
        "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": _eos_ids(cfg.get("eos_token_id"), source),
        "pad_token_id": cfg.get("pad_token_id"),
    }
    if arch == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{source}: unsupported activation_function {act!r}; minift's GPT-2 uses the "
                              "tanh GELU (gelu_new)")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if cfg.get(key, ok) != ok:
                raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported (expected {ok})")
        C = _require(cfg, source, "n_embd", "hidden_size")
        fields = {"hidden_size": C, "intermediate_size": cfg.get("n_inner") or 4 * C,
                  "n_layers": _require(cfg, source, "n_layer", "num_hidden_layers"),
                  "n_heads": _require(cfg, source, "n_head", "num_attention_heads"),
                  "norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
                  "max_position_embeddings": _require(cfg, source, "n_positions", "max_position_embeddings"),
                  "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
                  "qkv_bias": True, "o_bias": True, "mlp_bias": True}
    elif arch == "gemma3":
        fields = _gemma3_from_hf(cfg, source)
    else:
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{source}: unsupported hidden_act {act!r}; the Llama family uses silu")
        theta, scaling = _rope_from_hf(cfg, source)
        C, H = _require(cfg, source, "hidden_size"), _require(cfg, source, "num_attention_heads")
        attention_bias = bool(cfg.get("attention_bias", False)) if arch in ("llama", "qwen3") else False
        fields = {"hidden_size": C, "intermediate_size": _require(cfg, source, "intermediate_size"),
                  "n_layers": _require(cfg, source, "num_hidden_layers"), "n_heads": H,
                  "n_kv_heads": cfg.get("num_key_value_heads") or H,
                  "head_dim": cfg.get("head_dim") or (C // H if isinstance(C, int) and H else None),
                  "norm_eps": cfg.get("rms_norm_eps", 1e-6), "rope_theta": theta, "rope_scaling": scaling,
                  "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
                  "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
                  "qkv_bias": attention_bias or arch == "qwen2",  # Qwen2 hard-codes q, k, v biases
                  "o_bias": attention_bias,
                  "mlp_bias": bool(cfg.get("mlp_bias", False)) if arch == "llama" else False,
                  "qk_norm": arch == "qwen3", **_windows_from_hf(cfg, source)}
    try:
        return ModelConfig(**common, **fields)
    except (TypeError, ValueError) as e:  # ConfigError included; TypeError/ValueError: e.g. "2" as an id
        raise ConfigError(f"{source}: {e}") from None


def _gemma3_from_hf(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The ModelConfig fields of a ``gemma3_text`` config (defaults already filled in)."""
    for key, ok in GEMMA3_REFUSED.items():
        if cfg.get(key) not in (None, ok):  # null is transformers' default for each of them
            raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported (minift computes Gemma 3 with "
                              f"{key}={json.dumps(ok)})")
    act = cfg["hidden_activation"]
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ConfigError(f"{source}: unsupported hidden_activation {act!r}; minift's Gemma 3 uses the tanh "
                          "GELU (gelu_pytorch_tanh)")
    n_layers, types = cfg["num_hidden_layers"], cfg.get("layer_types")
    if types is None:  # transformers 4: every P-th layer is global, the others slide
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        if type(pattern) is not int or pattern < 1 or type(n_layers) is not int:
            raise ConfigError(f"{source}: sliding_window_pattern must be a positive integer, got {pattern!r}")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list):
        raise ConfigError(f"{source}: layer_types must be a list, got {types!r}")
    full, local = _gemma3_rope_parameters(cfg, source)
    theta, scaling = _rope_from_hf({"rope_parameters": full,
                                    "max_position_embeddings": cfg["max_position_embeddings"]},
                                   f"{source}: rope_parameters.full_attention")
    local_theta, local_scaling = _rope_from_hf({"rope_parameters": local},
                                               f"{source}: rope_parameters.sliding_attention")
    if local_scaling.kind != "default":
        raise ConfigError(f"{source}: rope_parameters.sliding_attention has rope_type "
                          f"{local_scaling.kind!r}; minift rotates Gemma 3's sliding layers unscaled")
    bias = bool(cfg["attention_bias"])
    return {"hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
            "n_layers": n_layers, "n_heads": cfg["num_attention_heads"],
            "n_kv_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_dim"],
            "norm_eps": cfg["rms_norm_eps"], "rope_theta": theta, "rope_scaling": scaling,
            "rope_local_theta": local_theta, "max_position_embeddings": cfg["max_position_embeddings"],
            "tie_word_embeddings": bool(cfg["tie_word_embeddings"]), "qkv_bias": bias, "o_bias": bias,
            "qk_norm": True, "query_pre_attn_scalar": cfg["query_pre_attn_scalar"],
            "sliding_window": cfg["sliding_window"], "layer_types": tuple(types)}


def _gemma3_rope_parameters(cfg: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(full_attention, sliding_attention) RoPE parameters, as transformers' Gemma3TextConfig builds them:
    ``rope_parameters`` keyed by layer type (5), then 4's ``rope_scaling`` merged into the global layers',
    ``rope_theta`` and ``rope_local_base_freq`` as their bases where the parameters name none."""
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, dict) or not set(params) <= {"full_attention", "sliding_attention"}:
        raise ConfigError(f"{source}: rope_parameters of a gemma3_text config must map 'full_attention' and "
                          f"'sliding_attention' to their RoPE parameters, got {params!r}")
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        full.update(scaling)
    full.setdefault("rope_theta", cfg["rope_theta"])
    local.setdefault("rope_theta", cfg["rope_local_base_freq"])
    return full, local


def _windows_from_hf(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` as transformers applies them (see the module docstring)."""
    arch = cfg.get("model_type")
    if arch == "mistral":
        return {"sliding_window": cfg.get("sliding_window")}
    if arch not in ("qwen2", "qwen3") or not cfg.get("use_sliding_window"):
        return {}
    if cfg.get("sliding_window") is None:
        return {}
    n_layers = cfg.get("num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 28)
        if type(first) is not int or type(n_layers) is not int:
            raise ConfigError(f"{source}: max_window_layers and num_hidden_layers must be integers")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list):
        raise ConfigError(f"{source}: layer_types must be a list, got {types!r}")
    return {"sliding_window": cfg["sliding_window"], "layer_types": tuple(types)}


def _windows_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The sliding-window keys of config.json for the architecture (inverse of ``_windows_from_hf``)."""
    c = config
    types = ["sliding_attention" if c.window(i) is not None else "full_attention" for i in range(c.n_layers)]
    if c.arch == "mistral":
        if len(set(types)) > 1:
            raise ConfigError("a mistral config.json applies sliding_window to every layer or none: it "
                              f"cannot express layer_types={types}")
        return {"sliding_window": c.sliding_window}
    if c.arch == "gemma3":  # transformers 4.50-4.52 read only the pattern: every P-th layer global
        patterns = [P for P in range(1, c.n_layers + 2)
                    if types == ["full_attention" if (i + 1) % P == 0 else "sliding_attention"
                                 for i in range(c.n_layers)]]
        pattern = {"sliding_window_pattern": patterns[0]} if patterns else {}
        return {"sliding_window": c.sliding_window, "layer_types": types} | pattern
    if c.arch in ("qwen2", "qwen3"):
        n_full = types.index("sliding_attention") if "sliding_attention" in types else c.n_layers
        return {"use_sliding_window": c.sliding_window is not None, "sliding_window": c.sliding_window,
                "max_window_layers": n_full, "layer_types": types}
    if c.sliding_window is not None:
        raise ConfigError(f"a {c.arch} config.json cannot express a sliding window")
    return {}


def rope_to_hf(theta: float, scaling: RopeScaling) -> dict[str, Any]:
    """The ``rope_parameters`` dict of θ and a scaling (transformers 5; ``rope_scaling`` in 4 without θ)."""
    rope: dict[str, Any] = {"rope_type": scaling.kind}
    if scaling.kind != "default":
        rope["factor"] = scaling.factor
    if scaling.kind == "llama3":
        rope |= {"low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                 "original_max_position_embeddings": scaling.original_max_position_embeddings}
    return rope | {"rope_theta": theta}


def config_to_hf(config: ModelConfig, *, dtype: Any = np.float32) -> dict[str, Any]:
    """A ``config.json`` dict for the architecture, loadable by transformers 4 and 5.

    RoPE is written both ways: ``rope_theta``/``rope_scaling`` (read by transformers 4) and
    ``rope_parameters`` (the transformers 5 form); both describe the same tables.
    """
    c = config
    eos = c.eos_token_id[0] if len(c.eos_token_id) == 1 else (list(c.eos_token_id) or None)
    out: dict[str, Any] = {"architectures": [ARCH_CLASSES[c.arch]], "model_type": MODEL_TYPES[c.arch],
                           "vocab_size": c.vocab_size, "bos_token_id": c.bos_token_id,
                           "eos_token_id": eos, "pad_token_id": c.pad_token_id,
                           "tie_word_embeddings": c.tie_word_embeddings, "dtype": np.dtype(dtype).name}
    if c.arch == "gpt2":
        return out | {"n_embd": c.hidden_size, "n_inner": c.intermediate_size, "n_layer": c.n_layers,
                      "n_head": c.n_heads, "n_positions": c.max_position_embeddings,
                      "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
                      "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                      "reorder_and_upcast_attn": False}
    # What each family can express: Llama's attention_bias covers q, k, v and o together; Qwen2 always
    # has q, k, v biases and nothing else; Mistral has no biases at all.
    can = {"llama": c.qkv_bias == c.o_bias,
           "qwen3": c.qkv_bias == c.o_bias and not c.mlp_bias,
           "gemma3": c.qkv_bias == c.o_bias and not c.mlp_bias,
           "qwen2": c.qkv_bias and not c.o_bias and not c.mlp_bias,
           "mistral": not (c.qkv_bias or c.o_bias or c.mlp_bias)}[c.arch]
    gemma_keys = c.query_pre_attn_scalar is not None or c.rope_local_theta is not None
    if not can or c.qk_norm != (c.arch in ("qwen3", "gemma3")) or (gemma_keys and not c.gemma):
        raise ConfigError(f"a {c.arch} config.json cannot express qkv_bias={c.qkv_bias}, o_bias={c.o_bias}, "
                          f"mlp_bias={c.mlp_bias}, qk_norm={c.qk_norm}, query_pre_attn_scalar="
                          f"{c.query_pre_attn_scalar}, rope_local_theta={c.rope_local_theta}")
    rs = c.rope_scaling
    rope = rope_to_hf(c.rope_theta, rs)
    del rope["rope_theta"]
    out |= {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
            "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_theta, "rope_scaling": rope if rs.kind != "default" else None,
            "rope_parameters": rope | {"rope_theta": c.rope_theta}}
    if c.arch == "llama":
        out |= {"attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias}
    if c.arch in ("qwen3", "gemma3"):
        out["attention_bias"] = c.qkv_bias
    if c.gemma:  # rope_parameters by layer type (5); rope_theta, rope_scaling, rope_local_base_freq (4)
        del out["hidden_act"]
        theta = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
        if c.rope_local_theta is None and rs.kind != "default" and c.sliding_window is not None:
            raise ConfigError("a gemma3_text config.json rotates sliding layers unscaled: set "
                              "rope_local_theta to give them their own base")
        local = rope_to_hf(theta, RopeScaling())
        out |= {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": c.query_pre_attn_scalar
                or c.head_dim, "rope_local_base_freq": theta, "attn_logit_softcapping": None,
                "final_logit_softcapping": None, "use_bidirectional_attention": False,
                "rope_parameters": {"full_attention": out["rope_parameters"], "sliding_attention": local}}
    return out | _windows_to_hf(c)


# ----------------------------------------------------------------------------------------------------
# tensor names and layouts


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every array of a dense model by minift path (``blocks.0.q.weight``), with its shape."""
    c = config
    C, V = c.hidden_size, c.vocab_size
    gpt2 = c.arch == "gpt2"
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (V, C)}
    if gpt2:
        shapes["pos_embed.weight"] = (c.max_position_embeddings, C)

    def norm(path: str) -> None:
        shapes[f"{path}.weight"] = (C,)
        if gpt2:
            shapes[f"{path}.bias"] = (C,)

    for i in range(c.n_layers):
        p = f"blocks.{i}"
        norm(f"{p}.attn_norm")
        norm(f"{p}.mlp_norm")
        if c.qk_norm:
            shapes[f"{p}.q_norm.weight"] = (c.head_dim,)
            shapes[f"{p}.k_norm.weight"] = (c.head_dim,)
        if c.gemma:
            norm(f"{p}.post_attn_norm")
            norm(f"{p}.post_mlp_norm")
        for name, (n_out, n_in, bias) in slot_shapes(c).items():
            shapes[f"{p}.{name}.weight"] = (n_out, n_in)
            if bias:
                shapes[f"{p}.{name}.bias"] = (n_out,)
    norm("final_norm")
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _hf_key(config: ModelConfig, key: str) -> tuple[str, bool]:
    """The HF name of one minift array and whether it is a Conv1D weight stored transposed.

    (GPT-2's q, k, v are not one-to-one; ``to_hf_tensors`` fuses them.)
    """
    if key == "lm_head.weight":
        return key, False
    head, _, leaf = key.rpartition(".")
    if config.arch == "gpt2":
        top = {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "final_norm": "transformer.ln_f"}
        if head in top:
            return f"{top[head]}.{leaf}", False
        _, i, holder = head.split(".")
        return f"transformer.h.{i}.{_GPT2_NAMES[holder]}.{leaf}", leaf == "weight" and holder in _CONV1D
    top = {"embed": "model.embed_tokens", "final_norm": "model.norm"}
    if head in top:
        return f"{top[head]}.{leaf}", False
    _, i, holder = head.split(".")
    names = GEMMA3_MODULES if config.gemma else _LLAMA_NAMES
    return f"model.layers.{i}.{names[holder]}.{leaf}", False


def _in_c_attn(config: ModelConfig, key: str) -> bool:
    """Whether a minift array is one third of GPT-2's fused ``attn.c_attn``."""
    parts = key.split(".")
    return config.arch == "gpt2" and parts[0] == "blocks" and parts[2] in ("q", "k", "v")


def _c_attn_key(key: str) -> str:
    """``blocks.{i}.q.weight`` → ``transformer.h.{i}.attn.c_attn.weight`` (and k, v, biases alike)."""
    _, i, _, leaf = key.split(".")
    return f"transformer.h.{i}.attn.c_attn.{leaf}"


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, by HF name, with its stored shape."""
    shapes = {}
    C = config.hidden_size
    for key, shape in parameter_shapes(config).items():
        if _in_c_attn(config, key):
            leaf = key.rpartition(".")[2]
            shapes[_c_attn_key(key)] = (C, 3 * C) if leaf == "weight" else (3 * C,)
            continue
        name, transposed = _hf_key(config, key)
        shapes[name] = shape[::-1] if transposed else shape
    return shapes


def to_hf_tensors(config: ModelConfig, arrays: Mapping[str, Array]) -> dict[str, np.ndarray]:
    """minift arrays (all of ``parameter_shapes``' keys: a state or a full gradient) → HF names and layouts.

    Host NumPy arrays, contiguous, ready to be written. GPT-2's q, k, v are concatenated into c_attn and
    its Conv1D weights transposed to [in, out].
    """
    out: dict[str, np.ndarray] = {}
    for key in parameter_shapes(config):
        if key not in arrays:
            raise KeyError(f"{key!r} is missing: to_hf_tensors needs every array of the model")
        if _in_c_attn(config, key):
            _, i, slot, leaf = key.split(".")
            if slot == "q":  # fuse once, at q
                fused = np.concatenate([to_numpy(arrays[f"blocks.{i}.{s}.{leaf}"]) for s in "qkv"])
                out[_c_attn_key(key)] = np.ascontiguousarray(fused.T)  # (C, 3C) or (3C,)
            continue
        name, transposed = _hf_key(config, key)
        a = to_numpy(arrays[key])
        out[name] = np.ascontiguousarray(a.T if transposed else a)
    return out


def from_hf_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``to_hf_tensors``: HF names and layouts → minift paths and [out, in] weights."""
    out: dict[str, np.ndarray] = {}
    C = config.hidden_size
    for key in parameter_shapes(config):
        if _in_c_attn(config, key):
            j = "qkv".index(key.split(".")[2])
            part = tensors[_c_attn_key(key)].T[j * C:(j + 1) * C]  # (C, C) rows of [q | k | v], or (C,)
            out[key] = np.ascontiguousarray(part)
            continue
        name, transposed = _hf_key(config, key)
        out[key] = np.ascontiguousarray(tensors[name].T) if transposed else tensors[name]
    return out


def model_state(model: Model) -> dict[str, Array]:
    """Every array of the dense model the given one computes, by minift path.

    Linear slots contribute their effective weight ``dense_weight()`` (adapters included) and their
    ``bias`` attribute, when they have one.
    """
    state: dict[str, Array] = {}
    for path, holder in named_modules(model):
        if isinstance(holder, Embedding | Norm):
            state[f"{path}.weight"] = holder.weight
            if getattr(holder, "bias", None) is not None:
                state[f"{path}.bias"] = holder.bias
        else:
            state[f"{path}.weight"] = holder.dense_weight()
            bias = getattr(holder, "bias", None)
            if bias is not None:
                state[f"{path}.bias"] = bias
    return state


def model_from_state(config: ModelConfig, state: Mapping[str, Array], *, xp: ModuleType = np,
                     meta: dict[str, Any] | None = None) -> Model:
    """A frozen dense ``Model`` holding the given arrays (keys as ``parameter_shapes``), moved to ``xp``."""

    def get(key: str) -> Array | None:
        return to_xp(state[key], xp) if key in state else None

    def norm(path: str, *, per_head: bool = False) -> Norm:
        return Norm(get(f"{path}.weight"), get(f"{path}.bias"), config.norm_eps, per_head=per_head,
                    unit_offset=config.gemma)

    def dense(path: str) -> Dense:
        return Dense(get(f"{path}.weight"), get(f"{path}.bias"))

    blocks = [
        Block(attn_norm=norm(f"blocks.{i}.attn_norm"), q=dense(f"blocks.{i}.q"), k=dense(f"blocks.{i}.k"),
              v=dense(f"blocks.{i}.v"), o=dense(f"blocks.{i}.o"), mlp_norm=norm(f"blocks.{i}.mlp_norm"),
              gate=dense(f"blocks.{i}.gate") if config.arch != "gpt2" else None,
              up=dense(f"blocks.{i}.up"), down=dense(f"blocks.{i}.down"),
              q_norm=norm(f"blocks.{i}.q_norm", per_head=True) if config.qk_norm else None,
              k_norm=norm(f"blocks.{i}.k_norm", per_head=True) if config.qk_norm else None,
              post_attn_norm=norm(f"blocks.{i}.post_attn_norm") if config.gemma else None,
              post_mlp_norm=norm(f"blocks.{i}.post_mlp_norm") if config.gemma else None)
        for i in range(config.n_layers)
    ]
    return Model(
        config=config,
        embed=Embedding(get("embed.weight")),
        blocks=blocks,
        final_norm=norm("final_norm"),
        lm_head=None if config.tie_word_embeddings else dense("lm_head"),
        pos_embed=Embedding(get("pos_embed.weight")) if config.arch == "gpt2" else None,
        meta=meta if meta is not None else {},
    )


# ----------------------------------------------------------------------------------------------------
# loading


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the OS cannot hold (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _weight_files(folder: Path) -> dict[Path, set[str] | None]:
    """The safetensors files to read, each with the names the index assigns to it (None: single file)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return {single: None}
    if index.is_file():
        data = read_json_object(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        if not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' is empty: it must list every tensor's shard")
        files: dict[Path, set[str] | None] = {}
        for name, shard in weight_map.items():
            path = folder / shard
            if Path(shard).name != shard or not _is_file(path):
                raise CheckpointError(f"{index}: tensor {name!r} is mapped to {shard!r}, which is not a "
                                      f"file in {folder}")
            names = files.setdefault(path, set())
            assert names is not None
            names.add(name)
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder}: only PyTorch pickle weights ({', '.join(pickles)}) and no model.safetensors. minift "
            "never unpickles: loading a pickle can execute arbitrary code. Convert the folder once, where "
            "you trust its source, with transformers: AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder) writes model.safetensors."
        )
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _canonical(config: ModelConfig, name: str) -> str:
    """The name as transformers' own save_pretrained writes it (GPT-2: with the ``transformer.`` prefix)."""
    if config.arch == "gpt2" and name != "lm_head.weight" and not name.startswith("transformer."):
        return f"transformer.{name}"
    return name


def _locate_tensors(config: ModelConfig, files: Mapping[Path, set[str] | None], *, multimodal: bool = False
                    ) -> dict[str, tuple[Path, str, TensorInfo]]:
    """Check every file's tensors against the config; return HF name → (file, name in file, info).
    ``multimodal``: a Gemma 3 folder with a vision tower; only its decoder's tensors are read.

    Raises CheckpointError for a corrupt header, a tensor the index puts elsewhere, a duplicate, an
    unexpected or missing tensor, a wrong shape or a non-float dtype, naming the file and the key.
    """
    expected = hf_tensor_shapes(config)
    skipped = _SKIPPED["gpt2" if config.arch == "gpt2" else "llama"]
    found: dict[str, tuple[Path, str, TensorInfo]] = {}
    for path, listed in files.items():
        infos, _ = read_header(path)
        if listed is not None and set(infos) != listed:
            missing = sorted(listed - set(infos))
            extra = sorted(set(infos) - listed)
            raise CheckpointError(f"{path}: does not match model.safetensors.index.json: "
                                  f"listed but absent {missing[:5]}, present but not listed {extra[:5]}")
        for name, info in infos.items():
            key = _canonical(config, name)
            if multimodal:
                if _VISION.fullmatch(key):
                    continue
                prefix = next((p for p in _MULTIMODAL_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    key = _MULTIMODAL_PREFIXES[prefix] + key[len(prefix):]
            if skipped.fullmatch(key):
                continue
            if key in found:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in {found[key][0]}")
            if key == "lm_head.weight" and config.tie_word_embeddings:
                shape = expected[_hf_key(config, "embed.weight")[0]]
            elif key not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} for this {config.arch} config "
                                      f"(config.json); expected names like {next(iter(expected))!r}")
            else:
                shape = expected[key]
            if info.shape != shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {list(info.shape)}, expected "
                                      f"{list(shape)} from config.json")
            if info.dtype not in FLOAT_CODES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.dtype}, expected one of "
                                      f"{', '.join(FLOAT_CODES)}")
            found[key] = (path, name, info)
    missing = [k for k in expected if k not in found]
    if missing:
        where = ", ".join(str(p.name) for p in files)
        hint = (" (config.json says tie_word_embeddings=false; set it to true if the head is tied)"
                if missing == ["lm_head.weight"] else "")
        raise CheckpointError(f"{where} in {next(iter(files)).parent}: missing tensor {missing[0]!r}, "
                              f"expected shape {list(expected[missing[0]])}{hint}"
                              + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
    return found


def load_pretrained(path: str | os.PathLike[str], *, dtype: Any = np.float32, xp: ModuleType = np) -> Model:
    """Load a Hugging Face model folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3, GPT-2) as a frozen ``Model``.

    Float tensors of any stored precision (F32, F16, BF16, F64) are converted to ``dtype`` on the host,
    bf16 exactly, then moved once to ``xp`` (numpy or cupy). ``model.meta`` is described in the module
    docstring. Bad input raises ``CheckpointError`` (files, tensors) or ``ConfigError`` (config.json).
    """
    if np.dtype(dtype).kind != "f":
        raise ConfigError(f"dtype must be a floating type, got {dtype!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (a Hugging Face model folder needs one)")
    hf_config = read_json_object(cfg_path, error=ConfigError)
    config = config_from_hf(hf_config, source=str(cfg_path))
    gen_path = folder / "generation_config.json"
    generation = read_json_object(gen_path) if gen_path.is_file() else None
    if generation is not None:  # generation stops on any EOS id of either file
        extra = [e for e in check_token_ids(generation, str(gen_path), config.vocab_size)
                 if e not in config.eos_token_id]
        config = config.replace(eos_token_id=(*config.eos_token_id, *extra))

    found = _locate_tensors(config, _weight_files(folder), multimodal=hf_config.get("model_type") == "gemma3")
    arrays = {key: read_tensor(file, info, dtype) for key, (file, _, info) in found.items()}
    for key, (file, name, _) in found.items():
        check_finite(file, name, arrays[key])
    if config.tie_word_embeddings and "lm_head.weight" in arrays:
        head = arrays.pop("lm_head.weight")
        if not np.array_equal(head, arrays[_hf_key(config, "embed.weight")[0]]):
            file, name, _ = found["lm_head.weight"]
            raise CheckpointError(f"{file}: tensor {name!r} differs from the token embedding, but "
                                  "config.json says tie_word_embeddings=true")
    tokenizer = folder / "tokenizer.json"
    meta = {"source": str(folder), "hf_config": hf_config,
            "tokenizer_path": str(tokenizer) if tokenizer.is_file() else None,
            "generation_config": generation}
    return model_from_state(config, from_hf_tensors(config, arrays), xp=xp, meta=meta)


# ----------------------------------------------------------------------------------------------------
# saving


def _tokenizer_sources(tokenizer_path: str | os.PathLike[str] | None) -> list[Path]:
    """The tokenizer files to copy: tokenizer.json and its companions in the same folder."""
    if tokenizer_path is None:
        return []
    p = Path(tokenizer_path)
    folder = p if p.is_dir() else p.parent
    if not (folder / "tokenizer.json").is_file() and not p.is_file():
        raise CheckpointError(f"{p}: no tokenizer.json to copy")
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if p.is_file() and p not in files:
        files.append(p)
    return files


def save_pretrained(
    model: Model, path: str | os.PathLike[str], *, tokenizer_path: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``model`` as a Hugging Face folder that transformers (4 and 5) and ``load_pretrained`` read.

    Files: config.json, model.safetensors (metadata ``{"format": "pt"}``, the model's own float dtype),
    generation_config.json, and the tokenizer files from ``tokenizer_path`` (a tokenizer.json or its
    folder; default ``model.meta["tokenizer_path"]``). Everything is written into a temporary folder
    first; a new folder then appears by one rename, and an existing folder is swapped whole (keeping
    its other files), so no crash leaves a mix of old and new files. Returns the folder.
    """
    folder = Path(path)
    config = model.config
    state = model_state(model)
    expected = parameter_shapes(config)
    for key, shape in expected.items():
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else "absent"
            raise ConfigError(f"cannot save: {key} is {got}, the config needs {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConfigError(f"cannot save: {extra} have no place in a {config.arch} checkpoint")
    hf_config = config_to_hf(config, dtype=model.dtype)
    generation = model.meta.get("generation_config") or {
        k: v for k, v in (("bos_token_id", config.bos_token_id), ("pad_token_id", config.pad_token_id),
                          ("eos_token_id", hf_config["eos_token_id"])) if v is not None}
    tokenizer_files = _tokenizer_sources(tokenizer_path or model.meta.get("tokenizer_path"))

    # Written into a temporary folder, then swapped in whole, never file by file: a crash between two
    # files would leave a new config.json beside old weights. Other files of an existing folder are kept.
    with replace_folder(folder) as tmp:
        write_safetensors(tmp / "model.safetensors", to_hf_tensors(config, state), metadata={"format": "pt"})
        write_file_atomic(tmp / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
        write_file_atomic(tmp / "generation_config.json", (json.dumps(generation, indent=2) + "\n").encode())
        for src in tokenizer_files:
            shutil.copyfile(src, tmp / src.name)
    return folder
