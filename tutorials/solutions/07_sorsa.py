# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 07 · SORSA

# %%
import numpy as np

from minift.methods.sorsa import (
    SORSAConfig,
    SORSARegularizer,
    orthonormality_backward,
    orthonormality_forward,
)
from minift.methods.svd_analysis import svd_deviation
from minift.testing import assert_close

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The guard
#
# At M = 0 the norm has a kink, like |x| at 0: every direction increases it, so no gradient is
# "right", and zero — no push at the minimum — is the natural choice. Only an *exactly*
# orthonormal X hits it. Anything else, even rounding noise of 1e-16, gets the full-size gradient
# 2MX/‖M‖ (magnitude ≈ 2‖X‖) in the direction of the noise: like an L1 penalty, the plain norm
# pulls with a constant force, so factors hover near orthonormality at a distance set by the
# learning rate instead of settling on it. The guard does not change that; it only avoids 0/0.

# %%
exact = np.eye(3, 6)  # orthonormal rows, with M exactly 0
g_exact = orthonormality_backward(1.0, orthonormality_forward(exact)[1])
Xo = np.linalg.qr(rng.standard_normal((6, 3)))[0].T  # orthonormal up to rounding
value, cache = orthonormality_forward(Xo)
g_rounded = orthonormality_backward(1.0, cache)
print(f"exact: ‖∇‖ = {np.linalg.norm(g_exact)}; rounding-level ({value:.1e}) away: "
      f"‖∇‖ = {np.linalg.norm(g_rounded):.2f}")
assert np.all(g_exact == 0)
assert np.linalg.norm(g_rounded) > 1.0

# %% [markdown]
# ## 2. The coefficient
#
# c = γ / η_max, divided by the accumulation steps in the faithful mode.

# %%
for mode in ("faithful", "plain"):
    c = SORSARegularizer(SORSAConfig(gamma=4e-4, mode=mode)).coefficient(lr_max=3e-5, accum_steps=4)
    print(f"{mode:>8}: c = {c:.3f}")
assert_close(SORSARegularizer(SORSAConfig(gamma=4e-4)).coefficient(3e-5, 4), 4e-4 / 3e-5 / 4, rtol=1e-12)

# %% [markdown]
# ## 3. Rescaling versus rotation
#
# 2W has the same singular vectors and doubled singular values: ΔD = 0, ΔΣ = mean σ. A rotation
# Q W (Q orthogonal) keeps σ and rotates the left singular vectors: ΔΣ = 0, ΔD > 0.

# %%
W = rng.standard_normal((6, 5))
sigma = np.linalg.svd(W, compute_uv=False)
scaled = svd_deviation(W, 2 * W)
assert_close(scaled.delta_sigma, sigma.mean(), rtol=1e-12)
assert abs(scaled.delta_d) < 1e-12
Q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
rotated = svd_deviation(W, Q @ W)
assert abs(rotated.delta_sigma) < 1e-12
assert rotated.delta_d > 0.05
print("2W:", scaled, "\nQW:", rotated)


# %% [markdown]
# ## The answers for the tutorial's check cells

# %%
def regularizer_coefficient(gamma, lr_max, accum_steps, mode):
    return gamma / lr_max / (accum_steps if mode == "faithful" else 1)


def ortho_grad(X):
    M = X @ X.T - np.eye(X.shape[0])
    norm = np.linalg.norm(M)
    return np.zeros_like(X) if norm == 0 else 2 * M @ X / norm


def deviation_by_hand(w_old, w_new):
    U0, s0, Vt0 = np.linalg.svd(w_old, full_matrices=False)
    U1, s1, Vt1 = np.linalg.svd(w_new, full_matrices=False)
    cos_u = np.abs((U0 * U1).sum(0))  # |⟨u'_i, u_i⟩|: singular vectors are defined up to sign
    cos_v = np.abs((Vt0 * Vt1).sum(1))
    return np.abs(s1 - s0).mean(), 1 - (cos_u.mean() + cos_v.mean()) / 2
