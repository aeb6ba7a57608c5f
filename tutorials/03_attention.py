# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 03 · Attention with grouped-query heads and the causal mask, forward and backward
#
# **What you will build.** Causal scaled-dot-product attention as a Llama-family model runs it:
# H query heads sharing K key/value heads (grouped-query attention, GQA), a causal mask so that
# token t reads only tokens ≤ t, and an optional padding mask. You will write it naively, one head
# at a time, compare it with the library's batched version, derive its backward (the softmax
# backward of tutorial 01, plus a sum over the heads of a group), write that backward yourself in
# the library's layout — one head reshape instead of a loop, a mask aligned for a KV cache — and
# run the counterexamples behind two design choices: masking with −∞ and not caching the
# probabilities.
#
# **Prerequisites.** Tutorial 01 (softmax backward, `check_grad`); tutorial 02 (RoPE is applied to
# q and k before this step).
#
# **Library functions explained here.** `minift.layers.attention.causal_mask`,
# `minift.layers.attention.attention_forward`, `minift.layers.attention.attention_backward`,
# `minift.layers.attention.AttentionCache`, `minift.layers.attention.attention_probabilities`.

# %%
import numpy as np

from minift.layers.attention import (
    attention_backward,
    attention_forward,
    attention_probabilities,
    causal_mask,
)
from minift.testing import assert_close, check_grad

rng = np.random.default_rng(0)
B, H, K, T, D = 1, 4, 2, 5, 4  # 4 query heads, 2 key/value heads: G = H // K = 2 per group
G = H // K
q = rng.standard_normal((B, H, T, D))
k = rng.standard_normal((B, K, T, D))
v = rng.standard_normal((B, K, T, D))

# %% [markdown]
# ## 1. One head at a time
#
# q holds H query heads and k, v hold K key/value heads, each head a (T, D) array of T tokens of
# width D: q is (B, H, T, D), k and v are (B, K, T, D). The query heads come in K groups of
# G = H / K consecutive heads, and every head of group `kv` reads key/value head `kv`; so query
# head h reads key/value head `h // G`. Here, with H = 4 and K = 2:
#
#     query head h:         0  1  2  3
#     key/value head h//G:  0  0  1  1        (G = 2 query heads per group)
#
# For one query head h:
#
# `scores = q_h k_{h//G}ᵀ / √D` (T × T), entries above the diagonal set to −∞ (token i may not
# read key j > i), `p = softmax(scores)` row by row, `out_h = p v_{h//G}`.
#
# The 1/√D keeps the scores' variance near 1 when q and k have unit-variance entries, so the
# softmax does not saturate as D grows.

# %%
def attention_naive(q, k, v):
    out = np.zeros_like(q)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # True above the diagonal
    for b in range(B):
        for h in range(H):
            kv = h // G  # the key/value head this query head reads
            scores = q[b, h] @ k[b, kv].T / np.sqrt(D)  # (T, T)
            scores[future] = -np.inf
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[b, h] = p @ v[b, kv]
    return out


allowed = causal_mask(T, T)  # (1, 1, 1, T, T) boolean: which keys each query may read (section 2)
out, cache = attention_forward(q, k, v, allowed)
assert_close(out, attention_naive(q, k, v), rtol=1e-12, atol=1e-14, what="attention vs naive")
print("allowed[0, 0, 0] =\n", allowed[0, 0, 0].astype(int))

# %% [markdown]
# ### How the library avoids the head loop and the copy
#
# Hugging Face implements GQA by *repeating* each key/value head G times (`repeat_kv`) and then
# running ordinary multi-head attention. minift instead groups the queries by key/value head:
# the G query heads of a group are stacked as G·T rows, (B, K, G·T, D), so that one batched
# matmul per group reads the group's single key/value head. No copy of K or V is made. The two
# are the same function:

# %%
k_rep = np.repeat(k, G, axis=1)  # (B, H, T, D): what repeat_kv builds
v_rep = np.repeat(v, G, axis=1)
out_mha, _ = attention_forward(q, k_rep, v_rep, allowed)  # plain MHA, K = H
assert_close(out, out_mha, rtol=1e-12, atol=1e-14, what="GQA vs repeated-KV MHA")
print("cached for the backward:", cache._fields, "q is stored as", cache.q.shape)  # lse: section 4

# %% [markdown]
# ## 2. The causal mask, and why −∞
#
# `causal_mask(T, S)` says which of S keys each of T queries may read: a (T, S) grid, True where
# query t may read key j, with three leading axes of size 1 so that it broadcasts over the batch
# and the heads. Usually S = T, as in section 1. During generation with a KV cache (tutorial 05)
# the keys are the P cached positions plus the T new ones, S = P + T, and the new queries are the
# *last* T positions: query t sits at absolute position P + t = S − T + t and may read keys
# 0 … S − T + t. So the mask is aligned at the **bottom-right** corner of the (T, S) grid, not the
# top-left. (The README's notation table lists this use of S, the number of keys, next to its use
# in S2FT, the number of selected heads or channels.) For T = 3 new queries after P = 2 cached
# positions:
#
#              keys j:  0 1 2 3 4
#     query 0 (pos 2):  1 1 1 0 0
#     query 1 (pos 3):  1 1 1 1 0
#     query 2 (pos 4):  1 1 1 1 1
#
# Causality is a property you can test directly: perturb the keys and values of tokens after t and
# the outputs at positions ≤ t must not move.

# %%
assert np.array_equal(causal_mask(3, 5)[0, 0, 0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
t = 2
k2, v2 = k.copy(), v.copy()
k2[:, :, t + 1 :] += 5.0
v2[:, :, t + 1 :] -= 3.0
out2, _ = attention_forward(q, k2, v2, allowed)
assert np.array_equal(out2[:, :, : t + 1], out[:, :, : t + 1])
print(f"outputs at positions ≤ {t} are bit-identical after changing the future")

# %% [markdown]
# Masked scores are set to −∞, not to a "very negative" number. A finite fill value works until
# the real scores are as large as it is — which happens with large activations, and sooner in
# float16, whose range ends at ±65504 so that the fill cannot be made much larger. Then the
# future leaks in:

# %%
def attention_with_finite_mask(q, k, v, fill):
    scores = q @ np.repeat(k, G, axis=1).swapaxes(-1, -2) / np.sqrt(D)  # (B, H, T, T)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, fill)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p @ np.repeat(v, G, axis=1)


big_q = q * 3e4  # scores of order 1e4
leak_a = attention_with_finite_mask(big_q, k, v, fill=-1e4)
leak_b = attention_with_finite_mask(big_q, k2, v2, fill=-1e4)
leak = np.abs(leak_a[:, :, : t + 1] - leak_b[:, :, : t + 1]).max()
exact_a, _ = attention_forward(big_q, k, v, allowed)
exact_b, _ = attention_forward(big_q, k2, v2, allowed)
print(f"largest change of an output at positions ≤ {t} when the future changes: {leak:.3f} with "
      f"fill = −1e4, {np.abs(exact_a - exact_b)[:, :, : t + 1].max()} with −∞")
assert leak > 1e-3
assert np.array_equal(exact_a[:, :, : t + 1], exact_b[:, :, : t + 1])

# %% [markdown]
# ### Padding
#
# A batch of sequences of different lengths is padded; a `key_mask` (1 = token, 0 = padding)
# hides the padding keys as well. With left padding, a padding *query* at the start can see no key
# at all. Its softmax row would be 0/0 = NaN; the library returns zeros instead (such a row is
# never read by a counted output, but a NaN would poison every sum it touches).

# %%
key_mask = np.array([[0, 0, 1, 1, 1]])  # two left-padding positions
allowed_pad = causal_mask(T, T, key_mask)
out_pad, _ = attention_forward(q, k, v, allowed_pad)
assert np.all(out_pad[:, :, 0] == 0)
assert np.isfinite(out_pad).all()
print("fully masked query rows:", out_pad[0, 0, :2].round(3).tolist())

# %% [markdown]
# ## 3. The backward pass
#
# Forward per head: `s = q kᵀ · c` (c = 1/√D), `p = softmax(s)`, `out = p v`. Reverse it:
#
# * `out = p v` is a matrix product: `dp = dout vᵀ`, `dv = pᵀ dout`;
# * the row-wise softmax (tutorial 01, section 4): `ds = p ⊙ (dp − Σ_j dp ⊙ p)`;
# * `s = c · q kᵀ`: `dq = c · ds k`, `dk = c · dsᵀ q`.
#
# A masked entry has `p = 0`, hence `ds = 0`: no gradient flows to the future, and the −∞ needs
# no special case in the backward. With GQA, a key/value head is *used* by G query heads, so it
# receives the **sum** of their gradients (tutorial 01: a value used twice gets both gradients).

# %%
def attention_backward_naive(dout, q, k, v):
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    for b in range(B):
        for h in range(H):
            kv = h // G
            s = q[b, h] @ k[b, kv].T / np.sqrt(D)
            s[future] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            dp = dout[b, h] @ v[b, kv].T
            dv[b, kv] += p.T @ dout[b, h]  # += : the G heads of a group share v
            ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
            dq[b, h] = ds @ k[b, kv] / np.sqrt(D)
            dk[b, kv] += ds.T @ q[b, h] / np.sqrt(D)
    return dq, dk, dv


dout = rng.standard_normal(out.shape)
ours = attention_backward_naive(dout, q, k, v)
lib = attention_backward(dout, cache)
for name, a, e in zip(("dq", "dk", "dv"), lib, ours, strict=True):
    assert_close(a, e, rtol=1e-12, atol=1e-14, what=name)


def attn(q, k, v):
    return attention_forward(q, k, v, allowed)[0]


def attn_grads(Gup, q, k, v):  # Gup: check_grad's upstream gradient (G counts heads here)
    dq, dk, dv = attention_backward(Gup, attention_forward(q, k, v, allowed)[1])
    return {"q": dq, "k": dk, "v": dv}


print(check_grad(attn, attn_grads, {"q": q.copy(), "k": k.copy(), "v": v.copy()}))

# %% [markdown]
# ### The same backward in the library's layout: one reshape instead of the head loop
#
# The naive backward accumulates with `+=` into buffers it allocated itself. The library avoids
# both the loop and the `+=` with one reshape. q is (B, H, T, D) with H = K·G, and NumPy's
# row-major reshape to (B, K, G·T, D) splits the head index as h = kv·G + g — exactly "head h
# reads key/value head h // G" — and stacks the G heads of a group as G·T rows. Then every
# product is one batched matmul per key/value head, and the mask, (T, S) per head, is
# broadcast to (B, K, G, T, S) and reshaped the same way. The backward of a reshape is the inverse
# reshape (it only moves entries), and the group sum comes for free: `dv = pᵀ dout` and
# `dk = dsᵀ q` contract over all G·T rows at once, which *is* the sum over the G heads.
#
# Here is the forward in that layout, for T = 3 new queries against S = 5 keys (the KV-cache
# shape of section 2, so that the mask's bottom-right alignment matters):

# %%
def softmax_rows(s):
    """Softmax over the last axis; −∞ entries get probability 0."""
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_grouped(q, k, v, allowed):
    """Returns out (B, H, T, D) and p (B, K, G·T, S), the probabilities the backward needs."""
    B, H, T, D = q.shape  # the sizes of these arrays, not the tutorial's global ones
    K, S = k.shape[1], k.shape[2]
    G = H // K
    qg = q.reshape(B, K, G * T, D)  # head h = kv·G + g → row g·T + t of group kv
    s = qg @ k.swapaxes(-1, -2) / np.sqrt(D)  # (B, K, G·T, S)
    mask = np.broadcast_to(allowed, (B, K, G, T, S)).reshape(B, K, G * T, S)
    p = softmax_rows(np.where(mask, s, -np.inf))
    return (p @ v).reshape(B, H, T, D), p


Tn, S = 3, 5
q3 = rng.standard_normal((B, H, Tn, D))
k5, v5 = rng.standard_normal((B, K, S, D)), rng.standard_normal((B, K, S, D))
out3, p3 = attention_grouped(q3, k5, v5, causal_mask(Tn, S))
assert_close(out3, attention_forward(q3, k5, v5, causal_mask(Tn, S))[0], rtol=1e-12, atol=1e-14,
             what="grouped forward")
print("where p > 0 for query head 0 (rows: its 3 queries, columns: the 5 keys):\n",
      (p3[0, 0, :Tn] > 0).astype(int))

# %% [markdown]
# **Your turn.** Write the backward in the same layout, in the cell below: reshape `q` and `dout`
# to (B, K, G·T, D), then the formulas at the start of this section (`dv` and `dp`, `ds` with the
# softmax backward of tutorial 01, `dq` and `dk` with the scale 1/√D), and reshape `dq` back to
# (B, H, T, D). No loop, no `+=`, no special case for the masked entries (their `p` is 0). The
# check compares each of the three arrays with the library's `attention_backward`.

# %%
def attention_backward_grouped(dout, q, k, v, p):
    """(dq, dk, dv) for out = attention_grouped(q, k, v, allowed)[0], given dout (B, H, T, D) and
    the forward's p (B, K, G·T, S): dq like q, dk like k, dv like v."""
    return None  # your code here


def check_attention_backward_grouped(attention_backward_grouped):
    dout3 = np.random.default_rng(9).standard_normal(q3.shape)
    mine = attention_backward_grouped(dout3, q3, k5, v5, p3)
    if mine is None:
        print("your turn (attention backward): not answered yet")
        return
    lib = attention_backward(dout3, attention_forward(q3, k5, v5, causal_mask(Tn, S))[1])
    for name, a, e in zip(("dq", "dk", "dv"), mine, lib, strict=True):
        assert np.shape(a) == e.shape, f"{name}: shape {np.shape(a)}, expected {e.shape}"
        assert_close(a, e, rtol=1e-10, atol=1e-13, what=name)
    print("your turn (attention backward): correct")


check_attention_backward_grouped(attention_backward_grouped)

# %% [markdown]
# The library's `attention_backward` is that function, with two economies: it rebuilds p instead
# of receiving it (section 4), and it works a block of (sequence, group) pairs at a time. It
# returns fresh arrays, so calling it twice gives the same answer.
#
# The gradient respects causality too: an upstream gradient on position t alone reaches only the
# keys and values at positions ≤ t.

# %%
dout_t = np.zeros_like(dout)
dout_t[:, :, t] = dout[:, :, t]
_, dk_t, dv_t = attention_backward(dout_t, cache)
assert np.all(dk_t[:, :, t + 1 :] == 0)
assert np.all(dv_t[:, :, t + 1 :] == 0)

# %% [markdown]
# ## 4. Why the cache does not keep the probabilities
#
# The backward needs `p`, but `AttentionCache` holds only q, k, v (each needed for another's
# gradient) and one number per query row, the log-sum-exp ℓ = log Σ_j exp(s_j) of its masked
# scores. The backward rebuilds `p = exp(s − ℓ)` a block of sequences at a time, at the cost of a
# second `q kᵀ` matmul plus an `exp` per entry. What that buys is memory: `p` has B·H·T·S entries,
# which grows with the square of the sequence length and would be the largest activation in a block
# at long T:

# %%
for T_ in (16, 256, 4096):
    p_bytes = 4 * 1 * 32 * T_ * T_  # float32, B = 1, H = 32
    qkv_bytes = 4 * 1 * (32 + 2 * 8) * T_ * 128  # q (H heads) + k, v (K = 8 heads), D = 128
    print(f"T = {T_:>4}: p takes {p_bytes / 2**20:9.1f} MiB, q+k+v take {qkv_bytes / 2**20:6.1f} MiB")

# %% [markdown]
# FlashAttention removes that quadratic term the same way, recomputing `p` block by block in the
# backward. The rebuilt probabilities are those of the forward, to rounding:

# %%
s0 = q[0] @ np.repeat(k[0], G, axis=0).swapaxes(-1, -2) / np.sqrt(D)  # (H, T, T), sequence 0
p0 = np.exp(np.where(allowed[0, 0, 0], s0, -np.inf))
p0 /= p0.sum(axis=-1, keepdims=True)
assert_close(attention_probabilities(cache, 0).reshape(H, T, T), p0, rtol=1e-12, atol=1e-15, what="p")

# %% [markdown]
# (Tutorial 04 measures where a whole training step's memory goes.)
#
# ## Summary
#
# * GQA = MHA with each key/value head shared by G query heads; minift views q as (B, K, G, T, D)
#   instead of copying k and v.
# * Mask with −∞: exact zeros, no leak at any scale; fully masked rows return zeros, not NaN.
# * Backward: `dv = pᵀ dout`, `ds = p ⊙ (dp − Σ dp ⊙ p)`, `dq = c · ds k`, `dk = c · dsᵀ q`,
#   summed over the query heads of each group — which the reshape (B, H, T, D) → (B, K, G·T, D)
#   turns into plain matmuls over G·T rows.
# * With S keys and T queries the causal mask is aligned bottom-right: query t reads keys
#   0 … S − T + t.
#
# ## Exercises
#
# 1. **KV cache.** During generation the keys and values of earlier tokens are kept, and only the
#    newest query is computed. Write the (T, S) mask of T new queries after S − T cached positions
#    yourself, then call `attention_forward` with q of the last position only (T = 1), the full k
#    and v (S = 5) and `causal_mask(1, 5)`, and show it equals the last row of the full computation.
# 2. **Multi-query attention and `repeat_kv`.** Hugging Face's `repeat_kv` copies each key/value
#    head G times, so that plain multi-head attention can run on (B, H, S, D) keys. Given the
#    gradient of those repeated keys, fold it back into the gradient of the K original heads, and
#    check against the library's `dk`, first for K = 1 (multi-query attention), then for K = 2.
# 3. **Softmax temperature.** Write the mean entropy −Σ_j p_j log p_j of attention rows (masked
#    entries, where p = 0, contribute 0). Drop the 1/√D scaling (multiply q by √D) and measure how
#    the entropy changes for D = 4, 64 and 1024 with standard-normal q and k.
#
# Solutions: `tutorials/solutions/03_attention.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: a check
# prints "not answered yet" while its function returns None, "correct" when your answer is right,
# and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def kv_cache_mask(T, S):
    """Exercise 1: the (T, S) boolean mask of T new queries against S keys, of which the first
    S − T are cached: True where query t may read key j."""
    return None  # your code here


def check_kv_cache_mask(kv_cache_mask):
    if kv_cache_mask(1, 1) is None:
        print("exercise 1: not answered yet")
        return
    for T, S in [(1, 5), (3, 5), (4, 4), (2, 7)]:
        mine, ref = np.asarray(kv_cache_mask(T, S)), causal_mask(T, S)[0, 0, 0]
        assert mine.shape == (T, S), f"T={T}, S={S}: shape {mine.shape}, expected {(T, S)}"
        assert np.array_equal(mine, ref), (
            f"T={T}, S={S}: got\n{mine.astype(int)}\nexpected\n{ref.astype(int)}")
    print("exercise 1: correct")


check_kv_cache_mask(kv_cache_mask)


# %%
def fold_repeated_kv_grad(d_repeated, K):
    """Exercise 2: the gradient of the K key/value heads (B, K, S, D), given the gradient of the
    H = K·G heads that repeat_kv made from them (B, H, S, D), head h a copy of head h // G."""
    return None  # your code here


def check_fold_repeated_kv_grad(fold_repeated_kv_grad):
    r = np.random.default_rng(10)
    if fold_repeated_kv_grad(np.zeros((1, 4, 3, 2)), 2) is None:
        print("exercise 2: not answered yet")
        return
    for K_ in (1, 2):
        q_, dout_ = r.standard_normal((2, 4, 3, 2)), r.standard_normal((2, 4, 3, 2))
        k_, v_ = r.standard_normal((2, K_, 3, 2)), r.standard_normal((2, K_, 3, 2))
        G_ = 4 // K_
        mask_ = causal_mask(3, 3)
        _, dk_rep, _ = attention_backward(dout_, attention_forward(q_, np.repeat(k_, G_, 1),
                                                                   np.repeat(v_, G_, 1), mask_)[1])
        _, dk, _ = attention_backward(dout_, attention_forward(q_, k_, v_, mask_)[1])
        assert_close(fold_repeated_kv_grad(dk_rep, K_), dk, rtol=1e-10, atol=1e-13, what=f"dk, K = {K_}")
    print("exercise 2: correct")


check_fold_repeated_kv_grad(fold_repeated_kv_grad)


# %%
def mean_row_entropy(p):
    """Exercise 3: the mean over rows of −Σ_j p_j log p_j, for probabilities p (..., S) whose rows
    sum to 1; entries with p = 0 contribute 0."""
    return None  # your code here


def check_mean_row_entropy(mean_row_entropy):
    uniform = np.full((2, 4), 0.25)
    if mean_row_entropy(uniform) is None:
        print("exercise 3: not answered yet")
        return
    assert np.isclose(mean_row_entropy(uniform), np.log(4)), "four equal probabilities: entropy log 4"
    _, c = attention_forward(q, k, v, causal_mask(T, T))
    p_causal = attention_probabilities(c, 0)  # (K, G·T, T), zeros above the diagonal
    expected = np.mean([-(row[row > 0] * np.log(row[row > 0])).sum() for row in p_causal.reshape(-1, T)])
    found = mean_row_entropy(p_causal)
    assert np.isfinite(found), f"got {found}: 0 · log 0 must count as 0 (masked keys)"
    assert np.isclose(found, expected, rtol=1e-10), f"got {found}, expected {expected}"
    print("exercise 3: correct")


check_mean_row_entropy(mean_row_entropy)
