"""Causal grouped-query attention (GQA) with an optional padding mask.

Query head h reads key/value head h // G with G = H // K query heads per group (Hugging Face's
``repeat_kv``). Instead of repeating K and V, the queries are viewed as (B, K, G, T, D) so each group
is one batched matmul against its own key/value head, and the backward sums over G naturally.
Tutorial: tutorials/03_attention.py.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import numpy as np

from minift.backend import Array, get_xp


class AttentionCache(NamedTuple):
    q: Array  # (B, K, G, T, D) queries, needed for dk
    k: Array  # (B, K, S, D) keys, needed for dq
    v: Array  # (B, K, S, D) values, needed for dp
    p: Array  # (B, K, G, T, S) probabilities; stored, since recomputing them costs a matmul + exp
    scale: float


def causal_mask(
    T: int, S: int, key_mask: Array | None = None, *, window: int | None = None, xp: ModuleType = np
) -> Array:
    """Which keys each query may read: key j is visible to query i iff j ≤ (S − T) + i and key j is
    not padding. S − T is the number of cached (past) positions.

    With a sliding ``window`` W, also j > (S − T) + i − W: each query sees the W most recent keys,
    itself included (transformers' ``sliding_window_overlay``: kv_idx > q_idx − W). Indices count
    cache slots, padding included, as transformers counts them under left padding.

    Shapes:
        key_mask: (B, S) 1 for real tokens, 0 for padding   returns: (B|1, 1, 1, T, S) bool
    """
    if key_mask is not None:
        xp = get_xp(key_mask)
    i = xp.arange(T)[:, None] + (S - T)
    j = xp.arange(S)[None, :]
    allowed = j <= i  # (T, S)
    if window is not None:
        allowed = allowed & (j > i - window)
    allowed = allowed[None, None, None]  # (1, 1, 1, T, S)
    if key_mask is not None:
        allowed = allowed & (key_mask[:, None, None, None, :] != 0)  # (B, 1, 1, T, S)
    return allowed


def attention_forward(q: Array, k: Array, v: Array, allowed: Array) -> tuple[Array, AttentionCache]:
    """out = softmax(q kᵀ / sqrt(D) masked) v, per head, query head h reading kv head h // G.

    NOTE: masked scores are −inf, and a query row with no visible key (a padding query under left
    padding) gets all-zero probabilities instead of NaN; such rows are never read by a counted output.

    Shapes:
        q: (B, H, T, D)   k, v: (B, K, S, D)   allowed: broadcastable to (B, K, G, T, S)
        returns: (B, H, T, D)
    """
    xp = get_xp(q)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    scale = D**-0.5
    q5 = q.reshape(B, K, G, T, D)
    # The G query heads of a group are stacked as G·T rows, so each kv head is one (G·T, D) × (D, S)
    # matmul; the 5-D views are only for the mask, which broadcasts over K and G.
    # The scale goes on q (T·D values) rather than on the scores (T·S values).
    scores = ((q5 * scale).reshape(B, K, G * T, D) @ k.swapaxes(-1, -2)).reshape(B, K, G, T, S)
    # In place from here on: scores is a fresh temporary, and p reuses its memory.
    xp.copyto(scores, -xp.inf, where=~allowed)
    m = scores.max(axis=-1, keepdims=True)
    scores -= xp.where(xp.isfinite(m), m, 0.0)  # fully masked rows: exp(−inf − 0) = 0
    p = xp.exp(scores, out=scores)
    denom = p.sum(axis=-1, keepdims=True)
    p /= xp.where(denom == 0, 1.0, denom)  # (B, K, G, T, S)
    out = p.reshape(B, K, G * T, S) @ v  # (B, K, G·T, D)
    return out.reshape(B, H, T, D), AttentionCache(q5, k, v, p, scale)


def attention_backward(dout: Array, cache: AttentionCache) -> tuple[Array, Array, Array]:
    """Return (dq, dk, dv).

    forward: s = q kᵀ·scale, p = softmax(s), out = p v, so
    dv = Σ_G pᵀ dout,  dp = dout vᵀ,  ds = p ⊙ (dp − Σ_j dp ⊙ p),
    dq = ds k · scale,  dk = Σ_G dsᵀ q · scale   (Σ_G: the G query heads sharing a kv head).

    Shapes:
        dout: (B, H, T, D)   returns dq: (B, H, T, D), dk, dv: (B, K, S, D)
    """
    xp = get_xp(dout)
    q5, k, v, p, scale = cache
    B, K, G, T, D = q5.shape
    S = k.shape[2]
    p = p.reshape(B, K, G * T, S)  # the G heads of a group stacked, as in the forward
    dout = dout.reshape(B, K, G * T, D)
    dv = p.swapaxes(-1, -2) @ dout  # (B, K, S, D): the matmul sums over the G heads
    ds = dout @ v.swapaxes(-1, -2)  # dp (B, K, G·T, S), turned into ds / scale in place
    ds -= xp.einsum("...s,...s->...", ds, p)[..., None]  # Σ_j dp ⊙ p without an (…, S) temporary
    ds *= p
    dq = ds @ k  # (B, K, G·T, D)
    dq *= scale  # the scale goes on dq and dk (T·D values each) rather than on ds
    dk = ds.swapaxes(-1, -2) @ q5.reshape(B, K, G * T, D)  # (B, K, S, D)
    dk *= scale
    return dq.reshape(B, K * G, T, D), dk, dv
