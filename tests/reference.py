"""Naive float64 references: loops and einsum, written from the formulas, never from minift's code.

Each function is the definition a spec test compares minift against (llm.c keeps
``matmul_forward_naive`` for the same purpose). They favour obviousness over speed: explicit loops over
pairs, heads and positions, a plain ``max``-shifted softmax, the Hugging Face formulas transcribed in
float64. The package never imports this module.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

from minift.backend import to_numpy
from minift.config import ModelConfig, RopeScaling
from minift.layers.cross_entropy import IGNORE_INDEX


def f64(a) -> np.ndarray:
    """A float64 NumPy copy (from numpy or cupy)."""
    return to_numpy(a).astype(np.float64)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """y[n, o] = Σ_i x[n, i] w[o, i] + b[o]."""
    y = np.einsum("...i,oi->...o", f64(x), f64(w))
    return y if b is None else y + f64(b)


def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """y[n] = table[ids[n]], one row at a time."""
    ids = to_numpy(ids)
    out = np.empty((*ids.shape, table.shape[1]))
    for idx in np.ndindex(*ids.shape):
        out[idx] = f64(table)[ids[idx]]
    return out


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """y = w ⊙ x / sqrt(mean(x²) + eps), row by row."""
    x, w = f64(x), f64(w)
    out = np.empty_like(x)
    for n in np.ndindex(*x.shape[:-1]):
        out[n] = w * x[n] / math.sqrt(float(np.mean(x[n] ** 2)) + eps)
    return out


def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """y = w ⊙ (x − mean) / sqrt(biased var + eps) + b, row by row."""
    x, w, b = f64(x), f64(w), f64(b)
    out = np.empty_like(x)
    for n in np.ndindex(*x.shape[:-1]):
        mu = float(np.mean(x[n]))
        var = float(np.mean((x[n] - mu) ** 2))
        out[n] = w * (x[n] - mu) / math.sqrt(var + eps) + b
    return out


def silu(z: np.ndarray) -> np.ndarray:
    """silu(z) = z σ(z), with scipy's overflow-free logistic."""
    return z * expit(z)


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """h = silu(g) ⊙ u."""
    return silu(f64(g)) * f64(u)


def gelu_new(x: np.ndarray) -> np.ndarray:
    """GPT-2's tanh GELU: ½ x (1 + tanh(√(2/π)(x + 0.044715 x³)))."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def rope_inv_freq(D: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Hugging Face's ``_compute_default/linear/llama3_parameters``, transcribed in float64.

    Shapes:
        returns: (D/2,)
    """
    inv = np.array([1.0 / theta ** (2 * j / D) for j in range(D // 2)])
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind == "default":
        return inv
    out = np.empty_like(inv)
    orig, lo, hi, factor = (scaling.original_max_position_embeddings, scaling.low_freq_factor,
                            scaling.high_freq_factor, scaling.factor)
    for j, f in enumerate(inv):
        wavelen = 2 * math.pi / f
        if wavelen < orig / hi:  # high frequency: kept
            out[j] = f
        elif wavelen > orig / lo:  # low frequency: divided by the factor
            out[j] = f / factor
        else:  # in between: interpolated
            smooth = (orig / wavelen - lo) / (hi - lo)
            out[j] = (1 - smooth) * f / factor + smooth * f
    return out


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate each pair (i, i + D/2) of x[b, h, t] by φ = positions[b, t] · inv_freq[i].

    Shapes:
        x: (B, H, T, D)   positions: (B, T)   inv_freq: (D/2,)   returns: (B, H, T, D)
    """
    x = f64(x)
    B, H, T, D = x.shape
    half = D // 2
    out = np.empty_like(x)
    for b, h, t in np.ndindex(B, H, T):
        for i in range(half):
            phi = float(positions[b, t]) * float(inv_freq[i])
            c, s = math.cos(phi), math.sin(phi)
            xi, xj = x[b, h, t, i], x[b, h, t, i + half]
            out[b, h, t, i] = xi * c - xj * s
            out[b, h, t, i + half] = xj * c + xi * s
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask: np.ndarray | None = None) -> np.ndarray:
    """Causal softmax attention, one (batch, head, query) at a time.

    Query t sits at absolute position S − T + t and sees keys j ≤ S − T + t that are not padding;
    query head h reads key/value head h // (H / K). A query with no visible key outputs zeros.

    Shapes:
        q: (B, H, T, D)   k, v: (B, K, S, D)   key_mask: (B, S)   returns: (B, H, T, D)
    """
    q, k, v = f64(q), f64(k), f64(v)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b, h, t in np.ndindex(B, H, T):
        kv = h // (H // K)
        visible = [j for j in range(S) if j <= S - T + t and (key_mask is None or key_mask[b, j] != 0)]
        if not visible:
            continue
        scores = np.array([q[b, h, t] @ k[b, kv, j] / math.sqrt(D) for j in visible])
        p = np.exp(scores - scores.max())
        p /= p.sum()
        out[b, h, t] = sum(p_j * v[b, kv, j] for p_j, j in zip(p, visible, strict=True))
    return out


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean over rows with target ≠ −100 of −log softmax(logits[n])[targets[n]]; 0 with no such row."""
    logits = f64(logits)
    losses = []
    for n, tgt in enumerate(to_numpy(targets)):
        if tgt == IGNORE_INDEX:
            continue
        row = logits[n]
        lse = row.max() + math.log(float(np.exp(row - row.max()).sum()))
        losses.append(lse - row[tgt])
    return float(np.mean(losses)) if losses else 0.0


def positions_from_mask(attention_mask: np.ndarray | None, B: int, T: int) -> np.ndarray:
    """Position of each token among the real tokens of its row (0 for leading padding)."""
    if attention_mask is None:
        return np.tile(np.arange(T), (B, 1))
    mask = to_numpy(attention_mask)
    pos = np.zeros((B, T), dtype=np.int64)
    for b, t in np.ndindex(B, T):
        pos[b, t] = max(int(mask[b, : t + 1].sum()) - 1, 0)
    return pos


def _norm(holder, x: np.ndarray) -> np.ndarray:
    if holder.bias is not None:
        return layernorm(x, holder.weight, holder.bias, holder.eps)
    return rmsnorm(x, holder.weight, holder.eps)


def _proj(slot, x: np.ndarray) -> np.ndarray:
    bias = getattr(slot, "bias", None)
    return linear(x, slot.dense_weight(), bias)


def model_forward(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """The decoder as transformers' ``LlamaModel`` (Llama family) and ``GPT2Model`` compute it, from the raw
    weights.

    Shapes:
        tokens: (B, T)   attention_mask: (B, T)   returns logits: (B, T, V)
    """
    c: ModelConfig = model.config
    tokens = to_numpy(tokens)
    B, T = tokens.shape
    H, K, D = c.n_heads, c.n_kv_heads, c.head_dim
    pos = positions_from_mask(attention_mask, B, T)
    mask = None if attention_mask is None else to_numpy(attention_mask)
    x = embedding(tokens, model.embed.weight)  # (B, T, C)
    if not c.uses_rope:
        x = x + embedding(pos, model.pos_embed.weight)
    inv = rope_inv_freq(D, c.rope_theta, c.rope_scaling)
    for blk in model.blocks:
        h = _norm(blk.attn_norm, x)
        q = _proj(blk.q, h).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = _proj(blk.k, h).reshape(B, T, K, D).transpose(0, 2, 1, 3)
        v = _proj(blk.v, h).reshape(B, T, K, D).transpose(0, 2, 1, 3)
        if c.uses_rope:
            q, k = rope(q, pos, inv), rope(k, pos, inv)
        a = attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, T, H * D)
        x = x + _proj(blk.o, a)
        h = _norm(blk.mlp_norm, x)
        if blk.gate is not None:
            m = swiglu(_proj(blk.gate, h), _proj(blk.up, h))
        else:
            m = gelu_new(_proj(blk.up, h))
        x = x + _proj(blk.down, m)
    x = _norm(model.final_norm, x)
    head = model.embed.weight if model.lm_head is None else model.lm_head.dense_weight()
    return linear(x, head)
