# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 12 · Checking your own implementation against the minift spec
#
# **What you will build.** A second, independent implementation of the low-rank methods (LoRA,
# PiSSA, SORSA) and of S2FT's co-permutation, written from NumPy alone straight from the formulas
# — the kind you would write in another framework — and the check that it is right: the minift
# *spec*, a set of Hypothesis properties that state the methods' mathematics ("merging does not
# change the output", "the regularizer is zero exactly for orthonormal factors", "block gradients
# equal the full gradient restricted to the block") over a small documented interface. You will
# run them against your implementation, watch them catch two plausible mistakes (a squared
# regularizer, a co-permutation that forgets O) with a shrunk counterexample, and use the exported
# test vectors, which need no Python at all.
#
# **Prerequisites.** Tutorials 06–07 (LoRA, PiSSA, SORSA); 08–09 for the S2FT properties.
#
# **Library functions explained here.** `minift.spec.interface.Implementation`,
# `minift.spec.properties.PROPERTIES`, `minift.spec.minift_impl.implementation`,
# `minift.spec.export.export_vectors`, and `minift.io.safetensors_io.read_safetensors` (to read the
# vectors).

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
# ## 1. The interface
#
# `minift.spec.interface.Implementation` lists the operations the properties are written against. Every
# argument is a float64 NumPy array; model weights use Hugging Face Llama names
# (`model.layers.0.self_attn.o_proj.weight`) in the `[out, in]` layout, so an implementation in
# PyTorch, JAX or C only needs a thin adapter. The properties, by name:

# %%
for name in PROPERTIES:
    print(" ", name)

# %% [markdown]
# ## 2. A second implementation, from the formulas
#
# Here is the low-rank part, written without minift: each method exactly as its paper states it.
# For the decoder and S2FT operations it delegates to minift's own implementation (writing a
# decoder is tutorials 01–04).

# %%
class MyLowRank:
    name = "my-low-rank"

    def __getattr__(self, op):  # decoder and S2FT operations: borrowed from minift
        return getattr(minift_impl, op)

    def lora_forward(self, x, W, A, B, scaling):
        return x @ W.T + scaling * (x @ A.T) @ B.T

    def lora_merge(self, W, A, B, scaling):
        return W + scaling * B @ A

    def lora_unmerge(self, W, A, B, scaling):
        return W - scaling * B @ A

    def pissa_init(self, W, r, alpha):
        s = alpha / r
        U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
        root = np.sqrt(sigma[:r] / s)
        A, B = root[:, None] * Vt[:r], U[:, :r] * root
        return W - s * B @ A, A, B

    def sorsa_split(self, W, r):
        U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
        B, S, A = U[:, :r], sigma[:r], Vt[:r]
        return W - (B * S) @ A, B, S, A

    def sorsa_forward(self, x, W_res, B, S, A):
        return x @ W_res.T + ((x @ A.T) * S) @ B.T

    def sorsa_merge(self, W_res, B, S, A):
        return W_res + (B * S) @ A

    def sorsa_regularizer(self, factors):
        terms, grads = [], []
        for A, B in factors:
            M, N = A @ A.T - np.eye(len(A)), B.T @ B - np.eye(B.shape[1])
            nm, nn = np.linalg.norm(M), np.linalg.norm(N)
            terms += [nm, nn]
            grads.append((2 * M @ A / nm if nm else 0 * A, 2 * B @ N / nn if nn else 0 * B))
        k = 2 * len(factors)
        return float(sum(terms) / k), [(gA / k, gB / k) for gA, gB in grads]


mine = MyLowRank()

# %% [markdown]
# ## 3. Run the properties against it
#
# Each property is a Hypothesis test `prop(impl)`: Hypothesis draws the shapes, seeds and scalings
# (each property also has one hand-picked `@example`), and a failure raises with the *shrunk*
# counterexample — the smallest input it could find that breaks the claim. The number of examples
# comes from the Hypothesis profile active when `minift.spec.properties` is first imported (100
# by default; load a profile before that import to change it). On the command line the same
# suite is
#
#     pytest --pyargs minift.spec --impl mypackage.adapter
#
# where `mypackage.adapter` exposes an `implementation` object.

# %%
low_rank = [n for n in PROPERTIES if n.startswith(("lora", "pissa", "sorsa"))]
for name in low_rank:
    PROPERTIES[name](mine)
    print("passed:", name)

# %% [markdown]
# ## 4. A plausible mistake, caught
#
# The SORSA paper writes its regularizer with Frobenius norms; squaring them is a natural slip (the
# squared norm is smoother and is what many regularizers use). The value and the gradient then
# change — and the spec says so, naming the input that broke it. Here the property's own
# hand-picked `@example` already fails; when only a generated input fails, Hypothesis first
# shrinks it to a minimal one.

# %%
class SquaredNorms(MyLowRank):
    def sorsa_regularizer(self, factors):
        terms, grads = [], []
        for A, B in factors:
            M, N = A @ A.T - np.eye(len(A)), B.T @ B - np.eye(B.shape[1])
            terms += [np.sum(M * M), np.sum(N * N)]
            grads.append((4 * M @ A, 4 * B @ N))
        k = 2 * len(factors)
        return float(sum(terms) / k), [(gA / k, gB / k) for gA, gB in grads]


try:
    PROPERTIES["sorsa_regularizer_is_the_mean_of_unsquared_frobenius_norms"](SquaredNorms())
    report = ""
except AssertionError as e:  # Hypothesis attaches the shrunk input as a note on the exception
    report = "\n".join([str(e), *getattr(e, "__notes__", [])])
print(report)
assert "regularizer" in report

# %% [markdown]
# Note what does *not* catch it: the squared version is also zero exactly for orthonormal
# factors, and a finite-difference check of its gradient against its *own* value would pass too.
# Only properties that state the definition — the value, and the gradient of the defined value —
# tell the two apart, which is why the spec states definitions and not just invariants.

# %%
PROPERTIES["sorsa_regularizer_is_zero_exactly_for_orthonormal_factors"](SquaredNorms())
print("the squared regularizer passes the zero-at-orthonormal property: invariants alone are not enough")

# %% [markdown]
# ## 5. S2FT's co-permutation, from NumPy alone
#
# The spec speaks the format of checkpoints: weights are a dict of Hugging Face Llama keys
# (`model.layers.0.self_attn.o_proj.weight`, …) in PyTorch's `[out, in]` layout, and a
# **selection** is a dict `{layer index: [ids]}` — one for the query heads (0 … H−1) and one for
# the FFN channels (0 … F−1), both numbered as in the unmodified checkpoint. Those numbers are the
# **original coordinates**: `copermute` reorders the rows and columns of a layer's matrices so
# that the selected heads and channels sit at the front, and `unpermute` puts every number back
# where the checkpoint had it.
#
# What must move together (tutorial 08): query head h is rows h·D … (h+1)·D−1 of Q and the same
# *columns* of O; key/value head g is the same rows of K and V, and serves the G = H/K query heads
# g·G … (g+1)·G−1, so under grouped-query attention whole groups move and the query heads stay
# with their group; FFN channel j is row j of Gate and Up and column j of Down. Here is a port
# that does exactly that (the decoder, S2FT's partial backward and its gradients still come from
# minift via `MyLowRank`: writing a decoder backward is tutorial 04).

# %%
def head_rows(order, D):
    """Row (or column) indices of the heads in `order`, each a block of D."""
    return np.concatenate([np.arange(h * D, (h + 1) * D) for h in order])


def layer_orders(config, heads, channels):
    """The new order of the KV groups, of the query heads and of the FFN channels of one layer, in
    the spec's documented minimal layout: groups partial₀, full…, partial₁, partial₂, …, empty…, the
    selected heads last inside partial₀, partial₂, … and first inside the others, so that they form
    ⌈p/2⌉ runs for p partially selected groups; the selected channels first."""
    H, K, F = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    G = H // K
    chosen = set(heads)
    members = {g: list(range(g * G, (g + 1) * G)) for g in range(K)}
    picked = {g: [h for h in members[g] if h in chosen] for g in range(K)}
    partial = [g for g in range(K) if 0 < len(picked[g]) < G]
    full = [g for g in range(K) if len(picked[g]) == G]
    groups = partial[:1] + full + partial[1:] + [g for g in range(K) if not picked[g]]
    head_order = []
    for g in groups:
        rest = [h for h in members[g] if h not in chosen]
        last = g in partial and partial.index(g) % 2 == 0  # partial₀, partial₂, …: selected heads last
        head_order += rest + picked[g] if last else picked[g] + rest
    channel_order = list(channels) + [j for j in range(F) if j not in set(channels)]
    return groups, head_order, channel_order


class MyS2FT(MyLowRank):
    name = "my-s2ft"

    def copermute(self, config, weights, heads, channels):
        D = config["head_dim"]
        out, state = dict(weights), {}
        for i in heads:
            groups, head_order, channel_order = layer_orders(config, heads[i], channels[i])
            q_idx, kv_idx = head_rows(head_order, D), head_rows(groups, D)
            p = f"model.layers.{i}"
            rows = {"self_attn.q_proj": q_idx, "self_attn.k_proj": kv_idx, "self_attn.v_proj": kv_idx,
                    "mlp.gate_proj": channel_order, "mlp.up_proj": channel_order}
            for module, idx in rows.items():  # output rows move, and the biases that sit on them
                for part in ("weight", "bias"):
                    if f"{p}.{module}.{part}" in weights:
                        out[f"{p}.{module}.{part}"] = weights[f"{p}.{module}.{part}"][idx]
            out[f"{p}.self_attn.o_proj.weight"] = weights[f"{p}.self_attn.o_proj.weight"][:, q_idx]
            out[f"{p}.mlp.down_proj.weight"] = weights[f"{p}.mlp.down_proj.weight"][:, channel_order]
            state[i] = (q_idx, kv_idx, np.array(channel_order))
        return out, state

    def unpermute(self, config, weights, state):
        out = dict(weights)
        for i, (q_idx, kv_idx, ch_idx) in state.items():
            p = f"model.layers.{i}"
            moved = [(f"{p}.{m}.{part}", idx, 0) for m, idx in (("self_attn.q_proj", q_idx),
                     ("self_attn.k_proj", kv_idx), ("self_attn.v_proj", kv_idx), ("mlp.gate_proj", ch_idx),
                     ("mlp.up_proj", ch_idx)) for part in ("weight", "bias")]
            moved += [(f"{p}.self_attn.o_proj.weight", q_idx, 1), (f"{p}.mlp.down_proj.weight", ch_idx, 1)]
            for key, idx, axis in moved:
                if key not in weights:
                    continue
                restored = np.empty_like(weights[key])
                if axis == 0:
                    restored[idx] = weights[key]  # the row that moved to position n goes back to idx[n]
                else:
                    restored[:, idx] = weights[key]
                out[key] = restored
        return out


copermute_props = [n for n in PROPERTIES if "permut" in n]  # the three co-permutation properties
assert len(copermute_props) == 3
for name in copermute_props:
    PROPERTIES[name](MyS2FT())
    print("passed:", name)

# %% [markdown]
# A realistic slip: moving the heads' rows of Q, K and V but forgetting that O *reads* the heads,
# so its columns must move too. Every matrix still has the right shape and `unpermute` still
# inverts `copermute` exactly — but the model now computes a different function, and the spec
# says so:

# %%
class ForgotO(MyS2FT):
    def copermute(self, config, weights, heads, channels):
        out, state = super().copermute(config, weights, heads, channels)
        for i in heads:
            key = f"model.layers.{i}.self_attn.o_proj.weight"
            out[key] = weights[key]  # O left in the original order
        return out, state


try:
    PROPERTIES["copermuting_heads_and_channels_leaves_the_logits_unchanged"](ForgotO())
    report = ""
except AssertionError as e:
    report = "\n".join([str(e), *getattr(e, "__notes__", [])])
print(report)
assert "logits of the co-permuted model" in report

# %% [markdown]
# ## 6. Test vectors for any language
#
# `export_vectors(folder)` (also `minift spec export DIR`) writes each canonical case as
# `arrays.safetensors` (float64 inputs and expected outputs) plus `case.json` (the property, the
# call, the scalars, and each output's tolerance: |actual − expected| ≤ atol + rtol·|expected|).
# Checking an implementation against them needs only a safetensors reader. Here, the LoRA and
# SORSA-split cases against `MyLowRank`:

# %%
folders = export_vectors(work / "spec-vectors")
print(sorted(f.name for f in folders))


def check(case, name, actual):
    tol = case["tolerance"][name]
    np.testing.assert_allclose(actual, arrays[f"expected/{name}"], rtol=tol["rtol"], atol=tol["atol"])


case = json.loads((work / "spec-vectors/lora/case.json").read_text())
arrays, _ = read_safetensors(work / "spec-vectors/lora/arrays.safetensors")
inp = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("input/")}
s = case["scalars"]["scaling"]
check(case, "y", mine.lora_forward(inp["x"], inp["W"], inp["A"], inp["B"], s))
check(case, "merged", mine.lora_merge(inp["W"], inp["A"], inp["B"], s))

case = json.loads((work / "spec-vectors/sorsa_split/case.json").read_text())
arrays, _ = read_safetensors(work / "spec-vectors/sorsa_split/arrays.safetensors")
W_res, B, S, A = mine.sorsa_split(arrays["input/W"], case["scalars"]["r"])
check(case, "W_res", W_res)
check(case, "S", S)
# singular vectors are unique up to sign: the vectors give the sign-free product B diag(S) A
check(case, "BSA", B @ np.diag(S) @ A)
print("my implementation matches the exported vectors of", case["name"], "and lora")

# %% [markdown]
# ## Summary
#
# * The spec is a list of properties over a small interface of float64 arrays with Hugging Face
#   names; any implementation can plug in with an adapter.
# * Hypothesis explores shapes and seeds and shrinks failures to minimal counterexamples.
# * State definitions as well as invariants: a squared regularizer satisfies the invariants and
#   fails the definition.
# * Exported vectors (safetensors + JSON) check implementations outside Python.
#
# ## Exercises
#
# 1. **Another slip.** Write a PiSSA that forgets to divide σ by the scaling (A = diag(√σ) Vᵀ,
#    B = U diag(√σ)) and find which property catches it, and for which `alpha`.
# 2. **The S2FT properties.** Run the co-permutation and block-gradient properties against
#    minift's own implementation and time them. What do their configurations cover (MHA, GQA)?
# 3. **The decoder case.** Load `spec-vectors/decoder_gqa` and check minift's `decoder_logits`
#    against the expected logits using only the arrays and `case.json`.
#
# Solutions: `tutorials/solutions/12_checking_your_implementation.py`.

# %% [markdown]
# ### Check cell
#
# Write your answer in the function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same function.)

# %%
def pissa_init(W, r, alpha):
    """Exercise 1: PiSSA's initialisation as the interface states it, (W_res, A, B), with scaling
    s = alpha / r — written correctly, so that the spec's PiSSA properties pass."""
    return None  # your code here


def check_pissa_init(pissa_init):
    if pissa_init(np.eye(2), 1, 1.0) is None:
        print("exercise 1: not answered yet")
        return

    class Yours(MyLowRank):
        def pissa_init(self, W, r, alpha):
            return pissa_init(W, r, alpha)

    for name in PROPERTIES:
        if name.startswith("pissa"):
            PROPERTIES[name](Yours())
    print("exercise 1: correct")


check_pissa_init(pissa_init)
