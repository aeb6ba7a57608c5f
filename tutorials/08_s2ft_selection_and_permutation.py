# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 08 · S2FT I: coupled structures, selection, and co-permutation
#
# **What you will build.** The first half of S2FT — *structured sparse fine-tuning* (Yang et al.,
# NeurIPS 2024, arXiv 2412.06289). S2FT trains a few whole attention heads and a few whole FFN
# channels per layer. You will see why whole heads and channels are the right unit (they are
# *coupled* structures, paper Sec. 3.1), choose them with the selection strategies of Sec. 3.2,
# and permute the weights so that the chosen part of each matrix becomes one contiguous block —
# proving by test that the permutation leaves the model's function unchanged, grouped-query
# attention included.
#
# **Prerequisites.** Tutorials 03 (GQA: query head h reads key/value head h // G) and 04 (slots).
#
# **Library functions explained here.** `minift.methods.s2ft.S2FTConfig`,
# `minift.methods.s2ft.select_units`, `minift.methods.s2ft.plan_layout`,
# `minift.methods.s2ft.LayerLayout`, `minift.methods.s2ft.co_permute`,
# `minift.methods.s2ft.unpermute`, `minift.methods.s2ft.apply_s2ft`,
# `minift.methods.s2ft.ColumnBlock`, `minift.methods.s2ft.s2ft_parameter_count`,
# `minift.methods.s2ft.match_lora_budget`.

# %%
import copy
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from minift import ModelConfig, init_model, model_forward, trainable_parameters
from minift.layers.linear import linear_forward
from minift.layers.swiglu import swiglu_forward
from minift.methods.s2ft import (
    ColumnBlock,
    S2FTConfig,
    apply_s2ft,
    co_permute,
    match_lora_budget,
    plan_layout,
    s2ft_parameter_count,
    select_units,
    unpermute,
)
from minift.testing import assert_close


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
# width C = 24; H = 6 query heads sharing K = 2 key/value heads (G = H / K = 3 per group), head
# width D = C / H = 4; FFN width F = 16
config = ModelConfig(vocab_size=40, hidden_size=24, intermediate_size=16, n_layers=2, n_heads=6,
                     n_kv_heads=2)
base = init_model(config, rng, dtype=np.float64, std=0.3)
tokens = rng.integers(0, config.vocab_size, size=(2, 7))
logits_base, _ = model_forward(base, tokens, train=False)

# %% [markdown]
# ## 1. Coupled structures
#
# In the MLP `down(silu(gate(h)) ⊙ up(h))`, channel j is produced by **row** j of `gate` and `up`
# (weights are `[out, in]`) and consumed by **column** j of `down`, and by nothing else. Reorder
# the channels — the same permutation on gate rows, up rows and down columns — and the MLP
# computes the same sum in another order. That is a *coupled structure*: producer rows (the paper's
# W1) and consumer columns (W2) tied by one activation.

# %%
blk = base.blocks[0]
h = rng.standard_normal((5, config.hidden_size))


def mlp(gate_w, up_w, down_w):
    m, _ = swiglu_forward(linear_forward(h, gate_w), linear_forward(h, up_w))
    return linear_forward(m, down_w)


perm = rng.permutation(config.intermediate_size)
same = mlp(blk.gate.weight[perm], blk.up.weight[perm], blk.down.weight[:, perm])
assert_close(same, mlp(blk.gate.weight, blk.up.weight, blk.down.weight), rtol=1e-12, atol=1e-14,
             what="co-permuted MLP")
broken = mlp(blk.gate.weight[perm], blk.up.weight[perm], blk.down.weight)  # forgot down's columns
print("permuting only the producers changes the output by", np.abs(broken - same).max().round(3))

# %% [markdown]
# For attention the unit is a whole **head**: head h owns D rows of Q, reads its key/value head's
# D rows of K and V, and its output occupies D columns of O. Two constraints make heads trickier
# than channels:
#
# * **RoPE** rotates coordinate i of a head with coordinate i + D/2. Heads must move as whole
#   D-row blocks; shuffling coordinates *inside* a head breaks that pairing.
# * **GQA**: query head h reads key/value head h // G. A query head may only move *within* its
#   group, or whole groups must move together (Q rows, K/V rows, and O columns alike).
#
# Both counterexamples, run on the whole model:

# %%
def logits_of(model):
    return model_forward(model, tokens, train=False)[0]


D, G = config.head_dim, config.n_heads // config.n_kv_heads
# (a) shuffle the coordinates inside every query and key head, consistently in Q and K
inner = rng.permutation(D)
within = np.concatenate([h0 * D + inner for h0 in range(config.n_heads)])
within_kv = np.concatenate([h0 * D + inner for h0 in range(config.n_kv_heads)])
m_a = copy.deepcopy(base)
m_a.blocks[0].q.weight = m_a.blocks[0].q.weight[within]
m_a.blocks[0].k.weight = m_a.blocks[0].k.weight[within_kv]
# (b) swap query head 0 (group 0) with query head 3 (group 1), in Q rows and O columns
swap = list(range(config.n_heads))
swap[0], swap[3] = 3, 0
rows = np.concatenate([np.arange(s * D, (s + 1) * D) for s in swap])
m_b = copy.deepcopy(base)
m_b.blocks[0].q.weight = m_b.blocks[0].q.weight[rows]
m_b.blocks[0].o.weight = m_b.blocks[0].o.weight[:, rows]
for name, m in (("shuffle inside heads (RoPE)", m_a), ("move a head across groups (GQA)", m_b)):
    change = np.abs(logits_of(m) - logits_base).max()
    print(f"{name:>34}: logits change by {change:.3f}")
    assert change > 1e-3

# %% [markdown]
# (Without RoPE, (a) would be harmless — q·k is invariant to the same permutation of both. And
# with K = H, (b) is repaired by swapping the K and V rows of heads 0 and 3 as well; under GQA
# those rows are shared with the other heads of each group, so no such repair exists. The
# counterexamples are exactly the constraints.)

# %%
mha = init_model(config.replace(n_kv_heads=6), np.random.default_rng(7), dtype=np.float64, std=0.3)
m_c = copy.deepcopy(mha)
blk_c = m_c.blocks[0]
blk_c.q.weight, blk_c.k.weight, blk_c.v.weight = (blk_c.q.weight[rows], blk_c.k.weight[rows],
                                                  blk_c.v.weight[rows])
blk_c.o.weight = blk_c.o.weight[:, rows]
assert_close(logits_of(m_c), logits_of(mha), rtol=1e-11, atol=1e-12, what="MHA head swap with K, V")
print("with K = H, swapping heads 0 and 3 in Q, K, V rows and O columns changes nothing")

# %% [markdown]
# ## 2. Selecting heads and channels
#
# `S2FTConfig(heads=…, channels=…)` asks for a fixed number of query heads and FFN channels **per
# layer** (the paper's uniform allocation). Which matrices train them is configuration:
# by default the consumer side, O input columns and Down input columns — the paper's main setting,
# which its Fig. 4 ablation found best. The five strategies (paper Sec. 3.2, Table 4) score each
# unit on its consumer matrix: `random` (S2FT-R, the default), `weight` (‖W[:, unit]‖),
# `activation` (‖input columns‖ on calibration data), `product` (both), `gradient` — each taking
# the `large` or `small` end. The paper's best was *small activations*.

# %%
s2 = S2FTConfig(heads=2, channels=3)
print("random           :", select_units(base, s2, rng=np.random.default_rng(1)))
print("weight, large    :", select_units(base, S2FTConfig(heads=2, channels=3, strategy="weight")))
calib = [(tokens, np.roll(tokens, -1, axis=1))]
small_act = S2FTConfig(heads=2, channels=3, strategy="activation", variant="small")
print("activation, small:", select_units(base, small_act, calib))

# %% [markdown]
# A scored strategy is a few lines. For `weight`, a head's score is the Frobenius norm of its D
# columns of O — reshape O (C, H·D) to (C, H, D) and take the norm over the first and last axes —
# and the `large` variant keeps the n best, reported sorted. Written by hand, it picks what
# `select_units` picks in every layer:

# %%
def heads_by_weight(o_weight, n, D):
    """The n query heads whose O column blocks have the largest Frobenius norm, sorted."""
    scores = np.linalg.norm(o_weight.reshape(o_weight.shape[0], -1, D), axis=(0, 2))  # (H,)
    return tuple(sorted(np.argsort(-scores, kind="stable")[:n].tolist()))


by_weight = select_units(base, S2FTConfig(heads=2, channels=3, strategy="weight"))
for i, block in enumerate(base.blocks):
    assert heads_by_weight(block.o.weight, 2, D) == by_weight[i][0], f"layer {i}"
print("by hand, heads with the largest O columns:", [heads_by_weight(b.o.weight, 2, D) for b in base.blocks])

# %% [markdown]
# ## 3. Co-permutation: making the selection contiguous
#
# Training scattered columns would need masks or index arithmetic in every step. Instead S2FT
# *physically* permutes the coupled weights once, so that the selected heads and channels sit
# next to each other; the trainable part of O is then `W[:, a:b]`, a NumPy **view** that the
# optimizer updates in place (tutorial 09).
#
# `plan_layout` builds the permutation of one layer. For channels it is easy: selected first. For
# heads under GQA it must respect the groups: groups are reordered as wholes, heads only inside
# their group. Call a group *full*, *partial* or *empty* by how many of its heads are selected; the
# layout puts a partial group, then the full ones, then the other partial groups, selected heads
# at the inner edges. The selected heads then form one segment whenever at most two groups are
# partial — and when more are, no valid permutation can make them contiguous, so the slot carries
# a short list of segments instead (exercise 1).

# %%
layout = plan_layout(heads=(1, 3, 4), channels=(2, 9, 11), n_heads=6, n_kv_heads=2, n_channels=16)
print("head order   :", layout.head_order, "(original head at each new position)")
print("kv order     :", layout.kv_order)
print("head segments:", layout.head_segments, " channel segments:", layout.channel_segments)
for new_pos, h0 in enumerate(layout.head_order):
    kv_new = layout.kv_order[new_pos // G]
    assert h0 // G == kv_new  # every query head still reads its own key/value head

# %% [markdown]
# The layout only says which unit goes where. Applying it is indexing, and you can write it: a
# head is a block of D rows (of Q, and of K and V for a key/value head) or D columns (of O), a
# channel one row (of Gate and Up) or one column (of Down). `rows_of(order, D)` lists, for each new
# position, the original row it takes; every matrix of the layer is then one gather. The library's
# `co_permute` must produce the same matrices, bit for bit:

# %%
def rows_of(order, width):
    """Original row (or column) indices, new position by new position: unit u covers u·width …
    (u+1)·width − 1."""
    return np.array([u * width + d for u in order for d in range(width)], dtype=int)


q_rows, kv_rows = rows_of(layout.head_order, D), rows_of(layout.kv_order, D)
ch = np.array(layout.channel_order)
b0 = base.blocks[0]
by_hand = {"q": b0.q.weight[q_rows], "k": b0.k.weight[kv_rows], "v": b0.v.weight[kv_rows],
           "o": b0.o.weight[:, q_rows],  # O reads the heads: its columns move with Q's rows
           "gate": b0.gate.weight[ch], "up": b0.up.weight[ch],
           "down": b0.down.weight[:, ch]}  # Down reads the channels: its columns move
permuted = co_permute(copy.deepcopy(base), {0: layout})
for name, w in by_hand.items():
    assert np.array_equal(getattr(permuted.blocks[0], name).weight, w), name
print("co_permute = seven gathers written by hand, bit for bit")

# %% [markdown]
# The same layout as a picture: one box per query head — a block of D rows of Q and the same D
# columns of O — coloured by the key/value group it reads (K's and V's row blocks move with their
# group), selected heads solid, the others faded. After co-permutation the selected heads are one
# contiguous segment and every head is still inside its group.

# %%
fig, axes = plt.subplots(2, 1, figsize=(6, 2.4))
for ax, (title, order) in zip(axes, [("original order", range(6)), ("co-permuted: layout.head_order",
                                                                      layout.head_order)], strict=True):
    for pos, h in enumerate(order):
        chosen = h in layout.heads
        ax.add_patch(Rectangle((pos, 0), 1, 1, facecolor=f"C{h // G}", alpha=1.0 if chosen else 0.25,
                               edgecolor="k"))
        ax.text(pos + 0.5, 0.5, f"head {h}", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
fig.suptitle("Q row blocks = O column blocks; colour: KV group; solid: selected", fontsize=9)
fig.tight_layout()
show(fig, "08_copermuted_heads")

# %% [markdown]
# ## 4. Proof by test: the co-permuted model is the same function
#
# The claim "co-permutation leaves the network function unchanged" is checked here over many
# random selections on the GQA model (and an MHA one), including selections that leave several
# groups partial. The logits agree to float64 rounding (the sums run in another order, so not
# bitwise), and `unpermute` then restores every weight **bitwise**: a permutation is a gather,
# and the inverse gather moves each value back untouched.

# %%
for model0 in (base, mha):
    reference = model_forward(model0, tokens, train=False)[0]
    for seed in range(12):
        r = np.random.default_rng(seed)
        layouts = {}
        for i in range(config.n_layers):
            heads = tuple(sorted(r.choice(6, size=r.integers(0, 7), replace=False).tolist()))
            channels = tuple(sorted(r.choice(16, size=r.integers(0, 17), replace=False).tolist()))
            layouts[i] = plan_layout(heads, channels, 6, model0.config.n_kv_heads, 16)
        m = copy.deepcopy(model0)
        co_permute(m, layouts)
        assert_close(model_forward(m, tokens, train=False)[0], reference, rtol=1e-11, atol=1e-12,
                     what=f"logits after co-permutation (seed {seed})")
        unpermute(m)
        for b0, b1 in zip(model0.blocks, m.blocks, strict=True):
            for (name, s0), (_, s1) in zip(b0.slots(), b1.slots(), strict=True):
                assert np.array_equal(s0.weight, s1.weight), name
print("24 random selections: same logits after co-permutation, identical weights after unpermute")

# %% [markdown]
# What co-permutation does to one weight, as a picture: O (C rows, H·D columns) of layer 0 with the
# columns of the selected heads (1, 3, 4) highlighted, before and after. Before, they are scattered;
# after, they form one contiguous block `W[:, a:b]`, which is what the training step of tutorial 09
# updates in place.

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
selected_cols = np.isin(np.arange(config.n_heads * D) // D, layout.heads)  # original column → selected?
panels = [("O before: |W|, selected heads shaded", b0.o.weight, selected_cols),
          ("O after co-permutation", b0.o.weight[:, q_rows], selected_cols[q_rows])]
for ax, (title, w, cols) in zip(axes, panels, strict=True):
    ax.imshow(np.abs(w), cmap="Greys", aspect="auto")
    for j in np.flatnonzero(cols):
        ax.axvspan(j - 0.5, j + 0.5, color="C1", alpha=0.35, lw=0)
    ax.set_xlabel("input column (head h: columns h·D … h·D + D − 1)", fontsize=8)
    ax.set_ylabel("output row", fontsize=8)
    ax.set_title(title, fontsize=9)
fig.tight_layout()
show(fig, "08_selected_block")

# %% [markdown]
# ## 5. All of it in one call: `apply_s2ft`
#
# `apply_s2ft(model, config, calib_batches, rng=…)` freezes everything, selects, co-permutes,
# records the permutation in the model's `MethodRecord` (`minift.methods.method_record(model)`),
# and swaps the target slots for partial-backpropagation slots: `ColumnBlock` for O and Down.
# Their trainable arrays are views of the permuted weights.

# %%
model = apply_s2ft(copy.deepcopy(base), S2FTConfig(heads=2, channels=3), rng=np.random.default_rng(1))
params = trainable_parameters(model)
def full_weight(model, key):
    """The whole (permuted) weight behind a trainable key like ``blocks.0.o.weight``."""
    _, i, name, _ = key.split(".")
    return getattr(model.blocks[int(i)], name).weight


for key, p in params.items():
    w = full_weight(model, key)
    print(f"{key:<20} {p.shape} is a view of the {w.shape} weight: {np.shares_memory(p, w)}")
    assert np.shares_memory(p, w)
assert isinstance(model.blocks[0].o, ColumnBlock)
assert_close(model_forward(model, tokens, train=False)[0], logits_base, rtol=1e-11, atol=1e-12,
             what="apply_s2ft leaves the function unchanged")
n_train = sum(p.size for p in params.values())
assert n_train == s2ft_parameter_count(config, S2FTConfig(heads=2, channels=3))
print(f"{n_train} trainable parameters, i.e. 2·D·C + 3·C = {2 * D * 24 + 3 * 24} per layer")

# %% [markdown]
# ### Matching a LoRA budget
#
# To compare with LoRA fairly, give S2FT the same number of trainable parameters.
# `match_lora_budget` converts a LoRA rank (on given target projections) into heads and channels
# per layer, half of the budget to heads by default:

# %%
matched = match_lora_budget(config, rank=2)
print(matched.heads, "heads and", matched.channels, "channels per layer ≈ LoRA rank 2 on q, k, v, up, down")

# %% [markdown]
# ## Summary
#
# * Heads (Q/K/V rows ↔ O columns) and FFN channels (Gate/Up rows ↔ Down columns) are coupled:
#   permuting both sides together leaves the function unchanged.
# * Heads move whole (RoPE) and within their key/value group (GQA); any selection is valid.
# * `apply_s2ft` selects, co-permutes once, and exposes the selected blocks as in-place views.
#
# ## Exercises
#
# 1. **Several segments.** With H = 6, K = 3 (G = 2), select one head from each group, e.g.
#    (0, 2, 4): every group is partial. Show that `plan_layout` gives more than one head
#    segment, that `apply_s2ft` with such heads names the O parameters `weight_0`, `weight_1`,
#    and that the function is unchanged. Then give the number of head segments for any selection,
#    as a formula in the number p of partially selected groups.
# 2. **Your own strategy.** Pick the Down channels by the *smallest* column norm yourself (no
#    `select_units`) and check that you get the same channels as `strategy="weight", variant="small"`.
# 3. **V and O together.** Train heads on both sides (`head_targets=("v", "o")`). Which slot type
#    does V get, and how many parameters does a selection of query heads train in one layer with
#    GQA? (A key/value head's V rows are shared by its G query heads and train whole.) Compare with
#    `s2ft_parameter_count`.
#
# Solutions: `tutorials/solutions/08_s2ft_selection_and_permutation.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def n_head_segments(heads, n_heads, n_kv_heads):
    """Exercise 1: how many contiguous segments the selected query heads `heads` form after
    `plan_layout` (0 when none is selected)."""
    return None  # your code here


def check_n_head_segments(n_head_segments):
    if n_head_segments((0,), 6, 3) is None:
        print("exercise 1: not answered yet")
        return
    for H, K in ((6, 3), (8, 4), (8, 2), (6, 6), (4, 1)):
        for seed in range(20):
            r = np.random.default_rng(seed)
            heads = tuple(sorted(r.choice(H, size=r.integers(0, H + 1), replace=False).tolist()))
            expected = len(plan_layout(heads, (), H, K, 4).head_segments)
            got = n_head_segments(heads, H, K)
            assert got == expected, f"H={H}, K={K}, heads {heads}: {got}, plan_layout gives {expected}"
    print("exercise 1: correct")


check_n_head_segments(n_head_segments)

# %%
def smallest_down_channels(down, k):
    """Exercise 2: the ids of the k FFN channels whose Down columns have the smallest norm, sorted;
    `down` is a layer's Down weight, (C, F)."""
    return None  # your code here


def check_smallest_down_channels(smallest_down_channels):
    m = init_model(config, np.random.default_rng(4), dtype=np.float64)
    if smallest_down_channels(m.blocks[0].down.weight, 4) is None:
        print("exercise 2: not answered yet")
        return
    expected = select_units(m, S2FTConfig(channels=4, strategy="weight", variant="small"))
    for i, block in enumerate(m.blocks):
        got = tuple(int(j) for j in smallest_down_channels(block.down.weight, 4))
        assert got == tuple(expected[i][1]), f"layer {i}: {got}, expected {tuple(expected[i][1])}"
    print("exercise 2: correct")


check_smallest_down_channels(smallest_down_channels)


# %%
def vo_parameters(heads, C, D, G):
    """Exercise 3: the parameters S2FT trains in one layer when the query heads `heads` are selected
    with head_targets=("v", "o"), width C, head width D, G query heads per key/value head."""
    return None  # your code here


def check_vo_parameters(vo_parameters):
    if vo_parameters((0,), 24, 4, 3) is None:
        print("exercise 3: not answered yet")
        return
    vo = S2FTConfig(heads=1, head_targets=("v", "o"))
    for heads in ((0,), (0, 1), (0, 3), (1, 2, 4), (0, 1, 2, 3, 4, 5)):
        expected = s2ft_parameter_count(config, vo, selection={0: (heads, ())})
        got = vo_parameters(heads, config.hidden_size, D, G)
        assert got == expected, f"heads {heads}: {got}, s2ft_parameter_count gives {expected}"
    print("exercise 3: correct")


check_vo_parameters(vo_parameters)
