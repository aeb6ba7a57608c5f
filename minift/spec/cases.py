"""Canonical inputs for the spec: tiny Llama configs in Hugging Face form and random float64 weights.

Shared by the Hypothesis properties and by ``minift spec export`` (the language-agnostic vectors).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minift.spec.interface import Selection, Weights


def llama_config(
    *, C: int = 16, H: int = 4, K: int = 2, D: int | None = None, F: int = 24, L: int = 2, V: int = 19
) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict of a tiny Llama (GQA when K < H)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": C,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": K,
        "head_dim": D if D is not None else C // H,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float64",
    }


def shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight's key and shape, in Hugging Face naming and [out, in] layout."""
    C, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, K, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.input_layernorm.weight": (C,),
            f"{p}.self_attn.q_proj.weight": (H * D, C),
            f"{p}.self_attn.k_proj.weight": (K * D, C),
            f"{p}.self_attn.v_proj.weight": (K * D, C),
            f"{p}.self_attn.o_proj.weight": (C, H * D),
            f"{p}.post_attention_layernorm.weight": (C,),
            f"{p}.mlp.gate_proj.weight": (F, C),
            f"{p}.mlp.up_proj.weight": (F, C),
            f"{p}.mlp.down_proj.weight": (C, F),
        }
    return out | {"model.norm.weight": (C,), "lm_head.weight": (V, C)}


def random_weights(config: dict[str, Any], seed: int, std: float = 0.3) -> Weights:
    """Every weight random (norm weights around 1), float64: no entry is left at a special value."""
    rng = np.random.default_rng(seed)
    return {
        key: (1.0 + 0.2 * rng.standard_normal(shape)) if len(shape) == 1 else std * rng.standard_normal(shape)
        for key, shape in shapes(config).items()
    }


def random_tokens(config: dict[str, Any], seed: int, B: int = 2, T: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (B, T) and shifted next-token targets with one ignored (−100) position."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config["vocab_size"], (B, T))
    targets = np.concatenate([tokens[:, 1:], rng.integers(0, config["vocab_size"], (B, 1))], axis=1)
    targets[0, 0] = -100
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
