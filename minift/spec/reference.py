"""The definition of the decoder: a plain float64 NumPy forward and loss, written for reading.

This is what ``decoder_logits`` and ``decoder_loss_and_grads`` must compute (the spec compares an
implementation's logits and loss against it; minift's optimised layers are not used here, so the spec
states the mathematics rather than minift's code). Every table is float64: the RoPE frequencies
``inv_freq[j] = 1 / θ^(2j/D)`` (rescaled as below) and the angles ``t · inv_freq[j]``.

Families, by ``model_type`` of the Hugging Face ``config.json`` (weights by their HF names):

- ``llama``, ``mistral``, ``qwen2``, ``qwen3``: pre-norm blocks ``x += o(attn(rmsnorm(x)))``,
  ``x += down(silu(gate(h)) ⊙ up(h))`` with ``h = rmsnorm(x)``; RMSNorm
  ``w ⊙ x / √(mean(x²) + eps)`` with eps = ``rms_norm_eps``; RoPE pairs dimension i with i + D/2 inside
  each head (``rotate_half``); attention scale 1/√D with D = ``head_dim``; grouped-query attention:
  query head h reads key/value head h // (H/K). Biases: Llama's ``attention_bias`` (q, k, v, o) and
  ``mlp_bias`` (gate, up, down); Qwen2 always has q, k, v biases and no others; Qwen3's
  ``attention_bias`` (q, k, v, o); Mistral none. Qwen3 normalises every query and key head over its D
  values before RoPE: ``q = rmsnorm(q, self_attn.q_norm.weight)``, ``k`` alike, one (D,) weight shared
  by all heads.
- ``gemma3_text`` (Gemma 3): the embedding is scaled, ``x = E[ids] · √C``; every RMSNorm scales by
  ``(1 + w)``; per block ``x += post_attention_layernorm(o(attn(input_layernorm(x))))`` and
  ``x += post_feedforward_layernorm(down(gelu_tanh(gate(h)) ⊙ up(h)))`` with
  ``h = pre_feedforward_layernorm(x)``; q/k norms as Qwen3 (with 1 + w); attention scale
  ``query_pre_attn_scalar^(−1/2)``; each layer's RoPE from ``rope_parameters[layer_types[i]]``
  (θ = ``rope_theta`` there, and its scaling). Biases: ``attention_bias`` (q, k, v, o).
- ``gpt2``: learned positions added to the token embedding, LayerNorm ``(x − μ)/√(σ² + eps) ⊙ w + b``
  (``layer_norm_epsilon``), tanh-GELU, biases everywhere, fused ``attn.c_attn`` = [q | k | v] and
  Conv1D weights stored ``[in, out]``; scale 1/√(C/H).
- The head: ``lm_head.weight``, or the token embedding when ``tie_word_embeddings``.

Sliding windows: in a layer with window W, query t sees keys s with t − W < s ≤ t (the W most recent
positions, itself included). Which layers: Mistral's ``sliding_window`` applies to every layer; Qwen2's
and Qwen3's only with ``use_sliding_window``, on the layers ``layer_types`` marks ``sliding_attention``;
Gemma 3's on the layers ``layer_types`` marks ``sliding_attention``.

RoPE scaling (``rope_scaling``): ``linear`` divides every frequency by ``factor``; ``llama3`` divides
the low frequencies (wavelength 2π/inv_freq > original_max_position_embeddings / low_freq_factor) by
``factor``, keeps the high ones (wavelength < original / high_freq_factor) and interpolates between:
``s = (original / wavelength − low) / (high − low)``, ``inv = (1 − s) · inv / factor + s · inv``.

The loss is the mean cross-entropy over the positions whose target is not −100.

A new family is one entry of ``FAMILIES`` (which biases) plus, where its block differs, a branch in
``_llama_block`` (as Qwen3's q/k norms) or a block of its own (as ``_gemma3_block``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Family:
    """What distinguishes a Llama-family model type: which projections carry biases."""

    qkv_bias: bool | str  # True/False, or the config key that decides
    o_bias: bool | str
    mlp_bias: bool | str


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": Family(qkv_bias=False, o_bias=False, mlp_bias=False),
    "qwen2": Family(qkv_bias=True, o_bias=False, mlp_bias=False),
    "qwen3": Family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False),
    "gemma3_text": Family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False),
}


def has_bias(config: dict[str, Any], which: str) -> bool:
    """Whether the projections ``which`` (``qkv_bias``, ``o_bias``, ``mlp_bias``) carry a bias."""
    if config["model_type"] == "gpt2":
        return True
    rule = getattr(FAMILIES[config["model_type"]], which)
    return bool(config.get(rule, False)) if isinstance(rule, str) else rule


# --- the pieces -------------------------------------------------------------------------------------


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def gemma_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Gemma's RMSNorm: the weight is stored as an offset from 1, so it scales by (1 + w)."""
    return rmsnorm(x, 1.0 + w, eps)


def embedding_scale(config: dict[str, Any]) -> float:
    """The factor of the token embedding: √C for Gemma 3 (transformers rounds it to float32 first: a
    relative 1e-8, below every tolerance), 1 otherwise."""
    return float(np.sqrt(config["hidden_size"])) if config["model_type"] == "gemma3_text" else 1.0


def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def inv_freq(config: dict[str, Any], layer: int = 0) -> np.ndarray:
    """(D/2,) float64 RoPE frequencies of a layer, rescaled per ``rope_scaling`` (Gemma 3: per
    ``rope_parameters`` of the layer's type)."""
    D = config["head_dim"]
    theta, scaling = config.get("rope_theta"), config.get("rope_scaling") or {}
    if config["model_type"] == "gemma3_text":
        scaling = config["rope_parameters"][config["layer_types"][layer]]
        theta = scaling["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * np.pi / inv
        s = (original / wavelength - low) / (high - low)
        smooth = (1 - s) * inv / factor + s * inv
        return np.where(
            wavelength > original / low, inv / factor, np.where(wavelength < original / high, inv, smooth)
        )
    assert kind == "default", f"unknown RoPE type {kind!r}"
    return inv


def rope(x: np.ndarray, config: dict[str, Any], layer: int = 0) -> np.ndarray:
    """Rotate (B, heads, T, D) by position: pairs (i, i + D/2) turn by angle t · inv_freq[i]."""
    T, half = x.shape[2], x.shape[3] // 2
    angle = np.arange(T, dtype=np.float64)[:, None] * inv_freq(config, layer)[None]  # (T, D/2)
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def window(config: dict[str, Any], layer: int) -> int | None:
    """The sliding window W of a layer, or None where it sees every earlier position."""
    kind, W = config["model_type"], config.get("sliding_window")
    if kind == "mistral":
        return W
    types = config.get("layer_types")
    sliding = types is not None and types[layer] == "sliding_attention"
    if kind in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        return W if sliding else None
    return W if kind == "gemma3_text" and sliding else None


def _mask(T: int, W: int | None = None) -> np.ndarray:
    """(T, T) True where query t may attend to key s: causal, s ≤ t; with a window W also s > t − W."""
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    return (s <= t) & (s > t - W) if W is not None else s <= t


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask: np.ndarray) -> np.ndarray:
    """softmax(scale · q kᵀ, masked) v over (B, H, T, D); K < H kv heads are shared by groups of H/K."""
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # query head h reads kv head h // G
    scores = np.where(mask, scale * q @ k.transpose(0, 1, 3, 2), -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _linear(w: Weights, name: str, x: np.ndarray, bias: bool) -> np.ndarray:
    y = x @ w[f"{name}.weight"].T
    return y + w[f"{name}.bias"] if bias else y


def _heads(x: np.ndarray, n: int) -> np.ndarray:
    """(B, T, n·D) → (B, n, T, D)."""
    B, T, _ = x.shape
    return x.reshape(B, T, n, -1).transpose(0, 2, 1, 3)


def _merge_heads(x: np.ndarray) -> np.ndarray:
    B, n, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, n * D)


# --- the families -----------------------------------------------------------------------------------


def _llama_block(config: dict[str, Any], w: Weights, i: int, x: np.ndarray) -> np.ndarray:
    p, eps = f"model.layers.{i}", config["rms_norm_eps"]
    H, K, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    qkv_bias = has_bias(config, "qkv_bias")
    h = rmsnorm(x, w[f"{p}.input_layernorm.weight"], eps)
    q = _heads(_linear(w, f"{p}.self_attn.q_proj", h, qkv_bias), H)
    k = _heads(_linear(w, f"{p}.self_attn.k_proj", h, qkv_bias), K)
    v = _heads(_linear(w, f"{p}.self_attn.v_proj", h, qkv_bias), K)
    if config["model_type"] == "qwen3":  # over each head's D values (the last axis of (B, n, T, D))
        q = rmsnorm(q, w[f"{p}.self_attn.q_norm.weight"], eps)
        k = rmsnorm(k, w[f"{p}.self_attn.k_norm.weight"], eps)
    mask = _mask(x.shape[1], window(config, i))
    a = attention(rope(q, config), rope(k, config), v, 1.0 / np.sqrt(D), mask)
    x = x + _linear(w, f"{p}.self_attn.o_proj", _merge_heads(a), has_bias(config, "o_bias"))
    h = rmsnorm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
    mlp_bias = has_bias(config, "mlp_bias")
    gated = silu(_linear(w, f"{p}.mlp.gate_proj", h, mlp_bias)) * _linear(w, f"{p}.mlp.up_proj", h, mlp_bias)
    return x + _linear(w, f"{p}.mlp.down_proj", gated, mlp_bias)


def _gemma3_block(config: dict[str, Any], w: Weights, i: int, x: np.ndarray) -> np.ndarray:
    p, eps = f"model.layers.{i}", config["rms_norm_eps"]
    H, K = config["num_attention_heads"], config["num_key_value_heads"]
    bias = has_bias(config, "qkv_bias")

    def norm(name: str, y: np.ndarray) -> np.ndarray:
        return gemma_rmsnorm(y, w[f"{p}.{name}.weight"], eps)

    h = norm("input_layernorm", x)
    q = norm("self_attn.q_norm", _heads(_linear(w, f"{p}.self_attn.q_proj", h, bias), H))
    k = norm("self_attn.k_norm", _heads(_linear(w, f"{p}.self_attn.k_proj", h, bias), K))
    v = _heads(_linear(w, f"{p}.self_attn.v_proj", h, bias), K)
    scale, mask = config["query_pre_attn_scalar"] ** -0.5, _mask(x.shape[1], window(config, i))
    a = attention(rope(q, config, i), rope(k, config, i), v, scale, mask)
    x = x + norm("post_attention_layernorm", _linear(w, f"{p}.self_attn.o_proj", _merge_heads(a), bias))
    h = norm("pre_feedforward_layernorm", x)
    gated = gelu_tanh(_linear(w, f"{p}.mlp.gate_proj", h, False)) * _linear(w, f"{p}.mlp.up_proj", h, False)
    return x + norm("post_feedforward_layernorm", _linear(w, f"{p}.mlp.down_proj", gated, False))


def _llama_hidden(config: dict[str, Any], w: Weights, tokens: np.ndarray) -> np.ndarray:
    x = w["model.embed_tokens.weight"][tokens] * embedding_scale(config)
    gemma = config["model_type"] == "gemma3_text"
    for i in range(config["num_hidden_layers"]):
        x = (_gemma3_block if gemma else _llama_block)(config, w, i, x)
    return (gemma_rmsnorm if gemma else rmsnorm)(x, w["model.norm.weight"], config["rms_norm_eps"])


def _conv1d(w: Weights, name: str, x: np.ndarray) -> np.ndarray:
    """GPT-2's Conv1D: weight stored [in, out]."""
    return x @ w[f"{name}.weight"] + w[f"{name}.bias"]


def _gpt2_hidden(config: dict[str, Any], w: Weights, tokens: np.ndarray) -> np.ndarray:
    C, H, eps = config["n_embd"], config["n_head"], config["layer_norm_epsilon"]
    T = tokens.shape[1]
    x = w["transformer.wte.weight"][tokens] + w["transformer.wpe.weight"][:T]
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}"
        h = layernorm(x, w[f"{p}.ln_1.weight"], w[f"{p}.ln_1.bias"], eps)
        q, k, v = np.split(_conv1d(w, f"{p}.attn.c_attn", h), 3, axis=-1)
        a = attention(_heads(q, H), _heads(k, H), _heads(v, H), 1.0 / np.sqrt(C // H), _mask(T))
        x = x + _conv1d(w, f"{p}.attn.c_proj", _merge_heads(a))
        h = layernorm(x, w[f"{p}.ln_2.weight"], w[f"{p}.ln_2.bias"], eps)
        x = x + _conv1d(w, f"{p}.mlp.c_proj", gelu_tanh(_conv1d(w, f"{p}.mlp.c_fc", h)))
    return layernorm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)


def logits(config: dict[str, Any], weights: Weights, tokens: np.ndarray) -> np.ndarray:
    """(B, T, V) float64 logits of the decoder ``config`` for tokens (B, T)."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    tokens = np.asarray(tokens)
    if config["model_type"] == "gpt2":
        x, embed = _gpt2_hidden(config, w, tokens), "transformer.wte.weight"
    else:
        x, embed = _llama_hidden(config, w, tokens), "model.embed_tokens.weight"
    head = w[embed] if config.get("tie_word_embeddings", False) else w["lm_head.weight"]
    return x @ head.T


def loss(config: dict[str, Any], weights: Weights, tokens: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of the next-token ``targets`` (B, T), over positions whose target is not −100."""
    z = logits(config, weights, tokens)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = np.asarray(targets) != -100
    picked = np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return float(-picked[keep].mean())
