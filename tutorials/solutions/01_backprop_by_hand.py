# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 01 · Backprop by hand

# %%
import numpy as np

from minift.layers.cross_entropy import IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from minift.layers.linear import (
    linear_backward_bias,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
)
from minift.testing import assert_close, check_grad, numerical_grad

rng = np.random.default_rng(1)
N, C, V = 6, 4, 7
x = rng.standard_normal((N, C))
W = rng.standard_normal((V, C)) * 0.5
b = rng.standard_normal(V) * 0.1

# %% [markdown]
# ## 1. Ignored targets
#
# Only counted rows enter the mean, so the denominator is the number of counted targets M, not N,
# and an ignored row contributes nothing: its `dlogits` row is zero.
# `dlogits[n] = (p[n] − onehot(target_n)) / M` for counted n, and 0 otherwise.

# %%
targets = rng.integers(0, V, size=N)
targets[[0, 3]] = IGNORE_INDEX
counted = targets != IGNORE_INDEX
M = int(counted.sum())
logits = linear_forward(x, W, b)
p = np.exp(logits - logits.max(1, keepdims=True))
p /= p.sum(1, keepdims=True)
by_hand = np.zeros_like(p)
by_hand[counted] = (p[counted] - np.eye(V)[targets[counted]]) / M

loss, cache = cross_entropy_forward(logits, targets)
assert_close(cross_entropy_backward(cache), by_hand, rtol=1e-12, atol=1e-15, what="dlogits with ignored rows")
assert np.all(by_hand[~counted] == 0)


def ce_loss(logits):
    return cross_entropy_forward(logits, targets)[0]


def ce_grad(G, logits):
    return {"logits": cross_entropy_backward(cross_entropy_forward(logits, targets)[1], G)}


check_grad(ce_loss, ce_grad, {"logits": logits.copy()})
print(f"{M} of {N} targets counted; ignored rows have zero gradient")

# %% [markdown]
# ## 2. Mean-squared error
#
# `loss = mean((ŷ − y)²)` over N·V entries, so `dŷ = 2 (ŷ − y) / (N·V)`; then the linear backward.

# %%
y = rng.standard_normal((N, V))


def mse(x, W, b):
    return float(((linear_forward(x, W, b) - y) ** 2).mean())


def mse_grads(G, x, W, b):
    dyhat = G * 2.0 * (linear_forward(x, W, b) - y) / y.size
    return {"x": linear_backward_input(dyhat, W), "W": linear_backward_weight(dyhat, x),
            "b": linear_backward_bias(dyhat)}


print(check_grad(mse, mse_grads, {"x": x.copy(), "W": W.copy(), "b": b.copy()}))

# %% [markdown]
# ## 3. Why central differences, and why float64
#
# A central difference `(f(x+ε) − f(x−ε)) / 2ε` errs by O(ε²) (the even terms of the Taylor series
# cancel); a one-sided one `(f(x+ε) − f(x)) / ε` by O(ε). In float32 a forward value carries ~7
# significant digits: with ε = 1e-6 a rounding error of ~1e-7·|L| is divided by 2ε, so the
# "numerical gradient" is mostly noise; a larger ε reduces that noise but adds truncation error.
# float64 leaves ~9 clean digits at ε = 1e-6.

# %%
def central_difference(loss, x, eps):
    grad = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        old = x[idx].item()
        x[idx] = old + eps
        plus = loss()
        x[idx] = old - eps
        minus = loss()
        x[idx] = old  # put it back: the next entry's differences must see the original x
        grad[idx] = (plus - minus) / (2 * eps)
    return grad


G = rng.standard_normal((N, V))
analytic = linear_backward_weight(G, x)
errors = {}
for dtype in (np.float32, np.float64):
    for eps in (1e-6, 1e-3):
        W_ = W.astype(dtype)
        x_ = x.astype(dtype)
        num = central_difference(lambda W_=W_, x_=x_: float((linear_forward(x_, W_) * G).sum()), W_, eps)
        errors[(np.dtype(dtype).name, eps)] = np.linalg.norm(num - analytic) / np.linalg.norm(analytic)
for key, err in errors.items():
    print(f"{key[0]:>8}  eps={key[1]:g}  relative error {err:.1e}")
assert errors[("float64", 1e-6)] < 1e-8 < errors[("float32", 1e-6)]
def loss_of_W():
    return float((linear_forward(x, W) * G).sum())


assert_close(central_difference(loss_of_W, W, 1e-6), numerical_grad(loss_of_W, W), rtol=1e-12,
             what="vs numerical_grad")


# %% [markdown]
# ## The answers for the tutorial's check cells

# %%
def ignored_dlogits(logits, targets):
    counted = targets != IGNORE_INDEX
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d = np.zeros_like(p)
    d[counted] = (p[counted] - np.eye(logits.shape[1])[targets[counted]]) / counted.sum()  # ÷ M, not N
    return d


def mse_grads(x, W, b, y):
    dyhat = 2.0 * (linear_forward(x, W, b) - y) / y.size  # the mean divides by all N·V entries
    return {"x": linear_backward_input(dyhat, W), "W": linear_backward_weight(dyhat, x),
            "b": linear_backward_bias(dyhat)}
