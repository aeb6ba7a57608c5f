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
# The last query with S = 5 keys: `causal_mask(1, 5)` lets query 0 (absolute position S − T + 0 = 4)
# read keys 0..4, exactly the last row of the full causal mask.

# %%
K = 2
q = rng.standard_normal((B, H, T, D))
k = rng.standard_normal((B, K, T, D))
v = rng.standard_normal((B, K, T, D))
full, _ = attention_forward(q, k, v, causal_mask(T, T))
last, _ = attention_forward(q[:, :, -1:], k, v, causal_mask(1, T))
assert_close(last, full[:, :, -1:], rtol=1e-12, atol=1e-14, what="cached last step")
print("one new query against 5 cached keys equals the last row of the full computation")

# %% [markdown]
# ## 2. Multi-query attention (K = 1)

# %%
k1 = rng.standard_normal((B, 1, T, D))
v1 = rng.standard_normal((B, 1, T, D))
allowed = causal_mask(T, T)
dout = rng.standard_normal((B, H, T, D))
_, dk_mqa, _ = attention_backward(dout, attention_forward(q, k1, v1, allowed)[1])
_, dk_mha, _ = attention_backward(dout, attention_forward(q, np.repeat(k1, H, 1), np.repeat(v1, H, 1),
                                                          allowed)[1])
assert_close(dk_mqa, dk_mha.sum(axis=1, keepdims=True), rtol=1e-12, atol=1e-14, what="dk, K = 1")
print("the shared key head's gradient is the sum of the per-head gradients")

# %% [markdown]
# ## 3. Softmax temperature
#
# Without 1/√D the scores have standard deviation √D; the softmax rows collapse onto one key
# (entropy → 0) as D grows, and their gradients vanish. With the scaling the entropy stays put.

# %%
def mean_entropy(scale, D):
    qq = rng.standard_normal((1, 1, 64, D)) * scale
    kk = rng.standard_normal((1, 1, 64, D))
    _, c = attention_forward(qq, kk, kk, np.ones((1, 1, 1, 64, 64), dtype=bool))
    p = attention_probabilities(c, 0)  # rebuilt from q, k and the row log-sum-exp
    return float(-(p * np.log(np.where(p > 0, p, 1.0))).sum(-1).mean())


entropies = {D_: (mean_entropy(1.0, D_), mean_entropy(np.sqrt(D_), D_)) for D_ in (4, 64, 1024)}
for D_, (scaled, unscaled) in entropies.items():
    print(f"D = {D_:>4}: entropy with 1/√D {scaled:.2f}, without {unscaled:.2f} (max log 64 = 4.16)")
assert entropies[1024][1] < 0.5 < entropies[1024][0]


# %% [markdown]
# ## The answer for the tutorial's check cell

# %%
def kv_cache_mask(T, S):
    # query t sits at absolute position (S − T) + t and reads every key up to it
    return np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
