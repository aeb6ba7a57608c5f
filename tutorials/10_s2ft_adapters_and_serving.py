# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 10 · S2FT III: adapters — extract, merge, switch, fuse, and serve many at once
#
# **What you will build.** After S2FT training, `ΔW = W_ft − W_pre` is non-zero only on the
# selected columns, so it can be stored as *(original column indices, dense block)* — a decoupled
# adapter (paper Sec. 6.2). You will train two adapters for two tasks on one base model, extract
# them, save and reload them, merge one into the base and switch to the other with two
# scatter-adds, fuse them, and finally serve a batch in which every request uses its own adapter
# (or none) while the base weights stay shared and untouched — checking at each step that the
# result equals the "obvious" merged model.
#
# **Prerequisites.** Tutorials 08 and 09 (S2FT selection, co-permutation, training).
#
# **Library functions explained here.** `minift.methods.s2ft.extract_adapter`,
# `minift.methods.s2ft.save_adapter`, `minift.methods.s2ft.load_adapter`,
# `minift.methods.s2ft.unpermute`, `minift.methods.s2ft.S2FTAdapter`,
# `minift.serving.merge_adapter`, `minift.serving.unmerge_adapter`,
# `minift.serving.switch_adapter`, `minift.serving.snapshot`, `minift.serving.restore`,
# `minift.serving.fuse_adapters`, `minift.serving.batched_forward`, `minift.serving.LoraFactors`.

# %%
import atexit
import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minift import ModelConfig, init_model, model_forward, trainable_parameters
from minift.data import Batch
from minift.errors import CheckpointError
from minift.layers.cross_entropy import cross_entropy_forward
from minift.methods.lora import LoRAConfig, apply_lora, low_rank_slots
from minift.methods.s2ft import (
    AdapterBlock,
    S2FTAdapter,
    S2FTConfig,
    apply_s2ft,
    extract_adapter,
    load_adapter,
    save_adapter,
    unpermute,
)
from minift.optim import AdamW
from minift.serving import (
    LoraFactors,
    batched_forward,
    fuse_adapters,
    merge_adapter,
    restore,
    snapshot,
    switch_adapter,
    unmerge_adapter,
)
from minift.testing import assert_close
from minift.train import train_step

# Every file this tutorial writes goes into a scratch folder that is deleted when Python exits:
# the tutorial can be rerun, from any folder, and leaves the checkout as it found it.
work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)

config = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4,
                     n_kv_heads=2)
base = init_model(config, np.random.default_rng(0), dtype=np.float64, std=0.2)

# %% [markdown]
# ## 1. Two tasks, two adapters
#
# Each "task" is one sequence to memorise. Each adapter gets its own random selection of heads
# and channels (a different seed), trained with the usual step.

# %%
tasks = {
    "A": np.array([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37]]),
    "B": np.array([[2, 4, 8, 16, 32, 3, 6, 12, 24, 7]]),
}


def task_loss(model, seq):
    """Mean next-token loss of the sequence (inference only)."""
    logits, _ = model_forward(model, seq[:, :-1], train=False)
    return cross_entropy_forward(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))[0]


def train_adapter(seq, seed, steps=60):
    model = apply_s2ft(copy.deepcopy(base), S2FTConfig(heads=1, channels=8),
                       rng=np.random.default_rng(seed))
    opt = AdamW(trainable_parameters(model))
    batch = Batch(seq[:, :-1], seq[:, 1:], np.ones_like(seq[:, :-1]))
    for _ in range(steps):
        train_step(model, opt, [batch], 3e-2)
    return model


trained = {"A": train_adapter(tasks["A"], seed=1), "B": train_adapter(tasks["B"], seed=2)}
for name, model in trained.items():
    before, after = task_loss(base, tasks[name]), task_loss(model, tasks[name])
    print(f"adapter {name}: task loss {before:.3f} (base) → {after:.3f}")

# %% [markdown]
# ## 2. Extract: the update as (indices, block)
#
# `extract_adapter` subtracts each block's value at `apply_s2ft` time (kept in the slot as
# `reference`) and maps the permuted positions back to **original** column indices, so the adapter
# applies to the base model as distributed — not to the permuted copy it was trained in.

# %%
adapters = {name: extract_adapter(model) for name, model in trained.items()}
ad = adapters["A"]
for key, blk in list(ad.blocks.items())[:2]:
    print(f"{key}: {blk.axis} {blk.indices.tolist()} of a {blk.shape} weight, delta {blk.delta.shape}")
adapter_numbers = sum(b.delta.size for b in ad.blocks.values())
model_numbers = sum(s.weight.size for blk in base.blocks for _, s in blk.slots())
print(f"the adapter stores {adapter_numbers} numbers, {100 * adapter_numbers / model_numbers:.1f}% "
      "of the block weights")

# %% [markdown]
# Undoing the permutation of the trained model (`unpermute`) gives the fine-tuned model in the
# original layout; merging the adapter into a fresh copy of the base must give the same weights:

# %%
merged_by_training = unpermute(copy.deepcopy(trained["A"]))
merged_by_adapter = copy.deepcopy(base)
merge_adapter(merged_by_adapter, ad)
for b0, b1 in zip(merged_by_training.blocks, merged_by_adapter.blocks, strict=True):
    for (name, s0), (_, s1) in zip(b0.slots(), b1.slots(), strict=True):
        assert_close(s1.weight, s0.weight, rtol=1e-12, atol=1e-14, what=name)
print("base + adapter = the unpermuted fine-tuned model")

# %% [markdown]
# On disk an adapter is `adapter.safetensors` (indices and deltas) plus `adapter.json` (axes,
# shapes, and the model signature it belongs to) — no pickle. Loading it onto a model of another
# shape fails with a `CheckpointError` that says why.

# %%
save_adapter(ad, work / "adapter_A")
print(sorted(p.name for p in (work / "adapter_A").iterdir()))
reloaded = load_adapter(work / "adapter_A")
for key in ad.blocks:
    assert np.array_equal(reloaded.blocks[key].delta, ad.blocks[key].delta)
other = init_model(config.replace(intermediate_size=48), np.random.default_rng(0))
try:
    merge_adapter(other, reloaded)
    message = ""
except CheckpointError as e:
    message = str(e)
print("CheckpointError:", message)
assert "intermediate_size" in message

# %% [markdown]
# ## 3. Merge, unmerge, switch
#
# Merging is a scatter-add of the block into W (`W[:, S] += Δ`), unmerging subtracts it, and
# switching from A to B is both: 2·S·O additions per matrix instead of rewriting the model.
# `(W + Δ) − Δ` equals W only up to one rounding per entry; where bit-identity matters, `snapshot`
# saves the touched columns before the merge and `restore` writes them back.

# %%
served = copy.deepcopy(base)
saved = {k: snapshot(served, adapters[k]) for k in "AB"}  # the base's columns either adapter touches
merge_adapter(served, adapters["A"])
assert_close(model_forward(served, tasks["A"], train=False)[0],
             model_forward(merged_by_training, tasks["A"], train=False)[0], rtol=1e-10, atol=1e-12,
             what="merged A")
switch_adapter(served, adapters["A"], adapters["B"])
only_b = copy.deepcopy(base)
merge_adapter(only_b, adapters["B"])
assert_close(model_forward(served, tasks["B"], train=False)[0],
             model_forward(only_b, tasks["B"], train=False)[0], rtol=1e-10, atol=1e-12, what="A → B")
unmerge_adapter(served, adapters["B"])  # the base again, up to one rounding per touched entry
for k in "AB":
    restore(served, adapters[k], saved[k])  # … and now bit for bit
for b0, b1 in zip(base.blocks, served.blocks, strict=True):
    for (_, s0), (_, s1) in zip(b0.slots(), b1.slots(), strict=True):
        assert np.array_equal(s0.weight, s1.weight)
print("merge A → switch to B → unmerge → restore: the base weights, bit-identical")

# %% [markdown]
# ## 4. Fusing adapters
#
# `fuse_adapters([A, B], [λ_A, λ_B])` is one adapter with `ΔW = λ_A ΔW_A + λ_B ΔW_B`: per matrix,
# the union of the two index sets, with overlapping columns summed. Whether the fused model still
# solves both tasks depends on how much the updates interfere; the algebra is exact either way.

# %%
fused = fuse_adapters([adapters["A"], adapters["B"]], [1.0, 1.0])
key = "blocks.0.down"
print(f"{key}: A trains {adapters['A'].blocks[key].indices.tolist()}, "
      f"B trains {adapters['B'].blocks[key].indices.tolist()}, fused covers "
      f"{fused.blocks[key].indices.tolist()}")
both, one_then_other = copy.deepcopy(base), copy.deepcopy(base)
merge_adapter(both, fused)
merge_adapter(one_then_other, adapters["A"])
merge_adapter(one_then_other, adapters["B"])
assert_close(model_forward(both, tasks["A"], train=False)[0],
             model_forward(one_then_other, tasks["A"], train=False)[0], rtol=1e-10, atol=1e-12,
             what="fused = A + B")
for name in "AB":
    print(f"task {name}: fused model loss {task_loss(both, tasks[name]):.3f}")

# %% [markdown]
# ## 5. Serving a batch of requests, each with its own adapter
#
# A server that keeps one merged model per adapter multiplies memory by the number of adapters.
# Instead, keep W shared and add each request group's update on the fly: for an S2FT column
# adapter, `y = x Wᵀ + x[:, S] Δᵀ` — a gather and one small matmul. LoRA adapters (the baseline)
# add `s (x Aᵀ) Bᵀ` the same way. `batched_forward(base, tokens, adapters, assignment)` does this
# per slot; `assignment[b]` is request b's adapter index (−1 = the base model).
#
# Add a LoRA adapter trained on task A as a third kind of request:

# %%
lora = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, alpha=4.0, targets=("q", "v", "down")),
                  rng=np.random.default_rng(5))
opt = AdamW(trainable_parameters(lora))
seq = tasks["A"]
for _ in range(60):
    train_step(lora, opt, [Batch(seq[:, :-1], seq[:, 1:], np.ones_like(seq[:, :-1]))], 3e-2)
lora_adapter = {path: LoraFactors(s.A, s.B, s.scaling) for path, s in low_rank_slots(lora)}

requests = np.concatenate([tasks["A"], tasks["B"], tasks["B"], tasks["A"]])[:, :-1]  # (4, T)
assignment = [0, 1, -1, 2]  # A, B, base, LoRA
logits = batched_forward(base, requests, [adapters["A"], adapters["B"], lora_adapter], assignment)

expected_models = [merged_by_adapter, only_b, base]
for b, k in enumerate(assignment):
    if k == 2:
        reference, _ = model_forward(lora, requests[b : b + 1], train=False)
    else:
        reference, _ = model_forward(expected_models[k], requests[b : b + 1], train=False)
    assert_close(logits[b : b + 1], reference, rtol=1e-10, atol=1e-12, what=f"request {b}")
print("4 requests, 3 adapters + the base, one forward: each equals its own merged model")
# the shared base was not modified: it still equals the restored copy from section 3, bit for bit
assert all(np.array_equal(s0.weight, s1.weight) for b0, b1 in zip(base.blocks, served.blocks, strict=True)
           for (_, s0), (_, s1) in zip(b0.slots(), b1.slots(), strict=True))

# %% [markdown]
# ## Summary
#
# * An S2FT update is (original indices, dense block): extracted exactly, stored as
#   safetensors + JSON, checked against the model it is applied to.
# * Merge / unmerge / switch are scatter-adds of block size; `snapshot`/`restore` make the
#   round trip bitwise.
# * Fusing sums updates over the union of index sets; batched serving applies each request's
#   update on the fly with a gather and a small matmul, LoRA adapters alongside.
#
# ## Exercises
#
# 1. **Cost of a switch.** Count the floating-point additions `switch_adapter` performs for the
#    S2FT adapters above, and the multiply-adds a LoRA switch (`W ± s B A` for every adapted
#    matrix) would need.
# 2. **Weighted fusion.** Fuse A and B with weights (0.5, 0.5) and with (1, 0); check that the
#    second equals A alone. Then write the fusion of column blocks yourself: given blocks
#    (indices, Δ) and weights λ, the fused block on the union of the indices, with λ_A Δ_A + λ_B Δ_B
#    where indices are shared. (Train a second adapter for task A with the *same* seed as the
#    first, so the same columns, to see the shared case on a model.)
# 3. **Merging by hand.** Write `merge_adapter`'s work on one weight: W plus an S2FT column block
#    (indices in original coordinates, Δ of shape (O, S)).
#
# Solutions: `tutorials/solutions/10_s2ft_adapters_and_serving.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def switch_additions(old, new):
    """Exercise 1: how many floating-point additions an S2FT switch from adapter `old` to adapter
    `new` performs on the served weights (both are `S2FTAdapter`s)."""
    return None  # your code here


def check_switch_additions(switch_additions):
    a, b = adapters["A"], adapters["B"]
    if switch_additions(a, b) is None:
        print("exercise 1: not answered yet")
        return
    # count them: the entries the switch writes, once to take `old` out and once to put `new` in
    w = copy.deepcopy(base)
    merge_adapter(w, a)
    before = {k: np.array(v) for k, v in _weights(w).items()}
    unmerge_adapter(w, a)
    out = sum(int((_weights(w)[k] != before[k]).sum()) for k in before)
    merge_adapter(w, b)
    assert switch_additions(a, b) == out + sum(blk.delta.size for blk in b.blocks.values())
    print("exercise 1: correct")


def _weights(model):
    return {f"{i}.{n}": s.weight for i, blk in enumerate(model.blocks) for n, s in blk.slots()}


check_switch_additions(switch_additions)


# %%
def fuse_columns(blocks, weights):
    """Exercise 2: fuse column blocks [(indices (S_k,), delta (O, S_k)), …] with weights λ_k into one
    (indices, delta): the union of the indices, ascending, and Σ_k λ_k Δ_k on it."""
    return None  # your code here


def check_fuse_columns(fuse_columns):
    if fuse_columns([(np.array([0]), np.ones((2, 1)))], [1.0]) is None:
        print("exercise 2: not answered yet")
        return
    r = np.random.default_rng(3)
    cases = (([1, 4], [0, 6], (1.0, 1.0)), ([2, 5, 7], [5, 7], (0.5, 2.0)), ([3], [3], (1.0, -1.0)))
    for ia, ib, lam in cases:
        da, db = r.standard_normal((4, len(ia))), r.standard_normal((4, len(ib)))
        adapters_ = [S2FTAdapter({"blocks.0.o": AdapterBlock("columns", np.array(i), d, (4, 8))})
                     for i, d in ((ia, da), (ib, db))]
        expected = fuse_adapters(adapters_, list(lam)).blocks["blocks.0.o"]
        idx, delta = fuse_columns([(np.array(ia), da), (np.array(ib), db)], list(lam))
        assert list(np.asarray(idx)) == expected.indices.tolist(), f"indices {list(idx)} for {ia} and {ib}"
        assert_close(np.asarray(delta), expected.delta, rtol=1e-12, atol=1e-14, what=f"Δ for {ia} and {ib}")
    print("exercise 2: correct")


check_fuse_columns(fuse_columns)


# %%
def merge_columns(W, indices, delta):
    """Exercise 3: a new array, W (O, I) with the S2FT column block (indices (S,), delta (O, S))
    added; W itself unchanged."""
    return None  # your code here


def check_merge_columns(merge_columns):
    if merge_columns(np.zeros((1, 2)), np.array([1]), np.ones((1, 1))) is None:
        print("exercise 3: not answered yet")
        return
    key = "blocks.1.down"
    blk = adapters["B"].blocks[key]
    W0 = base.blocks[1].down.weight.copy()
    got = np.asarray(merge_columns(W0, blk.indices, blk.delta))
    assert np.array_equal(W0, base.blocks[1].down.weight), "W must not be modified"
    expected = copy.deepcopy(base)
    merge_adapter(expected, S2FTAdapter({key: blk}, adapters["B"].signature))
    assert_close(got, expected.blocks[1].down.weight, rtol=1e-12, atol=1e-14, what=key)
    print("exercise 3: correct")


check_merge_columns(merge_columns)
