# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 06 · LoRA and PiSSA: low-rank updates, SVD initialisation, exact merging
#
# **What you will build.** LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3) freezes a weight W of
# shape (O, I) — O outputs, I inputs, the `[out, in]` layout of checkpoints — and trains a low-rank
# update `ΔW = s · B A` instead: A is (R, I), B is (O, R), the rank R is small and s is a fixed
# scaling, so the update costs R·(I + O) parameters instead of I·O. PiSSA (Meng et al. 2024,
# arXiv 2404.02948, §3) keeps LoRA's form but initialises B and A from the top-R singular triplets
# of W and freezes the rest as a residual. You will derive the adapter's backward, check it, see
# why LoRA starts exactly at the base model, why its A receives no gradient at the first step while
# PiSSA's does, and merge a trained adapter into the weight exactly.
#
# **Prerequisites.** Tutorials 01 (linear backward) and 04 (slots, AdamW).
#
# **Library functions explained here.** `minift.methods.lora.lowrank_forward`,
# `minift.methods.lora.lowrank_backward`, `minift.methods.lora.LowRankLinear`,
# `minift.methods.lora.LoRAConfig`, `minift.methods.lora.apply_lora`, `minift.methods.lora.merge`,
# `minift.methods.lora.unmerge`, `minift.methods.pissa.PiSSAConfig`,
# `minift.methods.pissa.apply_pissa`, `minift.methods.pissa.pissa_factors`,
# `minift.methods.pissa.top_svd`, and `minift.io.peft.export_peft_adapter`.

# %%
import copy
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from minift import ModelConfig, init_model, loss_and_grads, model_forward, trainable_parameters
from minift.methods.lora import (
    LoRAConfig,
    LowRankLinear,
    apply_lora,
    lowrank_backward,
    lowrank_forward,
    merge,
    unmerge,
)
from minift.methods.pissa import PiSSAConfig, apply_pissa, pissa_factors, top_svd
from minift.optim import AdamW
from minift.testing import assert_close, check_grad


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
# ## 1. The low-rank slot, forward and backward
#
# With the frozen W and b, trainable A and B, and the scaling s = alpha / R (PEFT's convention):
#
#     h = x Aᵀ            (N, R)   the input projected onto R directions
#     y = x Wᵀ + b + s · h Bᵀ
#
# It never forms the (O, I) product B A. The backward is tutorial 01's linear rule three times:
#
#     dB = s · dyᵀ h,   dh = s · dy B,   dA = dhᵀ x,   dx = dy W + dh A
#
# so the cache needs `x` (for dA) and `h` (for dB) — and nothing for the frozen path, whose
# `dx = dy W` reads only W.

# %%
N, I, O, R, s = 5, 6, 4, 2, 2.0
x = rng.standard_normal((N, I))
W = rng.standard_normal((O, I))
A = rng.standard_normal((R, I))
B = rng.standard_normal((O, R))

y, cache = lowrank_forward(x, W, A, B, scaling=s)
assert_close(y, x @ (W + s * B @ A).T, rtol=1e-12, what="factored vs dense W + sBA")
print("cached:", cache._fields, "with shapes", cache.x.shape, cache.h.shape)


def by_hand(G, x, W, A, B):
    h = x @ A.T
    dh = s * G @ B
    return {"x": G @ W + dh @ A, "W": G.T @ x, "A": dh.T @ x, "B": s * G.T @ h}


check_grad(lambda x, W, A, B: lowrank_forward(x, W, A, B, scaling=s)[0], by_hand,
           {"x": x.copy(), "W": W.copy(), "A": A.copy(), "B": B.copy()})
dy = rng.standard_normal((N, O))
dx, dA, dB, _ = lowrank_backward(dy, cache, W, A, B, scaling=s)
ours = by_hand(dy, x, W, A, B)
for name, got in (("x", dx), ("A", dA), ("B", dB)):
    assert_close(got, ours[name], rtol=1e-12, what=f"d{name}")
print("lowrank_backward = the hand-derived rules (and W gets no gradient: it is frozen)")

# %% [markdown]
# ## 2. LoRA on a model
#
# `apply_lora(model, LoRAConfig(r, alpha, targets=…), rng)` freezes everything and swaps each
# target projection for a `LowRankLinear` slot. PEFT's initialisation: A ~ U(−1/√I, 1/√I), **B = 0**
# — so `ΔW = 0` and the adapted model *is* the base model at step 0, bit for bit.

# %%
config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, n_layers=2, n_heads=4,
                     n_kv_heads=2)
base = init_model(config, np.random.default_rng(1), dtype=np.float64, std=0.3)
tokens = rng.integers(0, 32, size=(2, 9))
x_in, y_out = tokens[:, :-1], tokens[:, 1:]
base_logits, _ = model_forward(base, x_in, train=False)

lora_cfg = LoRAConfig(r=2, alpha=4.0, targets=("q", "v", "down"))
lora = apply_lora(copy.deepcopy(base), lora_cfg, rng=np.random.default_rng(2))
print("scaling alpha / r =", lora_cfg.scaling, "; q slot:", type(lora.blocks[0].q).__name__)
assert isinstance(lora.blocks[0].q, LowRankLinear)
assert np.array_equal(model_forward(lora, x_in, train=False)[0], base_logits)
n_lora = sum(p.size for p in trainable_parameters(lora).values())
print(f"{n_lora} trainable parameters (dense q, v, down would be "
      f"{config.n_layers * (16 * 16 + 8 * 16 + 16 * 32)})")

# %% [markdown]
# B = 0 has a consequence the formulas above make plain: `dA = dhᵀ x` with `dh = s · dy B = 0`.
# At the first step **only B learns**; A starts moving once B is non-zero. The whole-model
# gradient shows it:

# %%
_, g = loss_and_grads(lora, x_in, y_out)
print("largest |dA| entry at step 0:", max(np.abs(v).max() for k, v in g.items() if k.endswith(".A")),
      " largest |dB| entry:", round(max(np.abs(v).max() for k, v in g.items() if k.endswith(".B")), 4))
assert all(np.all(v == 0) for k, v in g.items() if k.endswith(".A"))

# %% [markdown]
# ## 3. PiSSA: start from the principal part of W
#
# Write W = U diag(σ) Vᵀ. PiSSA puts the top-R triplets into the adapter and freezes the rest:
#
#     A = diag(√(σ_R / s)) V_Rᵀ,   B = U_R diag(√(σ_R / s)),   W_res = W − s · B A
#
# so `s · B A = U_R diag(σ_R) V_Rᵀ` — by Eckart–Young the best rank-R approximation of W — and
# `W_res + s · B A = W`: the model is unchanged at initialisation, but the trainable part is the
# most significant part of W instead of zero, and both A and B get gradients from the first step.

# Written from those three lines with NumPy's SVD, and compared with the library's
# `pissa_factors` (singular vectors are defined up to sign, so compare B A, which is not):

# %%
def pissa_by_hand(w, r, s):
    U, sigma, Vt = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(sigma[:r] / s)
    A, B = root[:, None] * Vt[:r], U[:, :r] * root
    return A, B, w - s * B @ A


w = base.blocks[0].q.weight
A0, B0, W_res = pissa_factors(w, 2, scaling=2.0)
A1, B1, W_res1 = pissa_by_hand(w, 2, 2.0)
assert_close(B1 @ A1, B0 @ A0, rtol=1e-10, atol=1e-12, what="B A, by hand and pissa_factors")
assert_close(W_res1, W_res, rtol=1e-10, atol=1e-12, what="W_res, by hand and pissa_factors")
U, sig, Vt = top_svd(w, 2)
assert_close(W_res + 2.0 * B0 @ A0, w, rtol=1e-12, atol=1e-13, what="W_res + sBA = W")
sigma_all = np.linalg.svd(w, compute_uv=False)
assert_close(np.linalg.norm(W_res), np.sqrt((sigma_all[2:] ** 2).sum()), rtol=1e-10,
             what="‖W_res‖ = the energy of the discarded singular values")
print("singular values of W:", sigma_all.round(3), "→ adapter takes", sig.round(3))

pissa = apply_pissa(copy.deepcopy(base), PiSSAConfig(r=2, alpha=4.0, targets=("q", "v", "down")))
assert_close(model_forward(pissa, x_in, train=False)[0], base_logits, rtol=1e-10, atol=1e-12,
             what="PiSSA at init")
_, g = loss_and_grads(pissa, x_in, y_out)
print("PiSSA: largest |dA| entry at step 0:",
      round(max(np.abs(v).max() for k, v in g.items() if k.endswith(".A")), 4))

# %% [markdown]
# For large matrices the exact SVD is the expensive part; `PiSSAConfig(niter=k)` uses the
# randomized SVD PEFT uses (`pissa_niter_k`), which converges to the exact factors as k grows
# (exercise 2).
#
# ## 4. Training, and merging exactly
#
# Train both for a few AdamW steps on the same batch. Then **merge**: fold `s·B A` into the frozen
# weight, `W ← W + s·B A`, after which the slot is a plain linear layer and inference costs
# nothing extra. The merged model computes the same function as the adapted one; `unmerge`
# subtracts the update again.

# %%
def train(model, steps=30, lr=2e-2):
    opt = AdamW(trainable_parameters(model))
    losses = []
    for _ in range(steps):
        loss, grads = loss_and_grads(model, x_in, y_out)
        opt.step(grads, lr=lr)
        losses.append(loss)
    return losses


curves = {"LoRA": train(lora), "PiSSA": train(pissa)}
for name, c in curves.items():
    print(f"{name:>5}: loss {c[0]:.3f} → {c[-1]:.3f}")

for name, model in (("LoRA", lora), ("PiSSA", pissa)):
    adapted = model_forward(model, x_in, train=False)[0]
    w_before = model.blocks[0].q.weight.copy()
    merge(model)
    assert not trainable_parameters(model)  # the adapter now lives inside the frozen weight
    assert_close(model_forward(model, x_in, train=False)[0], adapted, rtol=1e-10, atol=1e-12,
                 what=f"{name} merged vs adapted")
    unmerge(model)
    assert_close(model.blocks[0].q.weight, w_before, rtol=1e-12, atol=1e-14, what="unmerge")
print("merged = adapted, and merge then unmerge returns the weight (to rounding)")

# %% [markdown]
# As a picture:

# %%
fig, ax = plt.subplots(figsize=(5, 3))
for name, c in curves.items():
    ax.plot(c, label=name)
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.legend()
fig.tight_layout()
show(fig, "06_lora_vs_pissa")

# %% [markdown]
# **Sharing adapters.** `minift.io.peft.export_peft_adapter` writes a LoRA as a Hugging
# Face PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) that PEFT loads
# on the same base model. A PiSSA adapter is exported as a LoRA of rank 2R on the *original*
# W, since `s(B A − B₀ A₀) = s [B, −B₀] [A; A₀]`.
#
# ## Summary
#
# * LoRA: `y = x Wᵀ + s (x Aᵀ) Bᵀ`; cache `x` and `x Aᵀ`; B = 0 makes the start exact and makes
#   dA vanish at step 0.
# * PiSSA: the same slot, initialised with the top-R SVD of W and a frozen residual; exact at
#   init, and the principal directions train from step 0.
# * Merging folds `s B A` into W; merged = adapted, and unmerge undoes it.
#
# ## Exercises
#
# 1. **rsLoRA.** With `use_rslora=True` the scaling is alpha / √r. For r = 1, 4, 16 and alpha = 8,
#    compare both scalings, and show with `pissa_factors` that PiSSA's `s·B A` does not depend on
#    the scaling at all.
# 2. **Randomized SVD.** Measure `‖U_k diag(σ_k) V_kᵀ − U_r diag(σ_r) V_rᵀ‖_F` — the randomized
#    rank-r part against the exact one — for `top_svd(w, r, niter=k)` with k = 0, 1, 2, 4 on a
#    matrix with slowly decaying singular values.
# 3. **Dropout.** `LoRAConfig(dropout=p)` feeds the adapter `drop(x) = x ⊙ mask / (1 − p)` during
#    training (mask: a fixed 0/1 array of x's shape), and x itself in inference. Show that a forward
#    with `keep=False` (inference) is deterministic, and derive the backward with the mask: which of
#    section 1's four rules change?
#
# Solutions: `tutorials/solutions/06_lora_and_pissa.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def rslora_scaling(alpha, r):
    """Exercise 1: the scaling factor s of rank-stabilised LoRA for a given alpha and rank r."""
    return None  # your code here


def check_rslora_scaling(rslora_scaling):
    if rslora_scaling(8.0, 4) is None:
        print("exercise 1: not answered yet")
        return
    for r in (1, 4, 16):
        expected = LoRAConfig(r=r, alpha=8.0, use_rslora=True).scaling
        assert abs(rslora_scaling(8.0, r) - expected) < 1e-12, f"r={r}: expected {expected}"
    print("exercise 1: correct")


check_rslora_scaling(rslora_scaling)


# %%
def randomized_error(w, r, niter):
    """Exercise 2: ‖rank-r part from top_svd(w, r, niter=niter, rng=default_rng(1)) − exact rank-r
    part‖_F (Frobenius norm)."""
    return None  # your code here


def check_randomized_error(randomized_error):
    M = np.random.default_rng(3).standard_normal((30, 20)) / np.arange(1, 21) ** 0.5
    if randomized_error(M, 4, 0) is None:
        print("exercise 2: not answered yet")
        return
    U, sig, Vt = top_svd(M, 4)
    for k in (0, 2):
        Uk, sk, Vtk = top_svd(M, 4, niter=k, rng=np.random.default_rng(1))
        expected = np.linalg.norm((Uk * sk) @ Vtk - (U * sig) @ Vt)
        got = randomized_error(M, 4, k)
        assert abs(got - expected) <= 1e-9 * max(1.0, expected), f"niter={k}: {got}, expected {expected}"
    print("exercise 2: correct")


check_randomized_error(randomized_error)


# %%
def dropout_lowrank_grads(G, x, W, A, B, s, mask, p):
    """Exercise 3: the gradients {"x", "A", "B"} of y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ for the upstream
    gradient G, with drop(x) = x ⊙ mask / (1 − p)."""
    return None  # your code here


def check_dropout_lowrank_grads(dropout_lowrank_grads):
    r = np.random.default_rng(5)
    x, W, A, B = r.standard_normal((4, 6)), r.standard_normal((3, 6)), r.standard_normal((2, 6)), \
        r.standard_normal((3, 2))
    G, mask = r.standard_normal((4, 3)), r.random((4, 6)) >= 0.5
    if dropout_lowrank_grads(G, x, W, A, B, 2.0, mask, 0.5) is None:
        print("exercise 3: not answered yet")
        return
    _, cache = lowrank_forward(x, W, A, B, scaling=2.0, mask=mask, p=0.5)
    dx, dA, dB, _ = lowrank_backward(G, cache, W, A, B, scaling=2.0, p=0.5)
    got = dropout_lowrank_grads(G, x, W, A, B, 2.0, mask, 0.5)
    for name, expected in (("x", dx), ("A", dA), ("B", dB)):
        assert_close(np.asarray(got[name]), expected, rtol=1e-10, atol=1e-12, what=f"d{name}")
    print("exercise 3: correct")


check_dropout_lowrank_grads(dropout_lowrank_grads)
