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
    q: Array  # (B, K, G, T, D) queries after RoPE: dk needs them, and so does recomputing p
    k: Array  # (B, K, S, D) keys, needed for dq and for p
    v: Array  # (B, K, S, D) values, needed for dp
    lse: Array  # (B, K, G·T, 1) row log-sum-exp of the masked scores: p = exp(s − lse), +inf on empty rows
    allowed: Array  # the mask as given, broadcastable to (B, K, G, T, S); no (B, H, T, S) array is kept
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


def _masked_scores(q5: Array, k: Array, allowed: Array, b: int, j: int, scale: float) -> Array:
    """s = q kᵀ·scale of sequence b and kv head j, −inf where ``allowed`` is False: (G·T, S), a fresh
    array.

    The G query heads of the group are stacked as G·T rows, so the group is one (G·T, D) × (D, S)
    matmul. The scale goes on q (T·D values) rather than on the scores (T·S values).
    """
    xp = get_xp(q5)
    B, K, G, T, D = q5.shape
    S = k.shape[2]
    scores = (q5[b, j] * scale).reshape(G * T, D) @ k[b, j].T  # (G·T, S)
    mask = xp.broadcast_to(allowed, (B, K, G, T, S))[b, j]  # a view, whatever the mask's shape
    xp.copyto(scores.reshape(G, T, S), -xp.inf, where=~mask)
    return scores


def attention_forward(
    q: Array, k: Array, v: Array, allowed: Array, *, scale: float | None = None
) -> tuple[Array, AttentionCache]:
    """out = softmax(q kᵀ · scale masked) v, per head, query head h reading kv head h // G.

    ``scale`` defaults to 1/sqrt(D); Gemma 3 sets its own (1/sqrt(query_pre_attn_scalar)).

    The probabilities are built one sequence and one key/value group at a time and not kept: the
    cache holds q, k, v and each row's log-sum-exp ℓ = log Σ_j exp(s_j), from which the backward
    rebuilds p = exp(s − ℓ) with one matmul and one exp per entry (as FlashAttention does, Dao et al.
    2022, §3.1). A kept p would cost B·H·T·S values per layer, the largest activation of a block at
    long T; one (G·T, S) block at a time is all that ever exists.

    NOTE: masked scores are −inf, and a query row with no visible key (a padding query under left
    padding) gets all-zero probabilities instead of NaN (its ℓ is +inf, so exp(s − ℓ) is 0 too);
    such rows are never read by a counted output.

    Shapes:
        q: (B, H, T, D)   k, v: (B, K, S, D)   allowed: broadcastable to (B, K, G, T, S)
        returns: (B, H, T, D)
    """
    xp = get_xp(q)
    B, H, T, D = q.shape
    K = k.shape[1]
    G = H // K
    scale = D**-0.5 if scale is None else scale
    q5 = q.reshape(B, K, G, T, D)
    out = xp.empty((B, K, G * T, D), dtype=xp.result_type(q, v))
    lse = xp.empty((B, K, G * T, 1), dtype=out.dtype)
    for b in range(B):
        for j in range(K):  # one (G·T, S) block of scores at a time: never a (B, H, T, S) array
            p = _masked_scores(q5, k, allowed, b, j, scale)  # in place from here on: p reuses the scores
            m = p.max(axis=-1, keepdims=True)
            m = xp.where(xp.isfinite(m), m, 0.0)  # fully masked rows: exp(−inf − 0) = 0
            p -= m
            xp.exp(p, out=p)
            denom = p.sum(axis=-1, keepdims=True)
            empty = denom == 0
            p /= xp.where(empty, 1.0, denom)
            xp.matmul(p, v[b, j], out=out[b, j])
            lse[b, j] = xp.where(empty, xp.inf, m + xp.log(xp.where(empty, 1.0, denom)))
    return out.reshape(B, H, T, D), AttentionCache(q5, k, v, lse, allowed, scale)


def attention_probabilities(cache: AttentionCache, b: int, j: int | None = None) -> Array:
    """p = softmax of sequence b's masked scores, rebuilt from the cache as exp(s − ℓ): of kv head j's
    group, or of every group when j is None.

    Shapes:
        returns: (G·T, S) for one group, (K, G·T, S) for all
    """
    xp = get_xp(cache.q)
    if j is None:
        return xp.stack([attention_probabilities(cache, b, j) for j in range(cache.q.shape[1])])
    p = _masked_scores(cache.q, cache.k, cache.allowed, b, j, cache.scale)
    p -= cache.lse[b, j]
    return xp.exp(p, out=p)


def attention_backward(dout: Array, cache: AttentionCache) -> tuple[Array, Array, Array]:
    """Return (dq, dk, dv).

    forward: s = q kᵀ·scale, p = softmax(s), out = p v, so
    dv = Σ_G pᵀ dout,  dp = dout vᵀ,  ds = p ⊙ (dp − Σ_j dp ⊙ p),
    dq = ds k · scale,  dk = Σ_G dsᵀ q · scale   (Σ_G: the G query heads sharing a kv head).
    p is rebuilt one sequence and one group at a time (``attention_probabilities``).

    Shapes:
        dout: (B, H, T, D)   returns dq: (B, H, T, D), dk, dv: (B, K, S, D)
    """
    xp = get_xp(dout)
    q5, k, v = cache.q, cache.k, cache.v
    B, K, G, T, D = q5.shape
    dout = dout.reshape(B, K, G * T, D)  # the G heads of a group stacked, as in the forward
    # textbook:  dv = pᵀ dout;  dp = dout vᵀ;  ds = p ⊙ (dp − Σ_j dp ⊙ p);
    #            dq = ds k · scale;  dk = dsᵀ q · scale
    # below, per sequence and group: p is rebuilt from q, k and the row log-sum-exp, and the dp
    # buffer becomes ds in place (one (G·T, S) array instead of two)
    dq = xp.empty((B, K, G * T, D), dtype=dout.dtype)
    dk, dv = xp.empty_like(k, dtype=dout.dtype), xp.empty_like(v, dtype=dout.dtype)
    for b in range(B):
        for j in range(K):
            p = attention_probabilities(cache, b, j)  # (G·T, S)
            xp.matmul(p.T, dout[b, j], out=dv[b, j])  # the matmul sums over the G heads
            ds = dout[b, j] @ v[b, j].T  # dp (G·T, S), turned into ds / scale in place
            ds -= xp.einsum("ts,ts->t", ds, p)[:, None]  # Σ_j dp ⊙ p without a (G·T, S) temporary
            ds *= p
            del p
            xp.matmul(ds, k[b, j], out=dq[b, j])
            xp.matmul(ds.T, q5[b, j].reshape(G * T, D), out=dk[b, j])
    dq *= cache.scale  # the scale goes on dq and dk (T·D values each) rather than on ds
    dk *= cache.scale
    return dq.reshape(B, K * G, T, D), dk, dv
