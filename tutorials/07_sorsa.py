# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 07 · SORSA: singular values and vectors as parameters, kept orthonormal
#
# **What you will build.** SORSA (Cao et al., arXiv 2409.00055) splits each weight by its SVD into a
# frozen residual and a trainable principal part `B diag(S) A` whose factors start as singular
# vectors (A = V_Rᵀ, B = U_R) and singular values (S = σ_R). An *orthonormal regularizer* keeps
# A's rows and B's columns close to orthonormal during training, so the principal part stays an
# SVD-like factorisation. You will build the split, derive the regularizer's gradient and check
# it, see how it enters the optimizer step, and measure how far training moves the singular
# values (ΔΣ) and singular vectors (ΔD) — the paper's analysis — with a plot.
#
# **Prerequisites.** Tutorial 06 (the low-rank slot, PiSSA's SVD split).
#
# **Library functions explained here.** `minift.methods.sorsa.sorsa_factors`,
# `minift.methods.sorsa.apply_sorsa`, `minift.methods.sorsa.SORSAConfig`,
# `minift.methods.sorsa.orthonormality_forward`, `minift.methods.sorsa.orthonormality_backward`,
# `minift.methods.sorsa.orthonormal_regularizer`, `minift.methods.sorsa.SORSARegularizer`,
# `minift.methods.svd_analysis.svd_deviation`, `minift.methods.svd_analysis.SVDTrajectory`,
# `minift.train.train_step`.

# %%
import copy
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from minift import (
    ModelConfig,
    init_model,
    loss_and_grads,
    model_forward,
    set_trainable,
    trainable_parameters,
)
from minift.data import Batch
from minift.methods.pissa import PiSSAConfig, apply_pissa
from minift.methods.sorsa import (
    SORSAConfig,
    SORSARegularizer,
    apply_sorsa,
    gradient_hook,
    orthonormal_regularizer,
    orthonormality_backward,
    orthonormality_forward,
    sorsa_factors,
)
from minift.methods.svd_analysis import SVDTrajectory, svd_deviation
from minift.optim import AdamW
from minift.testing import assert_close, check_grad
from minift.train import train_step


def show(fig, name: str) -> None:
    """Draw `fig` inline in a notebook; run as a script, save it as a PNG in the system's temporary
    folder instead (a tutorial never writes into the checkout) and say where."""
    if "ipykernel" in sys.modules:
        plt.show()
    else:
        path = Path(tempfile.gettempdir()) / f"minift-tutorial-{name}.png"
        fig.savefig(path)
        print(f"figure saved to {path}")
    plt.close(fig)


rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The SVD split
#
# A stored weight is `[out, in]`: W (O, I) = U diag(σ) Vᵀ. (The paper writes `y = x W` with W of
# shape (in, out), the transpose; its "U" is our V. minift works on the stored layout, as the
# official code does by taking the SVD of `weight.T`.) SORSA keeps the top R triplets trainable:
#
#     A = V_Rᵀ (R, I),   S = σ_R (R,),   B = U_R (O, R),   W_res = W − s · B diag(S) A   (frozen)
#     y = x W_resᵀ + s · ((x Aᵀ) ⊙ S) Bᵀ
#
# with s = 1 in the paper. It is the low-rank slot of tutorial 06 with one more trainable vector S;
# unlike PiSSA, σ is not folded into A and B, so A and B are *orthonormal* at initialisation.

# %%
W = rng.standard_normal((8, 6))
A, S, B, W_res = sorsa_factors(W, 3, scaling=1.0)
assert_close(W_res + (B * S) @ A, W, rtol=1e-12, atol=1e-13, what="W_res + B diag(S) A")
assert_close(A @ A.T, np.eye(3), atol=1e-12, what="A Aᵀ = I")
assert_close(B.T @ B, np.eye(3), atol=1e-12, what="Bᵀ B = I")
print("S = the top singular values:", S.round(3))

# %% [markdown]
# ## 2. The orthonormal regularizer and its gradient
#
# For each adapted matrix, `‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F`, averaged over all factor matrices —
# Frobenius norms, **not squared** (paper and official code). Derive the gradient for one term,
# `f(X) = ‖M‖_F` with `M = X Xᵀ − I` (pass A as X, and Bᵀ for B, whose columns are the vectors):
#
# * `d‖M‖_F = ⟨M, dM⟩ / ‖M‖_F` (the derivative of a norm is the unit vector);
# * `dM = dX Xᵀ + X dXᵀ`, and M is symmetric, so `⟨M, dM⟩ = 2 ⟨M X, dX⟩`;
# * hence `∇_X f = 2 M X / ‖M‖_F`.
#
# At an orthonormal X the norm is zero and not differentiable; the library returns a zero gradient
# there, as PyTorch's norm does, rather than adding an ε that would change the value.

# %%
X = rng.standard_normal((3, 6)) * 0.5


def by_hand(G, X):
    M = X @ X.T - np.eye(X.shape[0])
    return {"X": G * 2 * M @ X / np.linalg.norm(M)}


check_grad(lambda X: orthonormality_forward(X)[0], by_hand, {"X": X.copy()})
value, cache = orthonormality_forward(X)
assert_close(orthonormality_backward(1.0, cache), by_hand(1.0, X)["X"], rtol=1e-12, what="library ∇")
print(f"‖X Xᵀ − I‖ = {value:.4f}; zero for the SVD factors: {orthonormality_forward(A)[0]:.1e}")
assert np.all(orthonormality_backward(1.0, orthonormality_forward(np.eye(3, 6))[1]) == 0)

# %% [markdown]
# **Why not squared?** `‖M‖²` has gradient `4 M X`, which vanishes as the factors approach
# orthonormality: the pull weakens exactly where small deviations accumulate. The plain norm's
# gradient has a magnitude that does not shrink with the deviation — `‖2 M X‖ / ‖M‖` stays of
# order ‖X‖ — so the regularizer keeps pulling. A runnable comparison along a path towards an
# orthonormal X:

# %%
Q = np.linalg.qr(rng.standard_normal((6, 3)))[0].T  # orthonormal rows
D = rng.standard_normal((3, 6))
for t in (1e-1, 1e-2, 1e-3):
    Xt = Q + t * D
    v, c = orthonormality_forward(Xt)
    g_plain = np.linalg.norm(orthonormality_backward(1.0, c))
    g_squared = np.linalg.norm(4 * c.M @ Xt)
    print(f"distance {t:.0e}: ‖∇‖ plain = {g_plain:.3f}, squared = {g_squared:.5f}")
assert g_plain > 1.0 > 10 * g_squared

# %% [markdown]
# ## 3. SORSA on a model, and how the regularizer enters a step
#
# `apply_sorsa(model, SORSAConfig(r=…))` adapts all seven projections by default; the model is
# unchanged at initialisation. `orthonormal_regularizer(model)` gives L_ortho and its gradient,
# keyed like the model's gradients.
#
# The official training loop does not add L_ortho (the paper calls it L_reg) to the loss. It clips
# the task gradient first, then adds `(γ / η_max) · ∇L_ortho` unclipped, and hands the sum to AdamW
# (γ the strength, η_max the peak learning rate). That is a *gradient hook* the training step
# calls after clipping: `hook(model, grads, lr_max=…, accum_steps=…)`. γ lives in one place,
# `SORSAConfig.gamma`; `gradient_hook(config)` builds the hook (a `SORSARegularizer` holding that
# config) from it.
# The factor the hook puts on ∇L_ortho, with n the number of micro-batches accumulated per step:
#
#     mode="faithful" (default):  c = γ / (η_max · n)   — what the official run did: its training
#                                                          library divides every backward by n
#     mode="plain":               c = γ / η_max         — the paper's formula (there n = 1)
#
# With n = 1 the two modes agree.
#
# **How this relates to the paper's rule.** The paper writes one step as
# `W ← W − η_t ∇L_train − γ ∇L_reg` (Sec. 3, with the regularizer's step *not* scaled by the
# schedule). The code hands AdamW the gradient `∇L_train + (γ / η_max) ∇L_reg`, which AdamW then
# steps by η_t: at the peak of the schedule (η_t = η_max) and for plain SGD this is exactly the
# paper's rule — `η_max · (γ / η_max) = γ`. With AdamW the regularizer passes through the same
# normalisation as the task gradient, so the correspondence is that of the official code, not exact.

# %%
config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, n_layers=2, n_heads=4,
                     n_kv_heads=2)
base = init_model(config, np.random.default_rng(1), std=0.3)
tokens = rng.integers(0, 32, size=(4, 13))
batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones_like(tokens[:, :-1]))
base_logits, _ = model_forward(base, batch.tokens, train=False)

sorsa_cfg = SORSAConfig(r=4, gamma=4e-2)
sorsa = apply_sorsa(copy.deepcopy(base), sorsa_cfg)
assert_close(model_forward(sorsa, batch.tokens, train=False)[0], base_logits, rtol=1e-4, atol=1e-5,
             what="SORSA at init")
print("trainable:", [k for k in trainable_parameters(sorsa)][:3], "…")
print(f"L_ortho at init: {orthonormal_regularizer(sorsa)[0]:.1e}")

# %% [markdown]
# One SGD step by hand, in the paper's form, against the hook. In the paper's rule W stands for
# each trainable factor A and B (S has no regularizer gradient). The hook adds c · ∇L_reg with
# c = γ / η_max (n = 1 here); an SGD step of size η = η_max on the sum is then
# `−η ∇L_train − γ ∇L_reg`, the paper's rule exactly. Write both sides:

# %%
eta = 1e-2
_, g_train = loss_and_grads(sorsa, batch.tokens, batch.targets)
_, g_reg = orthonormal_regularizer(sorsa)
key = "blocks.0.q.A"
paper_step = -eta * g_train[key] - sorsa_cfg.gamma * g_reg[key]  # the paper's rule, η_t = η_max = η
c = sorsa_cfg.gamma / eta  # the code's coefficient, γ / η_max (n = 1)
code_step = -eta * (g_train[key] + c * g_reg[key])  # SGD on the hooked gradient
assert_close(code_step, paper_step, rtol=1e-5, atol=1e-9, what="the code's step = the paper's step")
g_hooked = dict(g_train)
gradient_hook(sorsa_cfg)(sorsa, g_hooked, lr_max=eta)  # the library's hook adds the same c · ∇L_reg
assert_close(-eta * g_hooked[key], code_step, rtol=1e-5, atol=1e-9, what="hook vs by hand")
print(f"{key}: −η·(∇L_train + γ/η·∇L_reg) equals −η∇L_train − γ∇L_reg")

# %% [markdown]
# Now train at **one setting for every method**: the same batch, AdamW, learning rate 1e-2 and 40
# steps. (The rate is high on purpose, so that the factors drift quickly at this tiny scale.)
# First SORSA with the regularizer and without it (γ = 0), comparing L_ortho:

# %%
LR, STEPS = 1e-2, 40


def train(model, hooks=()):
    """STEPS AdamW steps at LR; returns the final loss and the ΔΣ/ΔD record (every 5 steps)."""
    opt = AdamW(trainable_parameters(model))
    trajectory = SVDTrajectory.start(model, every=5)
    trajectory.record(model, 0)
    for step in range(1, STEPS + 1):
        loss = train_step(model, opt, [batch], LR, grad_hooks=list(hooks), lr_max=LR).loss
        trajectory(model, step)
    return loss, trajectory


def train_sorsa(gamma):
    cfg = SORSAConfig(r=4, gamma=gamma)
    model = apply_sorsa(copy.deepcopy(base), cfg)
    return (model, *train(model, [gradient_hook(cfg)]))


regularized, loss_sorsa, traj_sorsa = train_sorsa(gamma=4e-2)
free, _, _ = train_sorsa(gamma=0.0)
l_reg, l_free = orthonormal_regularizer(regularized)[0], orthonormal_regularizer(free)[0]
print(f"L_ortho after training: with the regularizer {l_reg:.4f}, without {l_free:.4f}")
assert l_reg < l_free

# %% [markdown]
# ## 4. ΔΣ and ΔD: how far training moves the singular values and vectors
#
# The SORSA paper measures, for each weight, the mean change of its singular values,
# `ΔΣ = mean_i |σ'_i − σ_i|`, and how far its singular vectors rotate,
# `ΔD = 1 − mean_i (|⟨u'_i, u_i⟩| + |⟨v'_i, v_i⟩|) / 2` (0 = no rotation). `svd_deviation` computes
# both for any two weights; `SVDTrajectory` records them for every trained projection during
# training (above, every 5 steps). For comparison, at the same settings: full fine-tuning, and
# PiSSA (the same SVD initialisation as SORSA, without S and without the regularizer):

# %%
full = set_trainable(copy.deepcopy(base))
loss_full, traj_full = train(full)
pissa = apply_pissa(copy.deepcopy(base), PiSSAConfig(r=4))
loss_pissa, traj_pissa = train(pissa)

rows = {"SORSA": list(traj_sorsa.mean()), "PiSSA": list(traj_pissa.mean()),
        "full FT": list(traj_full.mean())}
losses = {"SORSA": loss_sorsa, "PiSSA": loss_pissa, "full FT": loss_full}
for name, pts in rows.items():
    s, dsig, dd = pts[-1]
    print(f"{name:>8} after {s} steps at lr {LR}: mean ΔΣ = {dsig:.4f}, mean ΔD = {dd:.4f}, "
          f"training loss {losses[name]:.3f}")
    assert abs(pts[0][1]) < 1e-12
    assert abs(pts[0][2]) < 1e-12  # step 0: nothing has moved
assert rows["SORSA"][-1][2] < min(rows["PiSSA"][-1][2], rows["full FT"][-1][2])
assert rows["SORSA"][-1][1] < min(rows["PiSSA"][-1][1], rows["full FT"][-1][1])

w0 = base.blocks[0].q.weight
print("one matrix, directly:", svd_deviation(w0, full.blocks[0].q.weight))

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, pts in rows.items():
    arr = np.array(pts)
    ax.plot(arr[:, 1], arr[:, 2], marker="o", label=name)
ax.set_xlabel("ΔΣ (mean |Δσ|)")
ax.set_ylabel("ΔD (1 − mean |cos|)")
ax.set_title(f"every 5 steps, lr {LR}, same batch")
ax.legend()
fig.tight_layout()
show(fig, "07_delta_sigma_delta_d")

# %% [markdown]
# At matched settings SORSA moves both the singular values and the singular vectors least — the
# ordering the paper reports and minift's study measures (`minift study`). Read it with the loss
# column beside it: SORSA also fits the batch better than PiSSA here (training loss about 0.7
# against 1.8), so against PiSSA it learns more while moving less; full fine-tuning fits far better
# still (about 0.02), so against full FT part of SORSA's smaller deviation is that it has learned
# less. A comparison at matched loss (the study's "steps to target") is the fairer one for a claim
# about forgetting.
#
# ## Summary
#
# * SORSA = a frozen residual + trainable `B diag(S) A` from the top-R SVD; exact at init.
# * `L_ortho = mean(‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F)`, gradient `2 M X / ‖M‖_F`, zero at M = 0.
# * It is added after clipping, scaled by γ / η_max, as a gradient hook.
# * ΔΣ / ΔD quantify how much fine-tuning rewrites a weight's spectrum and directions.
#
# ## Exercises
#
# 1. **The guard.** Write ∇_X ‖X Xᵀ − I‖_F with the library's guard (zero where the norm is zero),
#    and call it on an exactly orthonormal X (`np.eye(3, 6)`) and on one that is orthonormal only
#    up to rounding (from a QR). What does the difference say about how the plain norm behaves
#    near its minimum?
# 2. **Accumulation.** With `mode="faithful"` the hook divides by the accumulation steps, as the
#    official run did through `accelerate`. Compute the coefficient for γ = 4e-4, η_max = 3e-5 and
#    4 accumulation steps in both modes.
# 3. **ΔΣ and ΔD by hand.** Write ΔΣ and ΔD from their definitions in section 4 with NumPy's SVD
#    (all min(O, I) triplets), and show that multiplying W by 2 gives ΔD = 0 and ΔΣ = mean σ, while
#    a random orthogonal rotation of W's rows keeps ΔΣ = 0.
#
# Solutions: `tutorials/solutions/07_sorsa.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def ortho_grad(X):
    """Exercise 1: ∇_X ‖X Xᵀ − I‖_F, and zeros where the norm is exactly 0."""
    return None  # your code here


def check_ortho_grad(ortho_grad):
    if ortho_grad(np.ones((1, 2))) is None:
        print("exercise 1: not answered yet")
        return
    exact = np.asarray(ortho_grad(np.eye(3, 6)))
    assert np.array_equal(exact, np.zeros((3, 6))), "at M = 0 (X = np.eye(3, 6)) the guard gives zeros"
    for seed in (0, 1):
        X = np.random.default_rng(seed).standard_normal((3, 5))
        expected = orthonormality_backward(1.0, orthonormality_forward(X)[1])
        assert_close(np.asarray(ortho_grad(X)), expected, rtol=1e-10, atol=1e-12, what=f"seed {seed}")
    print("exercise 1: correct")


check_ortho_grad(ortho_grad)

# %%
def regularizer_coefficient(gamma, lr_max, accum_steps, mode):
    """Exercise 2: the factor c the hook puts on ∇L_ortho, for mode "faithful" or "plain"."""
    return None  # your code here


def check_regularizer_coefficient(regularizer_coefficient):
    if regularizer_coefficient(4e-4, 3e-5, 4, "plain") is None:
        print("exercise 2: not answered yet")
        return
    for mode in ("faithful", "plain"):
        for accum in (1, 4):
            expected = SORSARegularizer(SORSAConfig(gamma=4e-4, mode=mode)).coefficient(3e-5, accum)
            got = regularizer_coefficient(4e-4, 3e-5, accum, mode)
            assert abs(got - expected) <= 1e-12 * expected, f"{mode}, {accum} steps: {got} ≠ {expected}"
    print("exercise 2: correct")


check_regularizer_coefficient(regularizer_coefficient)


# %%
def deviation_by_hand(w_old, w_new):
    """Exercise 3: (ΔΣ, ΔD) of two weights of one shape, over all min(O, I) singular triplets."""
    return None  # your code here


def check_deviation_by_hand(deviation_by_hand):
    r = np.random.default_rng(6)
    W = r.standard_normal((6, 4))
    if deviation_by_hand(W, W) is None:
        print("exercise 3: not answered yet")
        return
    Q = np.linalg.qr(r.standard_normal((6, 6)))[0]
    for name, W1 in (("2W", 2 * W), ("−W", -W), ("QW", Q @ W), ("W + noise", W + r.standard_normal((6, 4)))):
        expected = svd_deviation(W, W1)
        got = tuple(float(v) for v in deviation_by_hand(W, W1))
        assert_close(np.array(got), np.array(expected), rtol=1e-9, atol=1e-12, what=f"(ΔΣ, ΔD) for {name}")
    print("exercise 3: correct")


check_deviation_by_hand(deviation_by_hand)
