# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 06 · LoRA and PiSSA

# %%
import numpy as np

from minift.methods.lora import LoRAConfig, LowRankLinear, lowrank_backward, lowrank_forward
from minift.methods.pissa import pissa_factors, top_svd
from minift.testing import assert_close, check_grad

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. rsLoRA
#
# alpha / r shrinks the update as r grows, so a larger rank learns more slowly at the same
# learning rate; alpha / √r (rank-stabilised) keeps the update's scale roughly rank-independent.
# PiSSA divides σ by s before splitting it between A and B, so s·B A = U_R diag(σ_R) V_Rᵀ for
# every s.

# %%
for r in (1, 4, 16):
    plain, rs = LoRAConfig(r=r, alpha=8.0).scaling, LoRAConfig(r=r, alpha=8.0, use_rslora=True).scaling
    print(f"r = {r:>2}: alpha/r = {plain:5.2f}, alpha/√r = {rs:5.2f}")
w = rng.standard_normal((12, 10))
for scaling in (0.5, 2.0, 8.0):
    A, B, _ = pissa_factors(w, 3, scaling)
    U, sig, Vt = top_svd(w, 3)
    assert_close(scaling * B @ A, (U * sig) @ Vt, rtol=1e-10, atol=1e-12, what=f"s = {scaling}")
print("PiSSA's principal part is the same for every scaling")

# %% [markdown]
# ## 2. Randomized SVD
#
# Each subspace iteration multiplies by W Wᵀ, raising the spectrum to a higher power and
# separating the top singular directions from the rest; the error shrinks quickly with niter.

# %%
Q1, _ = np.linalg.qr(rng.standard_normal((60, 60)))
Q2, _ = np.linalg.qr(rng.standard_normal((40, 40)))
spectrum = 1.0 / np.arange(1, 41) ** 0.5  # slowly decaying
M = Q1[:, :40] @ np.diag(spectrum) @ Q2.T
U, sig, Vt = top_svd(M, 4)
exact = (U * sig) @ Vt
errors = []
for k in (0, 1, 2, 4):
    Uk, sk, Vtk = top_svd(M, 4, niter=k, rng=np.random.default_rng(1))
    errors.append(np.linalg.norm((Uk * sk) @ Vtk - exact))
    print(f"niter = {k}: ‖approx − exact rank-4 part‖ = {errors[-1]:.2e}")
assert errors[-1] < errors[0]

# %% [markdown]
# ## 3. Dropout
#
# With `x_d = x ⊙ mask / (1 − p)` the adapter path is section 1's with x_d in place of x: dB and
# dh are unchanged, `dA = dhᵀ x_d`, and the adapter's contribution to dx goes back through the
# mask, `dx = dy W + (dh A) ⊙ mask / (1 − p)`. The frozen path reads x itself and is unchanged.

# %%
N, I, O, R = 4, 6, 5, 2
Wd = rng.standard_normal((O, I))
slot = LowRankLinear(Wd, rng.standard_normal((R, I)), rng.standard_normal((O, R)), 1.0, dropout=0.5)
xx = rng.standard_normal((N, I))
y1, c1 = slot.forward(xx, keep=False, rng=np.random.default_rng(0))
y2, _ = slot.forward(xx, keep=False, rng=np.random.default_rng(1))
assert c1 is None
assert np.array_equal(y1, y2)  # inference: no dropout, whatever the rng
mask = rng.random((N, I)) >= 0.5


def f(x, A, B):
    return lowrank_forward(x, Wd, A, B, scaling=1.0, mask=mask, p=0.5)[0]


def df(G, x, A, B):
    _, cache = lowrank_forward(x, Wd, A, B, scaling=1.0, mask=mask, p=0.5)
    dx, dA, dB, _ = lowrank_backward(G, cache, Wd, A, B, scaling=1.0, p=0.5)
    return {"x": dx, "A": dA, "B": dB}


print(check_grad(f, df, {"x": xx.copy(), "A": slot.A.copy(), "B": slot.B.copy()}))


# %% [markdown]
# ## The answers for the tutorial's check cells

# %%
def rslora_scaling(alpha, r):
    return alpha / np.sqrt(r)


def randomized_error(w, r, niter):
    U, sig, Vt = top_svd(w, r)
    Uk, sk, Vtk = top_svd(w, r, niter=niter, rng=np.random.default_rng(1))
    return np.linalg.norm((Uk * sk) @ Vtk - (U * sig) @ Vt)


def dropout_lowrank_grads(G, x, W, A, B, s, mask, p):
    x_d = x * mask / (1 - p)
    h = x_d @ A.T
    dh = s * G @ B
    return {"x": G @ W + (dh @ A) * mask / (1 - p), "A": dh.T @ x_d, "B": s * G.T @ h}
