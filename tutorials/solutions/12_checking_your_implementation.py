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
import time
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
# ## 2. The S2FT properties
#
# Most draw their configurations from the `llama_configs` strategy of `minift.spec.properties`: H of 2
# or 4 query heads with K of 1, 2 or 4 key/value heads (MHA, GQA and multi-query), head_dim equal
# to C / H or not, and random selections of heads and channels per layer.

# %%
times = {}
for name in [n for n in PROPERTIES if "permut" in n or "s2ft" in n]:
    t0 = time.perf_counter()
    PROPERTIES[name](minift_impl)
    times[name] = time.perf_counter() - t0
    print(f"{times[name]:6.2f} s  {name}")
assert len(times) == 4

# %% [markdown]
# ## 3. The decoder vector

# %%
export_vectors(work / "vectors")
case = json.loads((work / "vectors/decoder_gqa/case.json").read_text())
arrays, _ = read_safetensors(work / "vectors/decoder_gqa/arrays.safetensors")
weights = {k.removeprefix("input/weight/"): v for k, v in arrays.items() if k.startswith("input/weight/")}
logits = minift_impl.decoder_logits(case["scalars"]["config"], weights, arrays["input/tokens"])
tol = case["tolerance"]["logits"]
np.testing.assert_allclose(logits, arrays["expected/logits"], rtol=tol["rtol"], atol=tol["atol"])
print("decoder_gqa: logits", logits.shape, "match the vector")


# %% [markdown]
# ## The answer for the tutorial's check cell

# %%
def pissa_init(W, r, alpha):
    s = alpha / r
    U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
    root = np.sqrt(sigma[:r] / s)  # divided by s, so that s · B A is the top-r part of W
    A, B = root[:, None] * Vt[:r], U[:, :r] * root
    return W - s * B @ A, A, B
