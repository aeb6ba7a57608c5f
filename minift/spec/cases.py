"""Canonical inputs for the spec: tiny decoder configs in Hugging Face form and random float64 weights.

Shared by the Hypothesis properties and by ``minift spec export`` (the language-agnostic vectors).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minift.spec.interface import Selection, Weights
from minift.spec.reference import has_bias

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
"""Llama 3 RoPE scaling whose three bands (kept, interpolated, divided by the factor) all occur for a tiny
head: wavelengths below 32/4 = 8 are kept, above 32/1 divided by 8."""

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def llama_config(
    *,
    C: int = 16,
    H: int = 4,
    K: int = 2,
    D: int | None = None,
    F: int = 24,
    L: int = 2,
    V: int = 19,
    model_type: str = "llama",
    eps: float = 1e-6,
    theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    bias: bool = False,
    tie: bool = False,
    window: int | None = None,
    sliding: tuple[bool, ...] | None = None,
) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict of a tiny Llama-family model (GQA when K < H). ``bias`` sets
    Llama's ``attention_bias`` and ``mlp_bias`` (Qwen2 has q, k, v biases whatever it says; Qwen3's
    covers q, k, v, o). A sliding ``window``: Mistral's on every layer; Qwen2's and Qwen3's on the layers
    ``sliding`` marks (default: all)."""
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": V,
        "hidden_size": C,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": K,
        "head_dim": D if D is not None else C // H,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "torch_dtype": "float64",
    }
    if model_type == "llama":
        config |= {"attention_bias": bias, "mlp_bias": bias}
    if model_type == "qwen3":
        config["attention_bias"] = bias
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if window is not None:
        assert model_type != "llama", "Llama has no sliding window"
        config["sliding_window"] = window
    if window is not None and model_type in ("qwen2", "qwen3"):
        config |= {"use_sliding_window": True, "layer_types": _layer_types(sliding or (True,) * L)}
    return config


def _layer_types(sliding: tuple[bool, ...]) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def gemma3_config(
    *,
    C: int = 16,
    H: int = 4,
    K: int = 2,
    D: int = 6,
    F: int = 24,
    V: int = 19,
    eps: float = 1e-6,
    theta: float = 10000.0,
    local_theta: float = 100.0,
    scalar: float = 10.0,
    window: int = 2,
    sliding: tuple[bool, ...] = (True, False),
    rope_scaling: dict[str, Any] | None = None,
    bias: bool = False,
    tie: bool = True,
) -> dict[str, Any]:
    """A ``config.json`` dict of a tiny Gemma 3 text model (transformers 5 spelling): one layer per entry
    of ``sliding`` (True: a sliding-window layer with RoPE base ``local_theta``; False: a global layer
    with base ``theta`` and ``rope_scaling``), attention scale ``scalar``^(−1/2)."""
    full = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": theta}
    return {
        "architectures": [ARCHITECTURES["gemma3_text"]],
        "model_type": "gemma3_text",
        "vocab_size": V,
        "hidden_size": C,
        "intermediate_size": F,
        "num_hidden_layers": len(sliding),
        "num_attention_heads": H,
        "num_key_value_heads": K,
        "head_dim": D,
        "rms_norm_eps": eps,
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "query_pre_attn_scalar": scalar,
        "sliding_window": window,
        "layer_types": _layer_types(sliding),
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
        "attention_bias": bias,
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "torch_dtype": "float64",
    }


def gpt2_config(*, C: int = 8, H: int = 2, L: int = 2, V: int = 13, eps: float = 1e-5) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict of a tiny GPT-2 (tied head, F = 4C)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": V,
        "n_embd": C,
        "n_head": H,
        "n_layer": L,
        "n_positions": 16,
        "n_inner": None,
        "layer_norm_epsilon": eps,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "torch_dtype": "float64",
    }


def _gpt2_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    C, V = config["n_embd"], config["vocab_size"]
    out: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (V, C), "transformer.wpe.weight": (config["n_positions"], C)
    }
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}"
        for name, (n_in, n_out) in {
            "attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)
        }.items():
            out |= {f"{p}.{name}.weight": (n_in, n_out), f"{p}.{name}.bias": (n_out,)}  # Conv1D: [in, out]
        for ln in ("ln_1", "ln_2"):
            out |= {f"{p}.{ln}.weight": (C,), f"{p}.{ln}.bias": (C,)}
    return out | {"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}


def shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight's key and shape, in Hugging Face naming and layout ([out, in], GPT-2's Conv1D
    [in, out]); biases where the family has them, ``lm_head.weight`` only when the head is untied."""
    if config["model_type"] == "gpt2":
        return _gpt2_shapes(config)
    C, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, K, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        linears = {
            "self_attn.q_proj": (H * D, C, "qkv_bias"),
            "self_attn.k_proj": (K * D, C, "qkv_bias"),
            "self_attn.v_proj": (K * D, C, "qkv_bias"),
            "self_attn.o_proj": (C, H * D, "o_bias"),
            "mlp.gate_proj": (F, C, "mlp_bias"),
            "mlp.up_proj": (F, C, "mlp_bias"),
            "mlp.down_proj": (C, F, "mlp_bias"),
        }
        out[f"{p}.input_layernorm.weight"] = (C,)
        for name, (n_out, n_in, bias) in linears.items():
            out[f"{p}.{name}.weight"] = (n_out, n_in)
            if has_bias(config, bias):
                out[f"{p}.{name}.bias"] = (n_out,)
        if config["model_type"] in ("qwen3", "gemma3_text"):  # one (D,) weight shared by all heads
            out |= {f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,)}
        out[f"{p}.post_attention_layernorm.weight"] = (C,)
        if config["model_type"] == "gemma3_text":
            out |= {f"{p}.{name}.weight": (C,) for name in ("pre_feedforward_layernorm",
                                                             "post_feedforward_layernorm")}
    out["model.norm.weight"] = (C,)
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, C)
    return out


def is_norm(key: str) -> bool:
    return key.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight"))


def random_weights(config: dict[str, Any], seed: int, std: float = 0.3) -> Weights:
    """Every weight random (norm weights around 1), float64: no entry is left at a special value."""
    rng = np.random.default_rng(seed)
    return {
        key: (1.0 + 0.2 * rng.standard_normal(shape)) if is_norm(key) else std * rng.standard_normal(shape)
        for key, shape in shapes(config).items()
    }


def random_tokens(config: dict[str, Any], seed: int, B: int = 2, T: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (B, T) and shifted next-token targets with two ignored (−100) positions, both in the first
    sequence: a loss that averages per sequence, or over ignored positions, differs from the mean."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config["vocab_size"], (B, T))
    targets = np.concatenate([tokens[:, 1:], rng.integers(0, config["vocab_size"], (B, 1))], axis=1)
    targets[0, 0] = targets[0, T // 2] = -100
    return tokens, targets


def random_selection(
    config: dict[str, Any], seed: int, n_heads: int, n_channels: int
) -> tuple[Selection, Selection]:
    """Per layer, ``n_heads`` distinct query heads and ``n_channels`` distinct FFN channels, in random
    order."""
    rng = np.random.default_rng(seed)
    L, H, F = config["num_hidden_layers"], config["num_attention_heads"], config["intermediate_size"]
    heads = {i: [int(h) for h in rng.choice(H, n_heads, replace=False)] for i in range(L)}
    channels = {i: [int(c) for c in rng.choice(F, n_channels, replace=False)] for i in range(L)}
    return heads, channels
