# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 02 · RMSNorm and RoPE: forward, backward, and why each cache keeps what it keeps
#
# **What you will build.** The two position-wise operations that distinguish a Llama block from
# the textbook transformer: RMSNorm (normalise each token vector by its root-mean-square) and
# rotary position embeddings (rotate pairs of query/key coordinates by an angle proportional to the
# position). For each you derive the backward step by step, check it with finite differences,
# compare it with the library, and run a counterexample that shows why the library caches exactly
# what it caches — no more, no less.
#
# **Prerequisites.** Tutorial 01 (named intermediates, `check_grad`, broadcast ⇄ sum).
#
# **Library functions explained here.** `minift.layers.rmsnorm.rmsnorm_forward`,
# `minift.layers.rmsnorm.rmsnorm_backward`, `minift.layers.rmsnorm.RMSNormCache`,
# `minift.layers.rope.rope_inv_freq`, `minift.layers.rope.rope_tables`,
# `minift.layers.rope.rotate_half`, `minift.layers.rope.rope_forward`,
# `minift.layers.rope.rope_backward`, and `minift.config.RopeScaling`.

# %%
import numpy as np

from minift.config import RopeScaling
from minift.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
from minift.layers.rope import rope_backward, rope_forward, rope_inv_freq, rope_tables, rotate_half
from minift.testing import assert_close, check_grad

rng = np.random.default_rng(0)
N, C, eps = 4, 6, 1e-6
x = rng.standard_normal((N, C))
w = 1.0 + 0.1 * rng.standard_normal(C)

# %% [markdown]
# ## 1. RMSNorm forward
#
# `y = w ⊙ x / sqrt(mean_c(x²) + ε)`. Unlike LayerNorm there is no mean subtraction and no bias:
# each token vector is scaled to unit root-mean-square, then every channel gets its own gain `w`.
# As named intermediates:

# %%
def rmsnorm_steps(x, w):
    sq = x * x  # (N, C)
    ms = sq.mean(axis=1, keepdims=True)  # (N, 1) mean square
    rstd = (ms + eps) ** -0.5  # (N, 1) reciprocal root-mean-square
    xhat = x * rstd  # (N, C) unit-RMS rows
    y = xhat * w  # (N, C)
    return y, dict(ms=ms, rstd=rstd, xhat=xhat)


y, t = rmsnorm_steps(x, w)
y_lib, cache = rmsnorm_forward(x, w, eps)
assert_close(y_lib, y, rtol=1e-14, what="rmsnorm forward")
print("rows have RMS ≈ 1 before the gain:", np.sqrt((t["xhat"] ** 2).mean(axis=1)).round(6))

# %% [markdown]
# ## 2. RMSNorm backward, step by step
#
# Reverse the five lines. `x` is used twice (in `sq` and in `xhat`), so `dx` is the sum of two paths:
#
# * `y = xhat ⊙ w` → `dxhat = dy ⊙ w`, `dw = Σ_n dy ⊙ xhat` (w is broadcast over rows ⇒ sum);
# * `xhat = x · rstd` → path 1: `dx₁ = dxhat · rstd`; `drstd = Σ_c dxhat ⊙ x`;
# * `rstd = (ms + ε)^(−1/2)` → `dms = −½ (ms + ε)^(−3/2) drstd = −½ rstd³ drstd`;
# * `ms = mean_c(sq)` → `dsq = dms / C` broadcast over c;
# * `sq = x²` → path 2: `dx₂ = 2 x dsq`.

# %%
def rmsnorm_backward_steps(dy, x, w):
    _, t = rmsnorm_steps(x, w)
    dxhat = dy * w
    dw = (dy * t["xhat"]).sum(axis=0)
    dx1 = dxhat * t["rstd"]
    drstd = (dxhat * x).sum(axis=1, keepdims=True)
    dms = -0.5 * t["rstd"] ** 3 * drstd
    dsq = np.broadcast_to(dms / x.shape[1], x.shape)
    dx2 = 2 * x * dsq
    return {"x": dx1 + dx2, "w": dw}


print(check_grad(lambda x, w: rmsnorm_steps(x, w)[0], rmsnorm_backward_steps,
                 {"x": x.copy(), "w": w.copy()}))

# %% [markdown]
# ## 3. Collapse to the library's closed form
#
# With `g = dy ⊙ w`: `dx₁ = rstd · g`, and `dx₂ = 2x · (−½ rstd³ Σ_c g x) / C = −rstd · xhat ·
# mean_c(g ⊙ xhat)`. Together:
#
# `dx = rstd · (g − xhat · mean_c(g ⊙ xhat))`
#
# — the gradient `g` with its component along `xhat` removed, then scaled. That is one line in
# `rmsnorm_backward`, and it reads only `x` and `rstd`, which is exactly what `RMSNormCache` holds.

# %%
dy = rng.standard_normal((N, C))
dx_lib, dw_lib = rmsnorm_backward(dy, cache, w)
ours = rmsnorm_backward_steps(dy, x, w)
assert_close(dx_lib, ours["x"], rtol=1e-12, atol=1e-15, what="dx")
assert_close(dw_lib, ours["w"], rtol=1e-12, what="dw")
print("RMSNormCache fields:", cache._fields)

# %% [markdown]
# A consequence worth checking: with ε = 0, RMSNorm is invariant to rescaling a row (`rmsnorm(c·x)
# = rmsnorm(x)` for c > 0), so moving `x` along itself cannot change the loss, and `dx` must be
# orthogonal to `x`, row by row. The projection in the closed form is exactly what enforces it.

# %%
_, cache0 = rmsnorm_forward(x, w, 0.0)
dx0, _ = rmsnorm_backward(dy, cache0, w)
print("⟨dx, x⟩ per row with ε = 0:", (dx0 * x).sum(axis=1))
assert np.abs((dx0 * x).sum(axis=1)).max() < 1e-12

# %% [markdown]
# ### Why the cache keeps the input `x`, and not just the output `y`
#
# It is tempting to save memory by recomputing everything from the output `y` that the next
# layer keeps anyway. It does not work: the output can lose information the backward needs. If a
# gain `w[c]` is zero, two inputs that differ only in the sign of `x[:, c]` have the same RMS and the
# same output, but different `dx`:

# %%
w0 = w.copy()
w0[2] = 0.0
xa = x.copy()
xb = x.copy()
xb[:, 2] *= -1
ya, ca = rmsnorm_forward(xa, w0, eps)
yb, cb = rmsnorm_forward(xb, w0, eps)
assert np.array_equal(ya, yb)
dxa, _ = rmsnorm_backward(dy, ca, w0)
dxb, _ = rmsnorm_backward(dy, cb, w0)
print("same y, max |dx_a − dx_b| =", np.abs(dxa - dxb).max().round(4))
assert np.abs(dxa - dxb).max() > 1e-3

# %% [markdown]
# And why `rstd` *as well as* `x`? It costs one number per token (N values next to N·C) and saves
# recomputing a reduction over C. `xhat = x · rstd` on the other hand is recomputed with one
# multiply, because keeping it next to `x` would double the cache. (Keeping `xhat` *instead of*
# `x` costs the same; `minift.layers.layernorm.LayerNormCache` does that, since LayerNorm's
# backward reads `xhat` twice and `x` never.) Keep the small things that are expensive to
# recompute, recompute the big things that are cheap: that is how every minift cache is chosen.
#
# ## 4. RoPE: rotate pairs of coordinates by a position-dependent angle
#
# Rotary embeddings encode the position `m` of a query or key vector (one head's, of width D) by
# rotating coordinate pairs. minift uses the `rotate_half` pairing of Hugging Face checkpoints:
# coordinate `i` pairs with `i + D/2` (i = 0 … D/2 − 1) and the pair is rotated by the angle
# `φ_i(m) = m · θ^(−2i/D)`, where the base θ (`rope_theta` in a config, 10000 for Llama 2) sets
# how slowly the lower pairs turn:
#
# `x' = x ⊙ cos φ + rotate_half(x) ⊙ sin φ`,  with `rotate_half(x) = (−x[D/2:], x[:D/2])`.
#
# `rope_tables(positions, D, θ, scaling)` builds the cos and sin tables once per batch, shape
# (B, 1, T, D), broadcast over the heads of q and k, which are (B, H, T, D): batch, heads, tokens,
# head width. `RopeScaling` rescales the frequencies for long contexts (linear, or Llama 3's
# banded scheme); the default is no scaling.

# %%
B, H, T, D, theta = 1, 2, 5, 8, 10000.0
positions = np.arange(T)[None, :]  # (B, T)
cos, sin = (a.astype(np.float64) for a in rope_tables(positions, D, theta, RopeScaling()))
q = rng.standard_normal((B, H, T, D))
k = rng.standard_normal((B, H, T, D))

inv = rope_inv_freq(D, theta, RopeScaling()).astype(np.float64)
angle = positions[0, :, None] * inv  # (T, D/2)
# Rotate pair (i, i + D/2) of token m by angle[m, i], one 2×2 rotation at a time:
by_hand = np.empty_like(q)
for m in range(T):
    for i in range(D // 2):
        c, s = np.cos(angle[m, i]), np.sin(angle[m, i])
        a0, a1 = q[..., m, i], q[..., m, i + D // 2]
        by_hand[..., m, i] = c * a0 - s * a1
        by_hand[..., m, i + D // 2] = s * a0 + c * a1
assert_close(rope_forward(q, cos, sin), by_hand, rtol=1e-6, atol=1e-6, what="rope vs 2×2 rotations")
# …which is what the one-line rotate_half form computes for all pairs at once:
assert_close(q * cos + rotate_half(q) * sin, by_hand, rtol=1e-6, atol=1e-6, what="rotate_half form")

# %% [markdown]
# (The tolerance is float32-sized because the tables are built in float32 on purpose, as Hugging
# Face builds them: see the note in `rope_inv_freq`.)
#
# Two properties make RoPE a *position* encoding: rotations preserve norms, and the score between
# a query at position m and a key at position n depends only on `m − n` — so attention sees
# relative positions.

# %%
rq = rope_forward(q, cos, sin)
rk = rope_forward(k, cos, sin)
assert_close(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-6, what="norms")

# the same q and k vectors placed at positions (3, 1) and (4, 2): offset 2 both times
qv, kv = q[0, 0, 0], k[0, 0, 0]
same_q = np.broadcast_to(qv, (B, H, T, D))
same_k = np.broadcast_to(kv, (B, H, T, D))
rq_, rk_ = rope_forward(same_q, cos, sin), rope_forward(same_k, cos, sin)
s31 = rq_[0, 0, 3] @ rk_[0, 0, 1]
s42 = rq_[0, 0, 4] @ rk_[0, 0, 2]
print(f"score(3, 1) = {s31:.6f}, score(4, 2) = {s42:.6f}")
assert abs(s31 - s42) < 1e-5

# %% [markdown]
# ## 5. RoPE backward: the transpose of a rotation is the rotation by −φ
#
# RoPE is linear in `x`: `x' = R(φ) x` for a block-diagonal rotation `R`, one 2×2 block per pair.
# The gradient of a linear map `y = M x` is `dx = Mᵀ dy` (tutorial 01's `dx = dy W`, written for
# one column vector), and the transpose of a rotation is the rotation back: `R(φ)ᵀ = R(−φ)`. Pair by
# pair, with `c = cos φ_i`, `s = sin φ_i`:
#
#     forward:  y0 = c·a0 − s·a1        backward:  da0 =  c·dy0 + s·dy1
#               y1 = s·a0 + c·a1                   da1 = −s·dy0 + c·dy1
#
# (each `da` collects the coefficient of `a` in every `y` it appears in, times that `y`'s gradient).
# That is the forward with `s` replaced by `−s`. In the `rotate_half` form of section 4, where
# coordinate i holds `a0` and i + D/2 holds `a1`, the backward reads
# `dx = dy ⊙ cos − rotate_half(dy ⊙ sin)`: the first half gets `c·dy0 + s·dy1`, the second
# `c·dy1 − s·dy0`.
#
# **Your turn.** Write that backward in the cell below, then run the check: it compares your
# function with finite differences (`check_grad`) and with the library's `rope_backward`.

# %%
def rope_backward_by_hand(dy, cos, sin):
    """dx for x' = x ⊙ cos + rotate_half(x) ⊙ sin, given dy (B, H, T, D) and the tables."""
    return None  # your code here: one line with rotate_half


def check_rope_backward_by_hand(rope_backward_by_hand):
    dy = np.random.default_rng(8).standard_normal(q.shape)
    if rope_backward_by_hand(dy, cos, sin) is None:
        print("your turn (RoPE backward): not answered yet")
        return
    check_grad(lambda x: rope_forward(x, cos, sin), lambda G, x: {"x": rope_backward_by_hand(G, cos, sin)},
               {"x": q.copy()})
    assert_close(rope_backward_by_hand(dy, cos, sin), rope_backward(dy, cos, sin), rtol=1e-12, atol=1e-15,
                 what="dx vs rope_backward")
    print("your turn (RoPE backward): correct")


check_rope_backward_by_hand(rope_backward_by_hand)

# %% [markdown]
# The library's `rope_backward` is that line; the rest of minift uses it. It passes the same check,
# and it is the rotation by −φ:

# %%
print(check_grad(lambda x: rope_forward(x, cos, sin), lambda G, x: {"x": rope_backward(G, cos, sin)},
                 {"x": q.copy()}))
dq = rng.standard_normal(q.shape)
assert_close(rope_backward(dq, cos, sin), rope_forward(dq, cos, -sin), rtol=1e-12, atol=1e-15,
             what="backward = rotation by −φ")

# %% [markdown]
# ### Why RoPE keeps no cache at all
#
# The backward of a linear map needs the map, never its input. `rope_forward` therefore returns
# only the rotated array; the caller already holds the tables (shared by every layer of the
# model). A tempting mistake is to reuse the forward itself as the backward — it is also "just a
# rotation" — and it is wrong, as `check_grad` shows at once:

# %%
bad = check_grad(lambda x: rope_forward(x, cos, sin), lambda G, x: {"x": rope_forward(G, cos, sin)},
                 {"x": q.copy()}, raise_on_failure=False)
print(bad)
assert not bad.ok

# %% [markdown]
# (It is right only at position 0, where φ = 0. A gradient check on a single position would miss
# it: test at several positions.)
#
# ## Summary
#
# * RMSNorm: `dx = rstd · (g − xhat · mean(g ⊙ xhat))`, `g = dy ⊙ w`; cache `x` and `rstd`.
#   The output alone cannot determine the gradient.
# * RoPE: a rotation, so its backward is the inverse rotation and it needs no cache; q·k depends
#   only on the position offset.
#
# ## Exercises
#
# 1. **LayerNorm.** GPT-2 uses LayerNorm, `y = w ⊙ (x − μ)/σ + b` with μ the mean of each row of
#    x and σ = √(var + ε) its standard deviation. Derive `dx` the same way (one more path: the
#    mean), check it with `check_grad`, compare it with
#    `minift.layers.layernorm.layernorm_backward`, and show that each row of `dx` sums to zero.
# 2. **Scaling frequencies.** Linear RoPE scaling divides every inverse frequency `θ^(−2i/D)` by a
#    factor. Write those frequencies yourself, compare them with `rope_inv_freq` under
#    `RopeScaling(kind="linear", factor=4.0)`, and show that position `4m` with scaling gets the
#    angles of position `m` without it.
# 3. **Long positions in float32.** RoPE angles grow with the position. Compute the exact angles
#    `φ_i(m) = m · θ^(−2i/D)` in float64, compare the cos table `rope_tables` builds (float32)
#    with theirs at positions 10, 1234 and 123457, and explain why the gap grows.
#
# Solutions: `tutorials/solutions/02_rmsnorm_and_rope.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: a check
# prints "not answered yet" while its function returns None, "correct" when your answer is right,
# and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def layernorm_grads(dy, x, w, b, eps):
    """Exercise 1: the backward of y = w ⊙ (x − μ) / √(var + eps) + b over the last axis of x
    (N, C), as a dict {"x": dx, "w": dw, "b": db}."""
    return None  # your code here


def check_layernorm_grads(layernorm_grads):
    from minift.layers.layernorm import layernorm_forward

    r = np.random.default_rng(7)
    x, w, b = r.standard_normal((4, 6)), 1 + 0.1 * r.standard_normal(6), r.standard_normal(6)
    if layernorm_grads(r.standard_normal((4, 6)), x, w, b, 1e-5) is None:
        print("exercise 1: not answered yet")
        return
    check_grad(lambda x, w, b: layernorm_forward(x, w, b, 1e-5)[0],
               lambda G, x, w, b: layernorm_grads(G, x, w, b, 1e-5), {"x": x, "w": w, "b": b})
    print("exercise 1: correct")


check_layernorm_grads(layernorm_grads)


# %%
def linear_scaled_inv_freq(D, theta, factor):
    """Exercise 2: the D/2 inverse frequencies θ^(−2i/D), i = 0 … D/2 − 1, under linear scaling by
    `factor`, in float64."""
    return None  # your code here


def check_linear_scaled_inv_freq(linear_scaled_inv_freq):
    if linear_scaled_inv_freq(8, 10000.0, 4.0) is None:
        print("exercise 2: not answered yet")
        return
    for D_, theta_, factor in [(8, 10000.0, 4.0), (16, 500000.0, 8.0)]:
        mine = np.asarray(linear_scaled_inv_freq(D_, theta_, factor))
        lib = rope_inv_freq(D_, theta_, RopeScaling(kind="linear", factor=factor))
        assert mine.shape == lib.shape, f"D={D_}: shape {mine.shape}, expected {lib.shape}"
        assert_close(mine, lib, rtol=1e-6, what=f"inverse frequencies, D={D_}, factor={factor}")
    print("exercise 2: correct")


check_linear_scaled_inv_freq(linear_scaled_inv_freq)


# %%
def exact_angles(positions, D, theta):
    """Exercise 3: φ_i(m) = m · θ^(−2i/D) for each position m of the 1-D integer array `positions`
    and i = 0 … D/2 − 1, computed in float64: shape (len(positions), D/2)."""
    return None  # your code here


def check_exact_angles(exact_angles):
    positions = np.array([0, 10, 1234, 123457])
    if exact_angles(positions, 8, 10000.0) is None:
        print("exercise 3: not answered yet")
        return
    for D_, theta_ in [(8, 10000.0), (16, 1e6)]:
        mine = np.asarray(exact_angles(positions, D_, theta_))
        expected = positions[:, None] * np.power(float(theta_), -np.arange(0, D_, 2) / D_)
        assert mine.shape == expected.shape, f"D={D_}: shape {mine.shape}, expected {expected.shape}"
        # float64 is exact to ~1e-16 relative; float32 inverse frequencies are off by up to ~6e-8
        assert_close(mine, expected, rtol=1e-12, what=f"angles, D={D_} (all in float64?)")
    print("exercise 3: correct")


check_exact_angles(exact_angles)
