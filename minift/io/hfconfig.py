"""The types and ranges of a Hugging Face ``config.json`` and ``generation_config.json``, checked before
anything is built from them.

Python coerces too willingly for a config: ``bool("false")`` is True, ``int(100.7)`` is 100, ``True``
is the integer 1, ``float("nan")`` passes ``x > 0`` checks by being unordered, and a ``head_dim`` of 0
falls through ``cfg.get("head_dim") or C // H`` to a default. Each key a supported family uses is
therefore checked for its JSON type (integers are integers, flags are true/false, numbers finite) and
for a range no real model leaves (``minift.config.LIMITS``), every error naming the file and the key.
A key that is absent or null takes its default, as in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minift.config import LIMITS
from minift.errors import ConfigError
from minift.io.jsonio import Fields

_LIMIT_OF = {  # HF key → the ModelConfig field whose limit applies
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "n_embd": "hidden_size",
    "intermediate_size": "intermediate_size", "n_inner": "intermediate_size",
    "num_hidden_layers": "n_layers", "n_layer": "n_layers", "num_attention_heads": "n_heads",
    "n_head": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings", "n_positions": "max_position_embeddings",
    "sliding_window": "max_position_embeddings", "n_ctx": "max_position_embeddings",
}
_NONNEG_FLOATS = ("rms_norm_eps", "layer_norm_epsilon")
_POSITIVE_FLOATS = ("rope_theta", "rope_local_base_freq", "query_pre_attn_scalar", "attn_logit_softcapping",
                    "final_logit_softcapping")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights",
          "scale_attn_by_inverse_layer_idx", "add_cross_attention", "reorder_and_upcast_attn",
          "use_bidirectional_attention")
_STRS = ("model_type", "hidden_act", "hidden_activation", "activation_function")
_LAYER_TYPES = ("full_attention", "sliding_attention")  # Gemma 3's rope_parameters: one dict per type
_ROPE_FLOATS = ("factor", "low_freq_factor", "high_freq_factor", "rope_theta")


def check_hf_config(cfg: Mapping[str, Any], source: str) -> None:
    """Raise ConfigError, naming ``source`` and the key, for any ill-typed or out-of-range setting."""
    f = Fields(cfg, source, ConfigError)
    for key, field in _LIMIT_OF.items():
        f.int(key, None, lo=1, hi=LIMITS[field])
    for key in _NONNEG_FLOATS:
        f.float(key, None, nonneg=True)
    for key in _POSITIVE_FLOATS:
        f.float(key, None, positive=True)
    for key in _BOOLS:
        f.bool(key, None)
    for key in _STRS:
        f.str(key, None)
    for key in ("sliding_window_pattern", "_sliding_window_pattern", "max_window_layers"):
        f.int(key, None, lo=0, hi=LIMITS["n_layers"])
    for key in ("rope_scaling", "rope_parameters"):
        params = f.obj_(key, None)
        if params and set(params) & set(_LAYER_TYPES):
            for layer_type in _LAYER_TYPES:
                sub = Fields(params, f"{source}: {key}", ConfigError).obj_(layer_type, None)
                if sub:
                    _check_rope(sub, f"{source}: {key}.{layer_type}")
        elif params:
            _check_rope(params, f"{source}: {key}")
    check_token_ids(cfg, source, cfg.get("vocab_size"))


def _check_rope(params: Mapping[str, Any], source: str) -> None:
    p = Fields(params, source, ConfigError)
    p.str(("rope_type", "type"), None)
    for name in _ROPE_FLOATS:
        p.float(name, None, positive=True)
    p.int("original_max_position_embeddings", None, lo=1, hi=LIMITS["max_position_embeddings"])


def check_token_ids(cfg: Mapping[str, Any], source: str, vocab_size: Any) -> tuple[int, ...]:
    """Check bos/pad (integers) and eos (an integer or a list of them), each within the vocabulary when
    its size is known; return the eos ids."""
    f = Fields(cfg, source, ConfigError)
    hi = vocab_size - 1 if type(vocab_size) is int and vocab_size > 0 else None
    for key in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
        f.int(key, None, lo=0, hi=hi)
    eos = cfg.get("eos_token_id")
    ids = () if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(type(i) is int for i in ids):
        raise ConfigError(f"{source}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return f.ints("eos_token_id", (), lo=0, hi=hi, scalar=True)
