"""Hypothesis strategies with domain names (as in thinc's ``tests/strategies.py``).

Sizes stay tiny (B ≤ 2, T ≤ 6, C ≤ 16) so each example takes milliseconds; floats are bounded and
finite (|x| ≤ 4 unless asked otherwise), float64 unless a dtype is given.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minift.config import ModelConfig, RopeScaling


def activations(shape: tuple[int, ...], *, bound: float = 4.0, dtype=np.float64) -> st.SearchStrategy:
    """Arrays of the given shape with finite entries in [−bound, bound]."""
    width = 32 if np.dtype(dtype) == np.float32 else 64
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)
    return arrays(dtype, shape, elements=elements)


@st.composite
def attention_shapes(draw, *, max_T: int = 5) -> tuple[int, int, int, int, int, int]:
    """(B, H, K, T, S, D) with K dividing H and S ≥ T (S − T cached positions)."""
    K = draw(st.integers(1, 2))
    H = K * draw(st.integers(1, 3))
    T = draw(st.integers(1, max_T))
    S = T + draw(st.integers(0, 2))
    return draw(st.integers(1, 2)), H, K, T, S, draw(st.sampled_from([2, 4]))


@st.composite
def rope_scalings(draw) -> RopeScaling:
    """default, linear or llama3 scaling; llama3 with a tiny original context so that all three
    frequency bands (kept, interpolated, divided) occur at small head_dim."""
    kind = draw(st.sampled_from(["default", "linear", "llama3"]))
    if kind == "default":
        return RopeScaling()
    factor = draw(st.floats(1.0, 40.0))
    if kind == "linear":
        return RopeScaling("linear", factor)
    low = draw(st.floats(0.5, 2.0))
    high = low + draw(st.floats(0.5, 4.0))
    orig = draw(st.integers(4, 256))
    return RopeScaling("llama3", factor, low, high, orig)


@st.composite
def configs(draw, *, max_layers: int = 2) -> ModelConfig:
    """Tiny valid configs over every architecture: GQA, tied embeddings, Llama (q,k,v,o + MLP) and
    Qwen2 (q,k,v only) biases, linear/llama3 RoPE, head_dim ≠ C/H, GPT-2."""
    arch = draw(st.sampled_from(["llama", "mistral", "qwen2", "gpt2"]))
    K = draw(st.integers(1, 2))
    H = K * draw(st.integers(1, 2))
    D = draw(st.sampled_from([2, 4]))
    common = dict(
        vocab_size=draw(st.integers(3, 11)),
        intermediate_size=draw(st.integers(1, 12)),
        n_layers=draw(st.integers(1, max_layers)),
        n_heads=H,
        head_dim=D,
        tie_word_embeddings=draw(st.booleans()),
        arch=arch,
    )
    if arch == "gpt2":
        return ModelConfig(hidden_size=H * D, n_kv_heads=H, qkv_bias=True, o_bias=True, mlp_bias=True,
                           max_position_embeddings=8, norm_eps=1e-5, **common)
    attention_bias = draw(st.booleans())
    return ModelConfig(
        hidden_size=draw(st.integers(2, 12)),  # independent of H·D: head_dim ≠ C/H is allowed
        n_kv_heads=K,
        qkv_bias=attention_bias or arch == "qwen2",
        o_bias=attention_bias and arch == "llama",
        mlp_bias=arch == "llama" and draw(st.booleans()),
        rope_scaling=draw(rope_scalings()),
        rope_theta=draw(st.sampled_from([10.0, 1e4, 5e5])),
        **common,
    )
