# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 03 · Attention

# %%
import numpy as np

from minift.layers.attention import (
    attention_backward,
    attention_forward,
    attention_probabilities,
    causal_mask,
)
from minift.testing import assert_close

rng = np.random.default_rng(3)
B, H, T, D = 1, 4, 5, 4

# %% [markdown]
# ## 1. KV cache
#
# Query t of the T new ones sits at absolute position (S − T) + t and reads every key up to it:
# the mask is aligned at the bottom-right corner. With T = 1 and S = 5 the one query (position 4)
# reads keys 0..4, exactly the last row of the full causal mask.

# %%
def kv_cache_mask(T, S):
    return np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)


assert np.array_equal(kv_cache_mask(1, T), causal_mask(T, T)[0, 0, 0, -1:])
K = 2
q = rng.standard_normal((B, H, T, D))
k = rng.standard_normal((B, K, T, D))
v = rng.standard_normal((B, K, T, D))
full, _ = attention_forward(q, k, v, causal_mask(T, T))
last, _ = attention_forward(q[:, :, -1:], k, v, kv_cache_mask(1, T))
assert_close(last, full[:, :, -1:], rtol=1e-12, atol=1e-14, what="cached last step")
print("one new query against 5 cached keys equals the last row of the full computation")

# %% [markdown]
# ## 2. Multi-query attention and `repeat_kv`
#
# Head h of the repeated keys is a copy of head h // G: a value used G times, so the original
# head's gradient is the sum of its G copies' gradients. The copies of head kv are the G
# consecutive heads kv·G … kv·G + G − 1, so reshape H to (K, G) and sum over G.

# %%
def fold_repeated_kv_grad(d_repeated, K):
    B, H, S, D = d_repeated.shape
    return d_repeated.reshape(B, K, H // K, S, D).sum(axis=2)  # head h = kv·G + g: sum over g


allowed = causal_mask(T, T)
dout = rng.standard_normal((B, H, T, D))
for K_ in (1, 2):
    k_, v_ = rng.standard_normal((B, K_, T, D)), rng.standard_normal((B, K_, T, D))
    _, dk, _ = attention_backward(dout, attention_forward(q, k_, v_, allowed)[1])
    _, dk_rep, _ = attention_backward(dout, attention_forward(q, np.repeat(k_, H // K_, 1),
                                                              np.repeat(v_, H // K_, 1), allowed)[1])
    assert_close(fold_repeated_kv_grad(dk_rep, K_), dk, rtol=1e-12, atol=1e-14, what=f"dk, K = {K_}")
print("a shared key head's gradient is the sum of the gradients of its copies")

# %% [markdown]
# ## 3. Softmax temperature
#
# Without 1/√D the scores have standard deviation √D; the softmax rows collapse onto one key
# (entropy → 0) as D grows, and their gradients vanish. With the scaling the entropy stays put.

# %%
def mean_row_entropy(p):
    logp = np.log(np.where(p > 0, p, 1.0))  # 0 · log 0 = 0: masked keys contribute nothing
    return float(-(p * logp).sum(axis=-1).mean())


def mean_entropy(scale, D):
    qq = rng.standard_normal((1, 1, 64, D)) * scale
    kk = rng.standard_normal((1, 1, 64, D))
    _, c = attention_forward(qq, kk, kk, np.ones((1, 1, 1, 64, 64), dtype=bool))
    return mean_row_entropy(attention_probabilities(c, 0))  # p rebuilt from q, k and the row log-sum-exp


entropies = {D_: (mean_entropy(1.0, D_), mean_entropy(np.sqrt(D_), D_)) for D_ in (4, 64, 1024)}
for D_, (scaled, unscaled) in entropies.items():
    print(f"D = {D_:>4}: entropy with 1/√D {scaled:.2f}, without {unscaled:.2f} (max log 64 = 4.16)")
assert entropies[1024][1] < 0.5 < entropies[1024][0]


# %% [markdown]
# ## The answer to the main text's "your turn"
#
# In the grouped layout: reshape dout like q, then `dv = pᵀ dout`, `dp = dout vᵀ`,
# `ds = p ⊙ (dp − Σ_j dp ⊙ p)`, `dq = ds k / √D`, `dk = dsᵀ q / √D`; the matmuls over the G·T rows
# sum over the G heads of each group.

# %%
def attention_backward_grouped(dout, q, k, v, p):
    B, H, T, D = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K * T, D)  # the G heads of a group stacked as G·T rows
    doutg = dout.reshape(qg.shape)
    dv = p.swapaxes(-1, -2) @ doutg  # the matmul over G·T rows sums over the group
    dp = doutg @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # masked entries: p = 0, so ds = 0
    dq = (ds @ k / np.sqrt(D)).reshape(q.shape)
    dk = ds.swapaxes(-1, -2) @ qg / np.sqrt(D)
    return dq, dk, dv


out, cache = attention_forward(q, k, v, allowed)
p = attention_probabilities(cache, 0)[None]  # (1, K, G·T, T): B = 1 here
for name, mine, lib in zip(("dq", "dk", "dv"), attention_backward_grouped(dout, q, k, v, p),
                           attention_backward(dout, cache), strict=True):
    assert_close(mine, lib, rtol=1e-12, atol=1e-14, what=name)
