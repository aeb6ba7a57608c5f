# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 02 · RMSNorm and RoPE

# %%
import numpy as np

from minift.config import RopeScaling
from minift.layers.layernorm import layernorm_backward, layernorm_forward
from minift.layers.rope import rope_inv_freq, rope_tables, rotate_half
from minift.testing import assert_close, check_grad

rng = np.random.default_rng(2)
N, C, eps = 4, 6, 1e-5

# %% [markdown]
# ## 1. LayerNorm
#
# Named intermediates: `mu = mean(x)`, `xc = x − mu`, `var = mean(xc²)`, `rstd = (var + ε)^−½`,
# `xhat = xc · rstd`, `y = w ⊙ xhat + b`. Reversing them, with `g = dy ⊙ w`:
# `dxhat = g`; `dxc = g · rstd + (2 xc / C) · (−½ rstd³ Σ g ⊙ xc)`; `dx = dxc − mean(dxc)`,
# which collapses to `dx = rstd · (g − mean(g) − xhat · mean(g ⊙ xhat))`. Subtracting `mean(g)`
# makes every row of `dx` sum to zero: adding a constant to a row does not change LayerNorm.

# %%
x = rng.standard_normal((N, C))
w = 1.0 + 0.1 * rng.standard_normal(C)
b = 0.1 * rng.standard_normal(C)


def layernorm_by_hand_backward(G, x, w, b):
    mu = x.mean(axis=1, keepdims=True)
    xc = x - mu
    rstd = ((xc**2).mean(axis=1, keepdims=True) + eps) ** -0.5
    xhat = xc * rstd
    g = G * w
    dxc = g * rstd + (2 * xc / C) * (-0.5 * rstd**3 * (g * xc).sum(axis=1, keepdims=True))
    dx = dxc - dxc.mean(axis=1, keepdims=True)  # xc = x − mean(x): the mean is a second path
    return {"x": dx, "w": (G * xhat).sum(axis=0), "b": G.sum(axis=0)}


check_grad(lambda x, w, b: layernorm_forward(x, w, b, eps)[0], layernorm_by_hand_backward,
           {"x": x.copy(), "w": w.copy(), "b": b.copy()})
dy = rng.standard_normal((N, C))
dx_lib, dw_lib, db_lib = layernorm_backward(dy, layernorm_forward(x, w, b, eps)[1], w)
ours = layernorm_by_hand_backward(dy, x, w, b)
assert_close(dx_lib, ours["x"], rtol=1e-10, atol=1e-13, what="dx")
assert np.abs(dx_lib.sum(axis=1)).max() < 1e-12
print("LayerNorm dx rows sum to", dx_lib.sum(axis=1))

# %% [markdown]
# ## 2. Linear RoPE scaling
#
# Linear scaling divides every frequency by the factor, so the angle at position 4m with factor 4
# equals the unscaled angle at m: the model "sees" positions compressed by 4.

# %%
def linear_scaled_inv_freq(D, theta, factor):
    return theta ** (-np.arange(0, D, 2) / D) / factor  # float64 throughout


D, theta = 8, 10000.0
inv = rope_inv_freq(D, theta, RopeScaling()).astype(np.float64)
inv4 = linear_scaled_inv_freq(D, theta, 4.0)
assert_close(inv4, rope_inv_freq(D, theta, RopeScaling(kind="linear", factor=4.0)), rtol=1e-6,
             what="inv_freq")
m = np.arange(6)
assert_close(np.outer(4 * m, inv4), np.outer(m, inv), rtol=1e-6, what="angles")


# %% [markdown]
# ## 3. Long positions in float32
#
# The angle φ = m·inv_freq is rounded to float32, whose spacing near φ is about φ·2⁻²³, and
# inv_freq itself carries a float32 rounding error that the position multiplies. Both grow in
# proportion to m, and so does the gap between the tables: ~3e-8 at position 10, ~1e-6 at 1234,
# ~1e-4 at 123457 (printed below). Hugging Face builds its tables the same way, which is why
# minift matches it (what the checkpoints were trained with) rather than the exact value.

# %%
def exact_angles(positions, D, theta):
    return np.asarray(positions, dtype=np.float64)[:, None] * theta ** (-np.arange(0, D, 2) / D)


gaps = {}
for pos in (10, 1234, 123457):
    cos32, _ = rope_tables(np.array([[pos]]), D, theta, RopeScaling())
    exact = np.cos(exact_angles(np.array([pos]), D, theta))[0]
    gaps[pos] = np.abs(cos32[0, 0, 0, : D // 2] - exact).max()
    print(f"position {pos:>6}: max |cos32 − cos64| = {gaps[pos]:.1e}")
assert gaps[10] < 1e-6 < gaps[123457]


# %% [markdown]
# ## The answers for the tutorial's check cells
#
# The main text's "your turn": RoPE's backward is the rotation by −φ, i.e. the forward with sin
# negated; in `rotate_half` form `dx = dy ⊙ cos − rotate_half(dy ⊙ sin)`.

# %%
def rope_backward_by_hand(dy, cos, sin):
    return dy * cos - rotate_half(dy * sin)


def layernorm_grads(dy, x, w, b, eps):
    xc = x - x.mean(axis=1, keepdims=True)
    rstd = ((xc**2).mean(axis=1, keepdims=True) + eps) ** -0.5
    xhat, g = xc * rstd, dy * w
    dx = rstd * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    return {"x": dx, "w": (dy * xhat).sum(axis=0), "b": dy.sum(axis=0)}
