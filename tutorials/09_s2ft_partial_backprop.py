# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 09 · S2FT II: partial backpropagation — what is kept, what is computed, what it costs
#
# **What you will build.** After co-permutation (tutorial 08) the trainable part of O and Down is
# a contiguous column block `W[:, a:b]`. Here you will see what that buys during training: the slot
# keeps only the N×S slice of its input that the block's gradient needs, computes `dW` for the block
# only, and AdamW keeps state for the block only — all while the gradient it computes is *exactly*
# the full gradient restricted to the block. Then you will measure memory, FLOPs and time of a
# training step against full fine-tuning and LoRA at the same number of trainable parameters.
#
# **Prerequisites.** Tutorials 01 (`dW = dyᵀ x`, column blocks), 04 (memory of a step), 06 (LoRA),
# 08 (S2FT selection and co-permutation).
#
# **Library functions explained here.** `minift.methods.s2ft.ColumnBlock`,
# `minift.methods.s2ft.RowBlock`, `minift.methods.s2ft.apply_s2ft`,
# `minift.methods.s2ft.match_lora_budget`, `minift.tools.measure.step_memory`,
# `minift.tools.measure.step_flops`, `minift.tools.measure.time_step`, `minift.train.train_step`,
# `minift.tools.measure.memory_breakdown`.

# %%
import copy
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from minift import ModelConfig, init_model, loss_and_grads, set_trainable, trainable_parameters
from minift.data import Batch
from minift.methods.lora import LoRAConfig, apply_lora
from minift.methods.s2ft import ColumnBlock, RowBlock, S2FTConfig, apply_s2ft, match_lora_budget
from minift.optim import AdamW
from minift.slots import Dense
from minift.testing import assert_close
from minift.tools.measure import step_flops, step_memory, time_step
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
# ## 1. The column-block slot
#
# For `y = x Wᵀ`, with x (N, I) — N tokens, I inputs — and W (O, I), the weight gradient is
# `dW = dyᵀ x`, so its columns a:b, S = b − a of them, are `dyᵀ x[:, a:b]` (tutorial 01). A
# `ColumnBlock` therefore keeps a contiguous copy of `x[:, a:b]` — N·S numbers instead of N·I — and
# returns that block's gradient. It still returns the full `dx = dy W`, because the layers below
# need it. A frozen dense slot keeps nothing at all.
#
# Two arguments below need a word. `ColumnBlock(W, segments, reference)`: `segments` are the
# (start, end) column ranges that train (here columns 0:3), and `reference` is a copy of those
# columns as they were before training, from which the adapter ΔW = W[:, 0:3] − reference is
# extracted later (tutorial 10). Every slot's `forward(x, keep=…)` returns y and what the backward
# will need: `keep=True` in training, `keep=False` in inference, where nothing is kept.

# %%
N, I, O = 6, 10, 5
W = rng.standard_normal((O, I))
slot = ColumnBlock(W.copy(), segments=((0, 3),), reference=W[:, :3].copy())
x = rng.standard_normal((N, I))
y, kept = slot.forward(x, keep=True)
print("kept for the backward:", [a.shape for a in kept], "instead of", x.shape)
dy = rng.standard_normal((N, O))
dx, grads = slot.backward(dy, kept)
assert_close(grads["weight"], (dy.T @ x)[:, :3], rtol=1e-13, what="block of dW")
assert_close(dx, dy @ W, rtol=1e-13, what="dx")
assert np.shares_memory(slot.parameters()["weight"], slot.weight)  # the parameter is a view

# %% [markdown]
# Both block rules, written by hand from `dW = dyᵀ x` (an (O, N) by (N, I) product):
#
# * **column block** (O and Down train input columns a:b): column j of dW is `dyᵀ x[:, j]`, so the
#   block is `dyᵀ x[:, a:b]` — it needs only those S columns of x, which is all the slot keeps;
# * **row block** (V and Up train output rows a:b): row j of dW is `dy[:, j]ᵀ x`, so the block is
#   `dy[:, a:b]ᵀ x` — it needs only S columns of dy, but *every* column of x: a `RowBlock` keeps
#   the whole input.
#
# Each is checked against the library's slot, which computes the same block and keeps what the
# rule needs:

# %%
def column_block_grad(dy, x_cols):
    """dW[:, a:b] from the kept columns x[:, a:b] (N, S)."""
    return dy.T @ x_cols


def row_block_grad(dy, x, a, b):
    """dW[a:b, :] from the whole x (N, I): rows a:b of dW see only columns a:b of dy."""
    return dy[:, a:b].T @ x


(x_cols,) = kept
assert_close(column_block_grad(dy, x_cols), grads["weight"], rtol=1e-13, what="column block by hand")
rows_slot = RowBlock(W.copy(), segments=((1, 4),), reference=W[1:4].copy())
_, kept_x = rows_slot.forward(x, keep=True)
_, row_grads = rows_slot.backward(dy, kept_x)
assert_close(row_block_grad(dy, x, 1, 4), row_grads["weight"], rtol=1e-13, what="row block by hand")
print("column block keeps", x_cols.shape, "; row block keeps", kept_x.shape,
      "; both blocks by hand = the library's")

# %% [markdown]
# ## 2. Exactness on a whole model
#
# Apply S2FT to a float64 model. Build a twin of the *co-permuted* model in which O and Down are
# ordinary fully trainable dense slots, and compare: every block gradient S2FT returns must equal
# the corresponding columns of the full gradient — partial backpropagation skips work, never
# changes the result.

# %%
config = ModelConfig(vocab_size=48, hidden_size=24, intermediate_size=40, n_layers=3, n_heads=6,
                     n_kv_heads=2)
base64 = init_model(config, rng, dtype=np.float64, std=0.3)
tokens = rng.integers(0, 48, size=(2, 9))
x_in, y_out = tokens[:, :-1], tokens[:, 1:]

s2 = apply_s2ft(copy.deepcopy(base64), S2FTConfig(heads=2, channels=5), rng=np.random.default_rng(3))
twin = copy.deepcopy(s2)
for block in twin.blocks:
    for name in ("o", "down"):
        blk_slot = getattr(block, name)
        setattr(block, name, Dense(blk_slot.weight, blk_slot.bias, requires_grad=True))

_, g_s2 = loss_and_grads(s2, x_in, y_out)
_, g_full = loss_and_grads(twin, x_in, y_out)
for i, block in enumerate(s2.blocks):
    for name in ("o", "down"):
        (a, b), = getattr(block, name).segments
        assert_close(g_s2[f"blocks.{i}.{name}.weight"], g_full[f"blocks.{i}.{name}.weight"][:, a:b],
                     rtol=1e-10, atol=1e-14, what=f"blocks.{i}.{name}")
print("every S2FT block gradient = the full gradient's columns, for", len(g_s2), "blocks")

# %% [markdown]
# And training touches nothing outside the blocks: AdamW updates the views in place, so after any
# number of steps every other entry of W is **bitwise** what it was.

# %%
before = {i: (b.o.weight.copy(), b.down.weight.copy()) for i, b in enumerate(s2.blocks)}
opt = AdamW(trainable_parameters(s2))
batch = Batch(x_in, y_out, np.ones_like(x_in))
for _ in range(5):
    train_step(s2, opt, [batch], 1e-2)
for i, block in enumerate(s2.blocks):
    for w_old, slot_now in zip(before[i], (block.o, block.down), strict=True):
        (a, b), = slot_now.segments
        outside = np.ones(w_old.shape[1], dtype=bool)
        outside[a:b] = False
        assert np.array_equal(slot_now.weight[:, outside], w_old[:, outside])
        assert not np.array_equal(slot_now.weight[:, a:b], w_old[:, a:b])
print("outside the blocks: bit-identical after 5 AdamW steps; inside: trained")

# %% [markdown]
# ## 3. The cost table
#
# Per slot on N tokens, with S selected columns of an (O, I) weight (2 FLOPs per multiply-add):
#
# | | full FT | S2FT column block | frozen |
# |---|---|---|---|
# | forward | 2·N·I·O | 2·N·I·O | 2·N·I·O |
# | dx | 2·N·I·O | 2·N·I·O | 2·N·I·O |
# | dW | 2·N·I·O | 2·N·S·O | 0 |
# | activation kept | N·I | N·S | 0 |
# | gradient + Adam m, v | 3·I·O | 3·S·O | 0 |
#
# So a training step's backward falls from about 2× the forward to about 1×, and the memory for
# activations, gradients and optimizer state shrinks with S. LoRA, for comparison, keeps the full
# input x of every adapted slot (for `dA = dhᵀ x`) and computes the frozen `dx` too.
#
# ## 4. Measured: full FT, LoRA and S2FT at the same budget
#
# A float32 model large enough for the differences to show, and LoRA rank 4 on q, k, v, up, down;
# `match_lora_budget` gives S2FT the same number of trainable parameters (heads on O, channels on
# Down, half each).

# %%
big = ModelConfig(vocab_size=256, hidden_size=96, intermediate_size=256, n_layers=4, n_heads=6,
                  n_kv_heads=3)
base = init_model(big, np.random.default_rng(1))
tok = np.random.default_rng(2).integers(0, 256, size=(4, 33))
batch = Batch(tok[:, :-1], tok[:, 1:], np.ones_like(tok[:, :-1]))
budget = match_lora_budget(big, rank=4)
models = {
    "full FT": set_trainable(copy.deepcopy(base)),
    "LoRA r=4": apply_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0,
                                                           targets=("q", "k", "v", "up", "down"))),
    "S2FT": apply_s2ft(copy.deepcopy(base), budget, rng=np.random.default_rng(0)),
}
print(f"S2FT: {budget.heads} heads + {budget.channels} channels per layer")
# (time_step times 2 steps after a warm-up: enough for a lesson; `minift bench` does it properly)
results = {}
for name, model in models.items():
    n_params = sum(p.size for p in trainable_parameters(model).values())
    mem = step_memory(model, [batch])
    flops = step_flops(model, *batch.tokens.shape)
    timing = time_step(model, [batch], repeats=2)
    results[name] = (n_params, mem, flops, timing)
    print(f"{name:>9}: {n_params:>7} trainable | step peak {mem.step_peak_bytes / 2**20:5.2f} MiB, "
          f"optimizer {mem.optimizer_bytes / 2**20:5.2f} MiB | FLOPs fwd {flops.forward / 1e6:5.0f}M "
          f"bwd {flops.backward / 1e6:5.0f}M | {timing.median_s * 1e3:6.1f} ms/step")

# %% [markdown]
# The memory and FLOP numbers are deterministic, so the claims can be asserted; the times depend
# on the machine and on what else runs, so they are printed, not asserted:

# %%
full_r, lora_r, s2_r = results["full FT"], results["LoRA r=4"], results["S2FT"]
assert abs(s2_r[0] - lora_r[0]) / lora_r[0] < 0.15  # matched budgets
assert s2_r[1].step_peak_bytes < full_r[1].step_peak_bytes
assert s2_r[1].optimizer_bytes < 0.05 * full_r[1].optimizer_bytes
assert s2_r[2].backward < full_r[2].backward
assert s2_r[2].backward < lora_r[2].backward
for name, (_, mem, flops, timing) in results.items():
    print(f"{name:>9}: step memory ×{mem.step_peak_bytes / full_r[1].step_peak_bytes:.2f}, "
          f"backward FLOPs ×{flops.backward / full_r[2].backward:.2f}, "
          f"time ×{timing.median_s / full_r[3].median_s:.2f} of full FT")

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3))
names = list(results)
axes[0].bar(names, [results[n][1].step_peak_bytes / 2**20 for n in names])
axes[0].set_ylabel("step peak (MiB)")
axes[1].bar(names, [results[n][2].backward / 1e6 for n in names])
axes[1].set_ylabel("backward MFLOPs")
fig.tight_layout()
show(fig, "09_cost")

# %% [markdown]
# ## 5. Where each byte goes, and activation checkpointing
#
# `minift.tools.measure.memory_breakdown` splits a step's memory into the weights, the gradients,
# the AdamW state and the activations the forward keeps for the backward, by kind: `attention`
# (q, k, v and one log-sum-exp per query row; the probabilities are rebuilt in the backward),
# `mlp` (SwiGLU's gate and up outputs), `norms` (each norm's input), `slots` (what the linear slots
# keep: inputs of trained weights, adapter activations, S2FT's column slices) and `other`.
# S2FT removes almost all of the gradients, the optimizer state and `slots`, and with gate and up
# frozen also `mlp`: its MLP runs a few rows at a time, and the backward rebuilds g and u from the
# norm's kept input (`minift.model.lean_mlp`: two more products per block for the largest arrays a
# block would keep). Its lowest block keeps no attention cache either, since nothing below it needs
# dx. What is left is what every layer needs to pass dx down: the norms' inputs and the attention's
# q, k, v. **Activation checkpointing** (`TrainConfig(activation_checkpointing=True)`,
# `minift finetune --activation-checkpointing`) removes that too: each block keeps only its input
# (`checkpoints`) and reruns its forward in the backward, one block at a time, for the same
# gradients.

# %%
from minift.tools.measure import memory_breakdown

breakdown = {}
for name in ("full FT", "S2FT"):
    for ckpt in (False, True):
        label = name + (" + checkpointing" if ckpt else "")
        breakdown[label] = memory_breakdown(models[name], batch, activation_checkpointing=ckpt)
        d = breakdown[label].to_dict()
        kinds = ", ".join(f"{k} {v / 2**10:.0f}" for k, v in sorted(d["activations"].items()))
        print(f"{label:>23} (KiB): weights {d['weights'] / 2**10:.0f} | "
              f"gradients {d['gradients'] / 2**10:.0f} | optimizer {d['optimizer'] / 2**10:.0f} | "
              f"kept: {kinds} | step peak {d['step_peak'] / 2**10:.0f} | total {d['total'] / 2**10:.0f}")
kept = {k: sum(b.activations.values()) for k, b in breakdown.items()}
assert kept["S2FT + checkpointing"] < 0.5 * kept["S2FT"]
assert breakdown["S2FT + checkpointing"].step.total_bytes < breakdown["S2FT"].step.total_bytes
_, plain = loss_and_grads(models["S2FT"], batch.tokens, batch.targets)
_, rerun = loss_and_grads(models["S2FT"], batch.tokens, batch.targets, checkpoint=True)
for key, g in plain.items():
    assert_close(rerun[key], g, rtol=1e-6, atol=1e-9, what=key)  # the same gradients

# %% [markdown]
# ## Summary
#
# * A column block keeps `x[:, a:b]`, returns `dyᵀ x[:, a:b]` and the full `dx`; the result is
#   exactly the full gradient restricted to the block.
# * Parameters are views, so AdamW updates W in place and its state has the block's size; every
#   entry outside the block is untouched, bit for bit.
# * At a matched budget, S2FT's step keeps less, computes a cheaper backward than full FT and
#   LoRA, and carries a tiny optimizer state (`minift bench` measures this at scale).
# * What S2FT still keeps are the activations that pass dx through every layer; activation
#   checkpointing trades one more forward per step for keeping only each block's input.
#
# ## Exercises
#
# 1. **Row blocks in a model.** Train V and Up output rows instead (`head_targets=("v",)`,
#    `channel_targets=("up",)`). How many numbers does each kind of block keep for its backward,
#    and how does the step memory compare with the column-block default? Why is the column side
#    the memory-friendly one?
# 2. **Partial in depth.** Apply S2FT to some layers only (`layers=(2, 3)`) and show with
#    `step_flops` that the blocks below the lowest trained layer cost no backward at all. Through
#    how many blocks' attention (the softmax, q, k and v) does the backward run, for a given set of
#    trained layers? (The memory section above says what the lowest trained block skips.)
# 3. **Where the FLOPs go.** Print `step_flops(...).by_kind` for the three methods and explain
#    the `attention` entry: why is it the same for all three? Give its forward and backward FLOPs
#    per block (2 FLOPs per multiply-add) for B sequences of T tokens, H heads of width D.
#
# Solutions: `tutorials/solutions/09_s2ft_partial_backprop.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def kept_numbers(kind, N, I, S):
    """Exercise 1: how many numbers a block slot keeps for its backward on N tokens, for an input
    width I and S trained columns (kind "column") or rows (kind "row")."""
    return None  # your code here


def check_kept_numbers(kept_numbers):
    if kept_numbers("column", 1, 1, 1) is None:
        print("exercise 1: not answered yet")
        return
    r = np.random.default_rng(2)
    for N, O, I, (a, b) in ((6, 5, 10, (0, 3)), (4, 8, 3, (1, 2))):
        Wt, xt = r.standard_normal((O, I)), r.standard_normal((N, I))
        for kind, slot_ in (("column", ColumnBlock(Wt, ((a, b),), Wt[:, a:b].copy())),
                            ("row", RowBlock(Wt, ((a, b),), Wt[a:b].copy()))):
            kept_ = slot_.forward(xt, keep=True)[1]
            expected = sum(np.size(k) for k in (kept_ if isinstance(kept_, tuple) else (kept_,)))
            got = kept_numbers(kind, N, I, b - a)
            assert got == expected, f"{kind} block, N={N}, I={I}, S={b - a}: {got}, the slot keeps {expected}"
    print("exercise 1: correct")


check_kept_numbers(kept_numbers)


# %%
def backprop_blocks(n_layers, trained_layers):
    """Exercise 2: through how many of the n_layers blocks' attention the backward runs when S2FT
    trains only the blocks `trained_layers` (O heads and Down channels)."""
    return None  # your code here


def check_backprop_blocks(backprop_blocks):
    if backprop_blocks(4, (3,)) is None:
        print("exercise 2: not answered yet")
        return
    tiny = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, n_layers=4, n_heads=2, n_kv_heads=1)
    m0 = init_model(tiny, np.random.default_rng(0))
    per_block = step_flops(set_trainable(copy.deepcopy(m0)), 1, 4).by_kind["attention"][1] / 4
    for layers in ((3,), (2, 3), (1, 3), (0,), (0, 2)):
        m = apply_s2ft(copy.deepcopy(m0), S2FTConfig(heads=1, channels=1, layers=layers),
                       rng=np.random.default_rng(0))
        expected = step_flops(m, 1, 4).by_kind["attention"][1] / per_block  # attention backward, in blocks
        got = backprop_blocks(4, layers)
        assert got == expected, f"trained layers {layers}: {got}, step_flops counts {expected:g} blocks"
    print("exercise 2: correct")


check_backprop_blocks(backprop_blocks)


# %%
def attention_flops(B, T, H, D):
    """Exercise 3: (forward, backward) FLOPs of one block's attention products (scores q kᵀ and
    output p v, and their gradients), as step_flops counts them."""
    return None  # your code here


def check_attention_flops(attention_flops):
    if attention_flops(1, 1, 1, 1) is None:
        print("exercise 3: not answered yet")
        return
    for cfg, (B, T) in ((big, (4, 32)), (config, (2, 8))):
        m = set_trainable(init_model(cfg, np.random.default_rng(0)))
        fwd, bwd = step_flops(m, B, T).by_kind["attention"]
        got = tuple(attention_flops(B, T, cfg.n_heads, cfg.head_dim))
        expected = (fwd // cfg.n_layers, bwd // cfg.n_layers)
        assert got == expected, f"B={B}, T={T}: {got}, step_flops per block {expected}"
    print("exercise 3: correct")


check_attention_flops(attention_flops)
