"""Causal grouped-query attention: out = softmax(q kᵀ / √D, masked) v, query head h reading kv head
h // (H/K), as transformers' ``LlamaAttention`` with eager attention.

Properties: the mask lets query i (at absolute position S − T + i) see the non-padding keys j ≤ S − T + i;
the forward matches the naive per-query reference (GQA, padding, cached keys); dq, dk, dv match
finite differences; the output at t does not depend on tokens after t; GQA with K = H is plain
multi-head attention, and GQA equals MHA on repeat_interleaved keys and values (with dk, dv summed
over the group); masked padding keys change no output; a query with no visible key gives zeros, not
NaN; the KV-cache path (S > T) equals the last rows of the full computation; float32 is preserved.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.backend import to_numpy
from minift.layers import attention
from minift.layers.attention import attention_backward, attention_forward, causal_mask
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations, attention_shapes


def _qkv(rng, B, H, K, T, S, D, scale=1.0):
    return (scale * rng.standard_normal((B, H, T, D)), scale * rng.standard_normal((B, K, S, D)),
            rng.standard_normal((B, K, S, D)))


def _attend(q, k, v, key_mask=None):
    return attention_forward(q, k, v, causal_mask(q.shape[2], k.shape[2], key_mask))[0]


def test_causal_mask_lets_query_i_see_key_j_iff_j_is_at_most_its_position_and_not_padding(xp):
    T, S = 3, 5  # two cached positions: query i sits at absolute position 2 + i
    key_mask = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    allowed = causal_mask(T, S, xp.asarray(key_mask), xp=xp)
    assert allowed.shape == (2, 1, 1, T, S)
    expected = np.array([[[j <= 2 + i and key_mask[b, j] == 1 for j in range(S)] for i in range(T)]
                         for b in range(2)])
    np.testing.assert_array_equal(to_numpy(allowed)[:, 0, 0], expected)


@pytest.mark.parametrize(("H", "K", "T", "S"), [(2, 2, 4, 4), (4, 2, 4, 4), (3, 1, 2, 5)])
def test_attention_forward_matches_the_naive_reference(xp, rng, H, K, T, S):
    q, k, v = _qkv(rng, 2, H, K, T, S, 4, scale=2.0)
    key_mask = np.ones((2, S), dtype=np.int64)
    key_mask[1, :2] = 0  # left padding in the second row
    allowed = causal_mask(T, S, xp.asarray(key_mask), xp=xp)
    out, _ = attention_forward(xp.asarray(q), xp.asarray(k), xp.asarray(v), allowed)
    assert_close(out, ref.attention(q, k, v, key_mask), rtol=1e-10, atol=1e-12, what="out")


@pytest.mark.parametrize(("H", "K", "T", "S"), [(4, 2, 4, 4), (2, 1, 2, 4)], ids=["gqa", "gqa-kv-cache"])
def test_attention_backward_gives_the_finite_difference_gradient_of_q_k_and_v(rng, H, K, T, S):
    key_mask = np.ones((2, S), dtype=np.int64)
    key_mask[0, 0] = 0
    allowed = causal_mask(T, S, key_mask)

    def backward(G, q, k, v):
        dq, dk, dv = attention_backward(G, attention_forward(q, k, v, allowed)[1])
        return {"q": dq, "k": dk, "v": dv}

    q, k, v = _qkv(rng, 2, H, K, T, S, 4, scale=1.5)
    check_grad(lambda q, k, v: attention_forward(q, k, v, allowed)[0], backward, {"q": q, "k": k, "v": v},
               rng=rng)


@given(shape=attention_shapes(), t=st.integers(0, 4), seed=st.integers(0, 2**16))
@example(shape=(1, 2, 1, 4, 4, 2), t=1, seed=0)
def test_the_output_at_t_does_not_change_when_tokens_after_t_are_perturbed(shape, t, seed):
    B, H, K, T, S, D = shape
    t = min(t, T - 1)
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B, H, K, T, S, D)
    after = S - T + t + 1  # first key position after query t
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[:, :, t + 1:] += rng.standard_normal(q2[:, :, t + 1:].shape)
    k2[:, :, after:] += rng.standard_normal(k2[:, :, after:].shape)
    v2[:, :, after:] += rng.standard_normal(v2[:, :, after:].shape)
    assert_close(_attend(q2, k2, v2)[:, :, : t + 1], _attend(q, k, v)[:, :, : t + 1], rtol=1e-12, atol=1e-12,
                 what="out[:t+1]")


def _mha(q, k, v):
    """Plain causal multi-head attention, written with einsum: head h reads kv head h."""
    T, D = q.shape[2], q.shape[3]
    s = np.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bhts,bhsd->bhtd", p / p.sum(axis=-1, keepdims=True), v)


@given(q=activations((1, 3, 4, 2)), k=activations((1, 3, 4, 2)), v=activations((1, 3, 4, 2)))
@example(q=np.ones((1, 3, 4, 2)), k=np.arange(24.0).reshape(1, 3, 4, 2) / 8, v=np.ones((1, 3, 4, 2)))
def test_gqa_with_as_many_kv_heads_as_query_heads_is_plain_multi_head_attention(q, k, v):
    assert_close(_attend(q, k, v), _mha(q, k, v), rtol=1e-10, atol=1e-12, what="out")


@given(shape=attention_shapes(), seed=st.integers(0, 2**16))
@example(shape=(1, 4, 2, 3, 3, 2), seed=0)
def test_gqa_equals_mha_on_repeat_interleaved_kv_heads_and_sums_their_gradients(shape, seed):
    B, H, K, T, S, D = shape
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B, H, K, T, S, D)
    G, dout = H // K, rng.standard_normal((B, H, T, D))
    allowed = causal_mask(T, S)
    out, cache = attention_forward(q, k, v, allowed)
    out_r, cache_r = attention_forward(q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1), allowed)
    assert_close(out, out_r, rtol=1e-12, atol=1e-12, what="out")
    (dq, dk, dv), (dq_r, dk_r, dv_r) = attention_backward(dout, cache), attention_backward(dout, cache_r)
    assert_close(dq, dq_r, rtol=1e-10, atol=1e-12, what="dq")
    assert_close(dk, dk_r.reshape(B, K, G, S, D).sum(axis=2), rtol=1e-10, atol=1e-12, what="dk")
    assert_close(dv, dv_r.reshape(B, K, G, S, D).sum(axis=2), rtol=1e-10, atol=1e-12, what="dv")


@given(shape=attention_shapes(), n_pad=st.integers(1, 3), seed=st.integers(0, 2**16))
@example(shape=(1, 2, 1, 3, 3, 2), n_pad=1, seed=0)
def test_masked_padding_keys_change_no_output(shape, n_pad, seed):
    B, H, K, T, S, D = shape
    n_pad = min(n_pad, S - 1)
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B, H, K, T, S, D)
    key_mask = np.ones((B, S), dtype=np.int64)
    key_mask[:, :n_pad] = 0  # left padding
    k2, v2 = k.copy(), v.copy()
    k2[:, :, :n_pad] = 100 * rng.standard_normal(k2[:, :, :n_pad].shape)
    v2[:, :, :n_pad] = 100 * rng.standard_normal(v2[:, :, :n_pad].shape)
    assert_close(_attend(q, k2, v2, key_mask), _attend(q, k, v, key_mask), rtol=1e-12, atol=1e-12, what="out")


def test_a_query_with_no_visible_key_gives_zeros_and_zero_gradients_not_nan(rng):
    q, k, v = _qkv(rng, 1, 2, 1, 3, 3, 4)
    key_mask = np.array([[0, 0, 1]])  # queries 0 and 1 see only padding
    out, cache = attention_forward(q, k, v, causal_mask(3, 3, key_mask))
    dq, dk, dv = attention_backward(np.ones_like(out), cache)
    for a in (out, dq, dk, dv):
        assert np.isfinite(a).all()
    np.testing.assert_array_equal(out[:, :, :2], 0.0)
    np.testing.assert_array_equal(dq[:, :, :2], 0.0)
    assert_close(out[:, :, 2], np.broadcast_to(v[:, :, 2], (1, 2, 4)), rtol=1e-12, atol=0, what="out[2]")


@given(shape=attention_shapes(), seed=st.integers(0, 2**16))
@example(shape=(1, 2, 1, 1, 4, 2), seed=0)
def test_the_kv_cache_path_equals_the_last_rows_of_the_full_computation(shape, seed):
    B, H, K, T, S, D = shape
    rng = np.random.default_rng(seed)
    q_full, k, v = _qkv(rng, B, H, K, S, S, D)  # every position's query
    assert_close(_attend(q_full[:, :, S - T:], k, v), _attend(q_full, k, v)[:, :, S - T:], rtol=1e-12,
                 atol=1e-12, what="cached rows")


def test_attention_keeps_float32(xp, rng):
    q, k, v = (xp.asarray(a.astype(np.float32)) for a in _qkv(rng, 1, 2, 1, 3, 3, 4))
    out, cache = attention_forward(q, k, v, causal_mask(3, 3, xp=xp))
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in attention_backward(out, cache))


def _attention_backward_keeping_p(q, k, v, allowed, dout):
    """The textbook backward with the probabilities kept from the forward, head by head: the
    reference that the cache-free backward (p rebuilt from q, k and the row log-sum-exp) must equal."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    mask = np.broadcast_to(allowed, (B, k.shape[1], G, T, k.shape[2])).reshape(B, H, T, -1)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(B):
        for h in range(H):
            s = np.where(mask[b, h], q[b, h] @ k[b, h // G].T / math.sqrt(D), -np.inf)
            m = s.max(axis=-1, keepdims=True)
            e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
            total = e.sum(axis=-1, keepdims=True)
            p = e / np.where(total == 0, 1.0, total)
            dv[b, h // G] += p.T @ dout[b, h]
            dp = dout[b, h] @ v[b, h // G].T
            ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
            dq[b, h] = ds @ k[b, h // G] / math.sqrt(D)
            dk[b, h // G] += ds.T @ q[b, h] / math.sqrt(D)
    return dq, dk, dv


@given(attention_shapes(), st.integers(0, 2**32 - 1), st.booleans())
def test_the_backward_that_rebuilds_p_equals_the_one_that_keeps_it(shape, seed, left_padding):
    """No probabilities are cached, yet dq, dk, dv equal those of the backward that keeps p, to 1e-12,
    with causal masks, cached positions and left padding (rows with no visible key included)."""
    B, H, K, T, S, D = shape
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B, H, K, T, S, D, scale=2.0)
    key_mask = np.ones((B, S), dtype=np.int64)
    if left_padding:
        key_mask[:, : rng.integers(0, S + 1)] = 0  # up to every key: rows with nothing to read
    allowed = causal_mask(T, S, key_mask)
    dout = rng.standard_normal((B, H, T, D))
    _, cache = attention_forward(q, k, v, allowed)
    kept = sum(a.nbytes for a in cache if isinstance(a, np.ndarray) and a.dtype == np.float64)
    assert kept == q.nbytes + k.nbytes + v.nbytes + B * H * T * 8  # q, k, v and one number per row
    got = attention_backward(dout, cache)
    want = _attention_backward_keeping_p(q, k, v, allowed, dout)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert_close(g, w, rtol=1e-12, atol=1e-12, what=name)


BLOCK_SIZES = [(1, 0), (2, 0), (0, 2), (0, 3), (0, 2**20)]  # (pairs, whole sequences) a block holds


@given(attention_shapes(), st.integers(0, 2**32 - 1), st.sampled_from(BLOCK_SIZES))
def test_how_many_pairs_a_block_holds_changes_no_output_and_no_gradient(shape, seed, size):
    """The forward and the backward take (sequence, kv group) pairs ``SCORE_BLOCK`` scores at a time:
    one pair, two pairs or two or three whole sequences a block (blocks that do not divide K or B
    included), or everything at once, give the same outputs, log-sum-exps and gradients, to 1e-12,
    under left padding and a sliding window."""
    B, H, K, T, S, D = shape
    pairs, sequences = size
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B, H, K, T, S, D, scale=2.0)
    key_mask = np.ones((B, S), dtype=np.int64)
    key_mask[:, : rng.integers(0, S + 1)] = 0
    allowed = causal_mask(T, S, key_mask, window=int(rng.integers(1, S + 1)))
    dout = rng.standard_normal((B, H, T, D))

    def run() -> tuple[np.ndarray, dict[str, np.ndarray]]:
        out, cache = attention_forward(q, k, v, allowed)
        empty = np.isinf(cache.lse)  # rows with no visible key: +inf by design
        dq, dk, dv = attention_backward(dout, cache)
        return empty, {"out": out, "lse": np.where(empty, 0.0, cache.lse), "dq": dq, "dk": dk, "dv": dv}

    want_empty, want = run()
    with pytest.MonkeyPatch.context() as mp:
        per_pair = (H // K) * T * S
        mp.setattr(attention, "SCORE_BLOCK", per_pair * max(pairs, K * sequences))
        got_empty, got = run()
    assert np.array_equal(got_empty, want_empty)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, what=name)
