# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 01 · Backprop by hand: a linear layer and cross-entropy
#
# **What you will build.** The gradient of the smallest language-model head there is: a linear
# layer `logits = x Wᵀ + b` followed by softmax cross-entropy. You will write the forward pass as a
# chain of named intermediates, walk it backwards one intermediate at a time, check every step
# against finite differences, and then collapse the chain into the closed forms the library
# uses: `dlogits = (softmax − onehot) / N` and `dx = dy W`, `dW = dyᵀ x`, `db = Σ dy`. On the way
# you derive the backward of the softmax on its own, `dz = p ⊙ (dp − Σ_j dp_j p_j)`, which
# attention (tutorial 03) needs.
#
# **Prerequisites.** Python, NumPy, the chain rule and matrix products. Nothing else.
#
# **Library functions explained here.**
# `minift.layers.linear.linear_forward`, `minift.layers.linear.linear_backward_input`,
# `minift.layers.linear.linear_backward_weight`, `minift.layers.linear.linear_backward_bias`,
# `minift.layers.cross_entropy.cross_entropy_forward`, `minift.layers.cross_entropy.cross_entropy_backward`,
# and the two tools every later tutorial relies on: `minift.testing.check_grad` and
# `minift.testing.assert_close`.
#
# Shapes use minift's alphabet: N tokens, C model width, V vocabulary; weights are stored as
# PyTorch does, `[out, in]`, so a linear layer computes `y = x Wᵀ + b`.

# %%
import numpy as np

from minift.layers.cross_entropy import cross_entropy_backward, cross_entropy_forward
from minift.layers.linear import (
    linear_backward_bias,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
)
from minift.testing import assert_close, check_grad, numerical_grad

rng = np.random.default_rng(0)
N, C, V = 5, 4, 7  # 5 tokens, width 4, a vocabulary of 7
x = rng.standard_normal((N, C))  # float64: gradient checks need it (float32 differences are noise)
W = rng.standard_normal((V, C)) * 0.5  # (V, C): [out, in]
b = rng.standard_normal(V) * 0.1
targets = rng.integers(0, V, size=N)  # the token that should come next, one per position

# %% [markdown]
# ## 1. The forward pass as named intermediates
#
# The linear layer is one line, `logits = x Wᵀ + b`; we come back to it in section 5. The
# cross-entropy is where the interesting steps are. Every line computes one thing and gives it a
# name, so that the backward pass can give each name a gradient `d<name>` = ∂loss/∂name. The row
# maximum is subtracted before `exp` so that large logits cannot overflow; it changes nothing
# mathematically because softmax is invariant to a constant added to a row.

# %%
def forward_steps(logits, targets):
    row_max = logits.max(axis=1, keepdims=True)  # (N, 1)
    shifted = logits - row_max  # (N, V)
    e = np.exp(shifted)  # (N, V)
    sum_e = e.sum(axis=1, keepdims=True)  # (N, 1)
    log_sum_e = np.log(sum_e)  # (N, 1)
    logprobs = shifted - log_sum_e  # (N, V)  log softmax
    picked = logprobs[np.arange(len(targets)), targets]  # (N,)  log p(target)
    loss = -picked.mean()  # scalar
    return loss, dict(logits=logits, row_max=row_max, shifted=shifted, e=e, sum_e=sum_e,
                      log_sum_e=log_sum_e, logprobs=logprobs, picked=picked)


logits = x @ W.T + b  # (N, V): the linear layer, by hand for now
loss, t = forward_steps(logits, targets)
library_loss, ce_cache = cross_entropy_forward(logits, targets)
assert abs(loss - library_loss) < 1e-12
print(f"loss = {loss:.6f}  (uniform guessing would give log V = {np.log(V):.6f})")

# %% [markdown]
# ## 2. The backward pass, one intermediate at a time
#
# Walk the list in reverse. Each rule is the derivative of one line, multiplied by the gradient
# arriving from above (the chain rule):
#
# | forward line | backward line |
# |---|---|
# | `loss = −mean(picked)` | `dpicked = −1/N` for every entry |
# | `picked = logprobs[n, target_n]` | `dlogprobs` = 0 except `dlogprobs[n, target_n] = dpicked[n]` |
# | `logprobs = shifted − log_sum_e` | `dshifted = dlogprobs`; `dlog_sum_e = −Σ_v dlogprobs` |
# | `log_sum_e = log(sum_e)` | `dsum_e = dlog_sum_e / sum_e` |
# | `sum_e = Σ_v e` | `de = dsum_e` broadcast back over v (sum ⇒ broadcast) |
# | `e = exp(shifted)` | `dshifted += de · e` (shifted is used twice, so its gradients add) |
# | `shifted = logits − row_max` | `dlogits = dshifted`; `drow_max = −Σ_v dshifted` |
# | `row_max = max_v logits` | routes `drow_max` to the argmax entry of each row |
#
# (`logprobs = shifted − log_sum_e` broadcasts the (N, 1) column over V, hence the sum over v.)
# Two patterns recur in every backward pass in minift: **a broadcast in the forward is a sum in the
# backward, and a sum is a broadcast**; and **a value used twice receives the sum of both
# gradients**.

# %%
def backward_steps(t, targets):
    Nn = len(targets)
    dpicked = np.full(Nn, -1.0 / Nn)
    dlogprobs = np.zeros_like(t["logprobs"])
    dlogprobs[np.arange(Nn), targets] = dpicked
    dshifted = dlogprobs.copy()
    dlog_sum_e = -dlogprobs.sum(axis=1, keepdims=True)
    dsum_e = dlog_sum_e / t["sum_e"]
    de = np.broadcast_to(dsum_e, t["e"].shape)
    dshifted += de * t["e"]  # the second use of `shifted`
    dlogits = dshifted.copy()
    drow_max = -dshifted.sum(axis=1, keepdims=True)
    argmax = t["logits"].argmax(axis=1)
    dlogits[np.arange(Nn), argmax] += drow_max[:, 0]
    return dict(dlogits=dlogits, drow_max=drow_max, dlogprobs=dlogprobs)


steps = backward_steps(t, targets)
print("largest |drow_max|:", float(np.abs(steps["drow_max"]).max()))

# %% [markdown]
# The gradient reaching `row_max` is zero (up to rounding): the shift was introduced for numerical
# safety and the loss does not depend on it. That is why the library can treat the maximum as a
# constant.
#
# ### Check the step-by-step gradient with finite differences
#
# `minift.testing.check_grad(forward, backward, args)` evaluates `forward(**args)`, draws a random
# upstream gradient `G` of the output's shape, and compares `backward(G, **args)` with central
# differences of `Σ forward(**args) ⊙ G` (each entry of each argument nudged by ±ε, ε = 1e-6, in
# turn), in float64. It reports one relative error per argument array, ‖g − g_fd‖ / max(‖g‖, ‖g_fd‖) (g the
# backward's gradient, g_fd the finite-difference one, ‖·‖ the Euclidean norm over all the array's
# entries), and fails when any array's error exceeds 1e-6. Here the output is the scalar loss, so
# `G` is one random number.


# %%
def loss_of_logits(logits):
    return forward_steps(logits, targets)[0]


def dlogits_by_steps(G, logits):
    _, tt = forward_steps(logits, targets)
    return {"logits": G * backward_steps(tt, targets)["dlogits"]}  # the steps start from dloss = 1


report = check_grad(loss_of_logits, dlogits_by_steps, {"logits": logits.copy()})
print(report)

# %% [markdown]
# One row per array: `rel error` is the relative error above (around 1e-9 means "equal up to the
# finite-difference truncation error"), `max |Δ|` the largest entrywise difference |g − g_fd|, and
# `‖grad‖` the norm ‖g_fd‖, which tells a gradient that vanishes apart from one that matches.
# `check_grad` raises if any array's relative error exceeds its tolerance, so
# this cell *is* the proof that the eight backward rules above are right.
#
# ## 3. Collapse the chain: `dlogits = (softmax − onehot) / N`
#
# Substitute the rules into each other. With `p = softmax(logits)` = `e / sum_e`:
# `dshifted = dlogprobs + p · (−Σ_v dlogprobs)`, and `Σ_v dlogprobs[n] = −1/N` (one entry per row),
# so `dlogits[n] = (p[n] − onehot(target_n)) / N`. Eight steps become one line — the fused
# softmax-cross-entropy backward, which is what `cross_entropy_backward` computes from the
# probabilities it cached in the forward.

# %%
p = t["e"] / t["sum_e"]
onehot = np.eye(V)[targets]
closed_form = (p - onehot) / N
assert_close(closed_form, steps["dlogits"], rtol=1e-12, atol=1e-15, what="closed form vs steps")
assert_close(cross_entropy_backward(ce_cache), closed_form, rtol=1e-12, atol=1e-15,
             what="library vs closed form")
print("cached for the backward:", type(ce_cache).__name__, ce_cache._fields)

# %% [markdown]
# The library's cache holds `probs` (N, V), `targets` and the count of counted targets: exactly the
# three things the closed form reads. It does not keep the logits or the exponentials — the
# closed form never looks at them.
#
# ## 4. The softmax on its own: `dz = p ⊙ (dp − Σ_j dp_j p_j)`
#
# Cross-entropy hid the softmax inside a fused rule. Attention (tutorial 03) applies a softmax
# whose output `p` is multiplied by the values, not fed to a cross-entropy, so it needs the
# backward of the softmax alone: given `dp` = ∂loss/∂p, find `dz` = ∂loss/∂z. Same method, shorter
# chain (the max shift is left out: it changes nothing, section 2 showed its gradient is zero):
#
# | forward line | backward line |
# |---|---|
# | `e = exp(z)` | `dz = de ⊙ e` |
# | `sum_e = Σ_v e` | `de += dsum_e`, broadcast back over v |
# | `p = e / sum_e` | `de = dp / sum_e`;  `dsum_e = −Σ_v dp ⊙ e / sum_e²` |
#
# (read the right column from the bottom up: `e` is used twice, in `sum_e` and in `p`, so `de` has
# two parts). Substituting, with `p = e / sum_e`:
#
# `dz = e ⊙ (dp / sum_e − Σ_j dp_j e_j / sum_e²) = p ⊙ (dp − Σ_j dp_j p_j)`
#
# — the upstream gradient minus its `p`-weighted mean, times `p`. (Written as a Jacobian:
# ∂p_i/∂z_j = p_i (δ_ij − p_j), and `dz = Jᵀ dp` gives the same line.)

# %%
def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward_steps(dp, z):
    e = np.exp(z)
    sum_e = e.sum(axis=-1, keepdims=True)
    de = dp / sum_e  # from p = e / sum_e, holding sum_e fixed
    dsum_e = -(dp * e).sum(axis=-1, keepdims=True) / sum_e**2  # … and holding e fixed
    de = de + dsum_e  # from sum_e = Σ e: a sum's backward is a broadcast
    return de * e  # from e = exp(z)


def softmax_backward(dp, p):
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


z = rng.standard_normal((3, V))
check_grad(softmax, lambda G, z: {"z": softmax_backward_steps(G, z)}, {"z": z.copy()})
dp = rng.standard_normal(z.shape)
assert_close(softmax_backward(dp, softmax(z)), softmax_backward_steps(dp, z), rtol=1e-12, atol=1e-15,
             what="one line vs steps")
assert np.abs(softmax_backward(dp, softmax(z)).sum(axis=-1)).max() < 1e-14  # see below
print("softmax backward: the steps pass check_grad, and the one-line form equals them")

# %% [markdown]
# Each row of `dz` sums to zero: adding a constant to a row of `z` does not change `p`, so the
# gradient has no component along the all-ones direction.
#
# **Why a random upstream gradient?** `check_grad` draws `G` at random on purpose: a backward
# that is wrong only in directions a fixed `G` cannot see passes a check made with that `G`.
# The softmax is the classic case. Its outputs always sum to one, so with `G = 1` the true gradient
# is exactly zero — and so is the gradient of a plausible-looking wrong rule that subtracts the
# plain mean of `dp` instead of its `p`-weighted mean:

# %%
def softmax_backward_wrong(dp, p):  # plain mean where the p-weighted mean belongs
    return p * (dp - dp.mean(axis=-1, keepdims=True))


ones = np.ones_like(z)
numeric_with_ones = numerical_grad(lambda: float(softmax(z).sum()), z)
wrong_with_ones = softmax_backward_wrong(ones, softmax(z))
assert np.abs(numeric_with_ones).max() < 1e-8
assert np.abs(wrong_with_ones).max() == 0.0
print("G = 1: the wrong rule agrees with finite differences (both are zero)")

wrong = check_grad(softmax, lambda G, z: {"z": softmax_backward_wrong(G, softmax(z))}, {"z": z},
                   raise_on_failure=False)
right = check_grad(softmax, lambda G, z: {"z": softmax_backward(G, softmax(z))}, {"z": z})
print("random G, wrong rule:\n", wrong)
assert not wrong.ok
assert right.ok

# %% [markdown]
# ## 5. The linear layer: `dx = dy W`, `dW = dyᵀ x`, `db = Σ_n dy`
#
# Write `y[n, o] = Σ_i x[n, i] W[o, i] + b[o]`. Then
#
# * `∂y[n, o] / ∂x[n, i] = W[o, i]`, so `dx[n, i] = Σ_o dy[n, o] W[o, i]`, i.e. `dx = dy W`;
# * `∂y[n, o] / ∂W[o, i] = x[n, i]` for every n, so `dW[o, i] = Σ_n dy[n, o] x[n, i]`, i.e. `dW = dyᵀ x`;
# * `b` is broadcast over the N rows, so its gradient is the sum over rows: `db = Σ_n dy[n]`.
#
# A quick sanity rule: each gradient has the shape of the thing it is the gradient of, and there
# is only one way to multiply `dy` (N, V) with `W` (V, C) or `x` (N, C) to get it.

# %%
def linear_by_hand(x, W, b):
    return x @ W.T + b


def linear_grads_by_hand(G, x, W, b):
    return {"x": G @ W, "W": G.T @ x, "b": G.sum(axis=0)}


check_grad(linear_by_hand, linear_grads_by_hand, {"x": x.copy(), "W": W.copy(), "b": b.copy()})

dy = rng.standard_normal((N, V))
ours = linear_grads_by_hand(dy, x, W, b)
assert_close(linear_forward(x, W, b), linear_by_hand(x, W, b), rtol=1e-14, what="y")
assert_close(linear_backward_input(dy, W), ours["x"], rtol=1e-14, what="dx")
assert_close(linear_backward_weight(dy, x), ours["W"], rtol=1e-14, what="dW")
assert_close(linear_backward_bias(dy), ours["b"], rtol=1e-14, what="db")

# %% [markdown]
# **Why is the library's linear backward split in three?** Because fine-tuning rarely needs all
# three gradients. A frozen layer in the middle of the network needs `dx` (to keep the gradient
# flowing) but not `dW` — and `dW` is a whole extra matrix product plus keeping `x` alive since
# the forward. S2FT (tutorial 09) needs `dW` for a few *columns* only, and because
# `dW[:, cols] = dyᵀ x[:, cols]` it passes a column slice of `x` and gets that block, nothing more:

# %%
cols = slice(0, 2)
assert_close(linear_backward_weight(dy, x[:, cols]), linear_backward_weight(dy, x)[:, cols],
             rtol=1e-14, what="column block of dW")

# %% [markdown]
# ## 6. Put them together: one gradient step on the head
#
# The full chain is `loss ← cross_entropy ← linear`. Its backward runs the two backward functions
# in the reverse order of the forward, feeding each one's output gradient into the next — the
# same composition `minift.model.model_backward` does for a whole decoder (tutorial 04).

# %%
def head_loss(x, W, b):
    return cross_entropy_forward(linear_forward(x, W, b), targets)[0]


def head_grads(G, x, W, b):
    _, cache = cross_entropy_forward(linear_forward(x, W, b), targets)
    dlogits = cross_entropy_backward(cache, G)
    return {"x": linear_backward_input(dlogits, W), "W": linear_backward_weight(dlogits, x),
            "b": linear_backward_bias(dlogits)}


print(check_grad(head_loss, head_grads, {"x": x.copy(), "W": W.copy(), "b": b.copy()}))

W_new, b_new = W.copy(), b.copy()
losses = []
for _ in range(20):
    g = head_grads(1.0, x, W_new, b_new)
    W_new -= 1.0 * g["W"]
    b_new -= 1.0 * g["b"]
    losses.append(head_loss(x, W_new, b_new))
print(f"loss {head_loss(x, W, b):.4f} → {losses[-1]:.4f} after 20 steps of gradient descent")
assert losses[-1] < 0.5 * head_loss(x, W, b)

# %% [markdown]
# ## Summary
#
# * Write the forward as named intermediates, and give each a gradient in reverse order.
# * Broadcast ⇄ sum; a value used twice gets the sum of its gradients.
# * Check with a *random* upstream gradient in float64 (`minift.testing.check_grad`): one relative
#   error per array.
# * Collapse the chain: softmax-cross-entropy becomes `(p − onehot)/N`; the softmax alone becomes
#   `p ⊙ (dp − Σ dp ⊙ p)`; the linear layer becomes three one-line products, and minift keeps them
#   separate so each method pays only for what it trains.
#
# ## Exercises
#
# 1. **Ignored targets.** Set some targets to `IGNORE_INDEX` (−100, the Hugging Face convention for
#    "do not train on this token", e.g. prompt tokens); the loss is then the mean over the *counted*
#    targets only. Derive `dlogits` by hand — what happens to those rows and to the denominator N?
#    — and compare with `cross_entropy_backward`.
# 2. **Mean-squared error.** For `loss = mean((x Wᵀ + b − y)²)` over all N·V entries, write the
#    backward by hand and check it with `check_grad`; reuse the library's linear backward for the last step.
# 3. **Why central differences, and why float64?** Write your own `central_difference(loss, x, eps)`
#    (what `minift.testing.numerical_grad` does: nudge each entry of `x` in place by ±eps, take
#    `(loss() − loss()) / 2eps`, put the entry back). Then run it on float32 copies of the linear
#    layer of section 5 and see how large the disagreement with `dW = Gᵀ x` becomes with
#    `eps = 1e-6` and with `eps = 1e-3`.
#
# Solutions: `tutorials/solutions/01_backprop_by_hand.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: a check
# prints "not answered yet" while its function returns None, "correct" when your answer is right,
# and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def ignored_dlogits(logits, targets):
    """Exercise 1: dloss/dlogits (N, V) for loss = the mean cross-entropy over the targets that
    are not IGNORE_INDEX (−100)."""
    return None  # your code here


def check_ignored_dlogits(ignored_dlogits):
    r = np.random.default_rng(3)
    logits, targets = r.standard_normal((6, 5)), r.integers(0, 5, size=6)
    targets[[0, 3, 4]] = -100
    if ignored_dlogits(logits, targets) is None:
        print("exercise 1: not answered yet")
        return
    _, cache = cross_entropy_forward(logits, targets)
    assert_close(ignored_dlogits(logits, targets), cross_entropy_backward(cache), rtol=1e-10, atol=1e-14,
                 what="dlogits with 3 of 6 targets ignored")
    print("exercise 1: correct")


check_ignored_dlogits(ignored_dlogits)


# %%
def mse_grads(x, W, b, y):
    """Exercise 2: the gradients of loss = mean((x Wᵀ + b − y)²), the mean over all N·V entries,
    as a dict {"x": dx, "W": dW, "b": db}."""
    return None  # your code here


def check_mse_grads(mse_grads):
    r = np.random.default_rng(7)
    x, W, b = r.standard_normal((5, 3)), r.standard_normal((4, 3)), r.standard_normal(4)
    y = r.standard_normal((5, 4))
    if mse_grads(x, W, b, y) is None:
        print("exercise 2: not answered yet")
        return
    check_grad(lambda x, W, b: ((x @ W.T + b - y) ** 2).mean(),
               lambda G, x, W, b: {k: G * g for k, g in mse_grads(x, W, b, y).items()},
               {"x": x, "W": W, "b": b})
    print("exercise 2: correct")


check_mse_grads(mse_grads)


# %%
def central_difference(loss, x, eps):
    """Exercise 3: the gradient of loss() with respect to the array x that loss reads, by central
    differences: each entry of x nudged in place by +eps and by −eps, then restored."""
    return None  # your code here


def check_central_difference(central_difference):
    r = np.random.default_rng(4)
    x, G = r.standard_normal((4, 3)), r.standard_normal((4, 3))
    before = x.copy()
    found = central_difference(lambda: float((np.sin(x) * G).sum()), x, 1e-4)
    if found is None:
        print("exercise 3: not answered yet")
        return
    assert np.array_equal(x, before), "x must hold its original values afterwards"
    exact = np.cos(x) * G
    error = np.linalg.norm(found - exact) / np.linalg.norm(exact)
    # a central difference errs by O(eps²) ≈ 1e-9 here; a one-sided one by O(eps) ≈ 1e-5
    assert error < 1e-7, f"relative error {error:.1e}: is the difference central, (f(x+ε) − f(x−ε)) / 2ε?"
    print("exercise 3: correct")


check_central_difference(central_difference)
