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

from minift.backend import Array, block_size, get_xp


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


SCORE_BLOCK = 2**17  # scores built at once on the host, at most (``block_size``; one pair may hold more)

Block = tuple[slice, slice]  # (sequences, kv groups)


def score_blocks(B: int, K: int, G: int, T: int, S: int, budget: int = SCORE_BLOCK) -> list[Block]:
    """The (sequence, kv group) pairs in blocks of at most ``budget`` scores: several whole
    sequences at a time when one sequence's K·G·T·S scores fit, else groups of one sequence (at
    least one pair). The unit of work of the forward and of the backward.

    Pairs are batched because one pair of a short sequence (or of one decoding step) is too small a
    matmul for its Python overhead; they are bounded because B·H·T·S scores at once are what this
    layer exists not to build. Either way a block is a contiguous slice of (B, K, …) arrays, so its
    q, k, v, outputs and mask are views.
    """
    per_sequence = K * G * T * S
    if per_sequence <= budget:
        n = budget // max(per_sequence, 1)  # an empty sequence (T = 0) is one empty block
        return [(slice(b, min(b + n, B)), slice(0, K)) for b in range(0, B, n)]
    n = max(1, budget // (G * T * S))
    return [(slice(b, b + 1), slice(j, min(j + n, K))) for b in range(B) for j in range(0, K, n)]


def _masked_scores(q5: Array, k: Array, hidden: Array, block: Block, scale: float) -> Array:
    """s = q kᵀ·scale of a block of (sequence, kv group) pairs, −inf where ``hidden``: a fresh array.

    The G query heads of a group are stacked as G·T rows, so a pair is one (G·T, D) × (D, S) matmul.
    The scale goes on q (T·D values) rather than on the scores (T·S values).

    Shapes:
        q5: (B, K, G, T, D)   k: (B, K, S, D)   hidden: (B, K, G, T, S), a broadcast view of ~allowed
        returns: (b, j, G·T, S) for a block of b sequences and j groups
    """
    xp = get_xp(q5)
    seqs, groups = block
    _, _, G, T, D = q5.shape
    qb = q5[seqs, groups]  # (b, j, G, T, D), a view
    nb, nj = qb.shape[:2]
    kt = xp.ascontiguousarray(k[seqs, groups].swapaxes(-1, -2))  # (b, j, D, S): BLAS reads it faster
    scores = (qb.reshape(nb, nj, G * T, D) * scale) @ kt  # (b, j, G·T, S)
    mask = hidden[seqs, groups]  # (b, j, G, T, S), a view
    xp.copyto(scores.reshape(mask.shape), -xp.inf, where=mask)
    return scores


def _hidden(allowed: Array, shape: tuple[int, ...]) -> Array:
    """~allowed broadcast to (B, K, G, T, S): built once per call at the mask's own size."""
    return get_xp(allowed).broadcast_to(~allowed, shape)


def attention_forward(
    q: Array, k: Array, v: Array, allowed: Array, *, scale: float | None = None
) -> tuple[Array, AttentionCache]:
    """out = softmax(q kᵀ · scale masked) v, per head, query head h reading kv head h // G.

    ``scale`` defaults to 1/sqrt(D); Gemma 3 sets its own (1/sqrt(query_pre_attn_scalar)).

    The probabilities are built a block of (sequence, key/value group) pairs at a time
    (``score_blocks``) and not kept: the cache holds q, k, v and each row's log-sum-exp
    ℓ = log Σ_j exp(s_j), from which the backward rebuilds p = exp(s − ℓ) with one matmul and one exp
    per entry (as FlashAttention does, Dao et al. 2022, §3.1). A kept p would cost B·H·T·S values per
    layer, the largest activation of a block at long T; one block of at most ``SCORE_BLOCK`` scores at
    a time (on a GPU, ``backend.GPU_BLOCK``) is all that ever exists.

    NOTE: masked scores are −inf, and a query row with no visible key (a padding query under left
    padding) gets all-zero probabilities instead of NaN (its ℓ is +inf, so exp(s − ℓ) is 0 too);
    such rows are never read by a counted output.

    Shapes:
        q: (B, H, T, D)   k, v: (B, K, S, D)   allowed: broadcastable to (B, K, G, T, S)
        returns: (B, H, T, D)
    """
    xp = get_xp(q)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    scale = D**-0.5 if scale is None else scale
    q5 = q.reshape(B, K, G, T, D)
    hidden = _hidden(allowed, (B, K, G, T, S))
    out = xp.empty((B, K, G * T, D), dtype=xp.result_type(q, v))
    lse = xp.empty((B, K, G * T, 1), dtype=out.dtype)
    for block in score_blocks(B, K, G, T, S, block_size(xp, SCORE_BLOCK)):  # no (B, H, T, S) array
        p = _masked_scores(q5, k, hidden, block, scale)  # in place from here on: p reuses the scores
        m = p.max(axis=-1, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0.0)  # fully masked rows: exp(−inf − 0) = 0
        p -= m
        xp.exp(p, out=p)
        denom = p.sum(axis=-1, keepdims=True)
        empty = denom == 0
        p /= xp.where(empty, 1.0, denom)
        xp.matmul(p, v[block], out=out[block])  # a block of (B, K, …) arrays is a view: no copy
        lse[block] = xp.where(empty, xp.inf, m + xp.log(xp.where(empty, 1.0, denom)))
    return out.reshape(B, H, T, D), AttentionCache(q5, k, v, lse, allowed, scale)


def attention_probabilities(cache: AttentionCache, b: int, j: int | None = None) -> Array:
    """p = softmax of sequence b's masked scores, rebuilt from the cache as exp(s − ℓ): of kv head j's
    group, or of every group when j is None.

    Shapes:
        returns: (G·T, S) for one group, (K, G·T, S) for all
    """
    B, K, G, T, _ = cache.q.shape
    hidden = _hidden(cache.allowed, (B, K, G, T, cache.k.shape[2]))
    block = (slice(b, b + 1), slice(0, K) if j is None else slice(j, j + 1))
    p = _block_probabilities(cache, hidden, block)[0]
    return p if j is None else p[0]


def _block_probabilities(cache: AttentionCache, hidden: Array, block: Block) -> Array:
    """p = exp(s − ℓ) of a block of (sequence, kv group) pairs (``score_blocks``): (b, j, G·T, S)."""
    xp = get_xp(cache.q)
    p = _masked_scores(cache.q, cache.k, hidden, block, cache.scale)
    p -= cache.lse[block]
    return xp.exp(p, out=p)


def attention_backward(dout: Array, cache: AttentionCache) -> tuple[Array, Array, Array]:
    """Return (dq, dk, dv).

    forward: s = q kᵀ·scale, p = softmax(s), out = p v, so
    dv = Σ_G pᵀ dout,  dp = dout vᵀ,  ds = p ⊙ (dp − Σ_j dp ⊙ p),
    dq = ds k · scale,  dk = Σ_G dsᵀ q · scale   (Σ_G: the G query heads sharing a kv head).
    p is rebuilt one block of (sequence, group) pairs at a time, as the forward built it.

    Shapes:
        dout: (B, H, T, D)   returns dq: (B, H, T, D), dk, dv: (B, K, S, D)
    """
    xp = get_xp(dout)
    q5, k, v = cache.q, cache.k, cache.v
    B, K, G, T, D = q5.shape
    S = k.shape[2]
    q4 = q5.reshape(B, K, G * T, D)
    dout = dout.reshape(B, K, G * T, D)  # the G heads of a group stacked, as in the forward
    hidden = _hidden(cache.allowed, (B, K, G, T, S))
    # textbook:  dv = pᵀ dout;  dp = dout vᵀ;  ds = p ⊙ (dp − Σ_j dp ⊙ p);
    #            dq = ds k · scale;  dk = dsᵀ q · scale
    # below, per block of (sequence, group) pairs: p is rebuilt from q, k and the row log-sum-exp,
    # and the dp buffer becomes ds in place (one block of scores instead of two)
    dq = xp.empty((B, K, G * T, D), dtype=dout.dtype)
    dk, dv = xp.empty_like(k, dtype=dout.dtype), xp.empty_like(v, dtype=dout.dtype)
    for block in score_blocks(B, K, G, T, S, block_size(xp, SCORE_BLOCK)):
        p = _block_probabilities(cache, hidden, block)  # (b, j, G·T, S)
        xp.matmul(p.swapaxes(-1, -2), dout[block], out=dv[block])  # the matmul sums over the G heads
        ds = dout[block] @ v[block].swapaxes(-1, -2)  # dp, turned into ds / scale in place
        ds -= xp.einsum("...ts,...ts->...t", ds, p)[..., None]  # Σ_j dp ⊙ p, no block-sized temporary
        ds *= p
        del p
        xp.matmul(ds, k[block], out=dq[block])
        xp.matmul(ds.swapaxes(-1, -2), q4[block], out=dk[block])
    dq *= cache.scale  # the scale goes on dq and dk (T·D values each) rather than on ds
    dk *= cache.scale
    return dq.reshape(B, K * G, T, D), dk, dv
