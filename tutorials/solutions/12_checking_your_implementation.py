# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 12 · Checking your implementation

# %%
import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# The spec's properties run Hypothesis, which by default keeps its files (a database of failing
# examples, a cache) in ./.hypothesis; a tutorial writes nothing into the folder it runs from, so
# they go to a temporary folder, and no database is kept. (Before minift.spec.properties is
# imported: the properties read the profile then.)
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="minift-tutorial-hypothesis-"))
settings.register_profile("minift-tutorial", parent=settings.default, database=None)
settings.load_profile("minift-tutorial")

from minift.io.safetensors_io import read_safetensors
from minift.spec.export import export_vectors
from minift.spec.minift_impl import implementation as minift_impl
from minift.spec.properties import PROPERTIES

# Every file this tutorial writes goes into a scratch folder that is deleted when Python exits:
# the tutorial can be rerun, from any folder, and leaves the checkout as it found it.
work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)

# %% [markdown]
# ## 1. PiSSA without the division by the scaling
#
# With A = diag(√σ) Vᵀ and B = U diag(√σ), `W_res + s·B A = W` still holds (W_res is computed from
# the factors), so the model is still unchanged at initialisation. But `s·B A = s · U_r Σ_r V_rᵀ`
# is the principal part only when s = alpha / r = 1. The property that states "s·BA is the rank-r
# truncated SVD" catches it for every alpha ≠ r. `prop.hypothesis.inner_test` runs a property on
# one chosen input, without Hypothesis.

# %%
class NoDivision:
    def pissa_init(self, W, r, alpha):
        s = alpha / r
        U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
        A, B = np.sqrt(sigma[:r])[:, None] * Vt[:r], U[:, :r] * np.sqrt(sigma[:r])
        return W - s * B @ A, A, B


prop = PROPERTIES["pissa_init_keeps_the_weight_and_adapts_its_principal_part"]
prop.hypothesis.inner_test(NoDivision(), shape=(6, 5, 2), seed=0, alpha=2.0)  # s = 1: passes
try:
    prop.hypothesis.inner_test(NoDivision(), shape=(6, 5, 2), seed=0, alpha=4.0)  # s = 2
    caught = ""
except AssertionError as e:
    caught = str(e)
print("alpha = r passes; alpha = 2r fails with:", caught)
assert "truncated SVD" in caught

# %% [markdown]
# ## 2. The tolerance rule
#
# Entry by entry, relative to |expected| (not |actual|, which a wrong answer can inflate), plus an
# absolute floor for entries near zero, where no relative tolerance helps. A normwise test
# (‖a − e‖ ≤ atol + rtol‖e‖) is weaker: a large entry lets a small one be wrong. Every vector of
# the exported set, read with nothing but the arrays and `case.json`, against minift:

# %%
def within_tolerance(actual, expected, rtol, atol):
    return bool(np.all(np.abs(actual - expected) <= atol + rtol * np.abs(expected)))


export_vectors(work / "vectors")
case = json.loads((work / "vectors/decoder_gqa/case.json").read_text())
arrays, _ = read_safetensors(work / "vectors/decoder_gqa/arrays.safetensors")
weights = {k.removeprefix("input/weight/"): v for k, v in arrays.items() if k.startswith("input/weight/")}
logits = minift_impl.decoder_logits(case["scalars"]["config"], weights, arrays["input/tokens"])
tol = case["tolerance"]["logits"]
assert within_tolerance(logits, arrays["expected/logits"], tol["rtol"], tol["atol"])
assert not within_tolerance(logits + 1e-3, arrays["expected/logits"], tol["rtol"], tol["atol"])
print("decoder_gqa: logits", logits.shape, "match the vector")

# %% [markdown]
# ## 3. The cost of the partial backward
#
# Per layer the port computes two weight gradients: O's block `dyᵀ x[:, cols]`, a (C, N) by
# (N, n_heads·D) product, and Down's, (C, N) by (N, n_channels): N·C·(n_heads·D + n_channels)
# multiply-adds, L times. The sliced full gradient instead computes every weight's gradient:
# N·C·(H·D) for O and N·C·F for Down alone, plus Q, K, V, Gate, Up and the head.

# %%
def block_grad_madds(N, C, D, L, n_heads, n_channels):
    return L * N * C * (n_heads * D + n_channels)


print("GQA, one head and two channels per layer:", block_grad_madds(12, 8, 6, 2, 1, 2), "multiply-adds")


# %% [markdown]
# ## The answer for the tutorial's check cells

# %%
def pissa_init(W, r, alpha):
    s = alpha / r
    U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
    root = np.sqrt(sigma[:r] / s)  # divided by s, so that s · B A is the top-r part of W
    A, B = root[:, None] * Vt[:r], U[:, :r] * root
    return W - s * B @ A, A, B
