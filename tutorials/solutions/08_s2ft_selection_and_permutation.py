# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 08 · S2FT selection and co-permutation

# %%
import copy

import numpy as np

from minift import ModelConfig, init_model, model_forward, trainable_parameters
from minift.methods import method_record
from minift.methods.s2ft import (
    RowBlock,
    S2FTConfig,
    apply_s2ft,
    plan_layout,
    s2ft_parameter_count,
    select_units,
)
from minift.testing import assert_close

rng = np.random.default_rng(0)
tokens = rng.integers(0, 40, size=(2, 7))

# %% [markdown]
# ## 1. Several segments
#
# With G = 2 and heads (0, 2, 4), each of the three groups has one selected head out of two. Each
# contiguous run can straddle at most two partial groups, so two segments are needed.

# %%
config = ModelConfig(vocab_size=40, hidden_size=24, intermediate_size=16, n_layers=1, n_heads=6,
                     n_kv_heads=3)
base = init_model(config, rng, dtype=np.float64, std=0.3)
layout = plan_layout((0, 2, 4), (), 6, 3, 16)
print("head order:", layout.head_order, "segments:", layout.head_segments)
assert len(layout.head_segments) == 2


# apply_s2ft selects at random from the Generator it is given: find a seed that draws one head
# from each group, so the model gets exactly this kind of selection.


def groups_touched(seed):
    heads = select_units(base, S2FTConfig(heads=3), rng=np.random.default_rng(seed))[0][0]
    return len({h // 2 for h in heads})


seed = next(sd for sd in range(100) if groups_touched(sd) == 3)
model = apply_s2ft(copy.deepcopy(base), S2FTConfig(heads=3), rng=np.random.default_rng(seed))
print("selected heads:", method_record(model).state["layers"]["0"]["heads"])
names = sorted(k for k in trainable_parameters(model) if ".o." in k)
print(names)
assert names == ["blocks.0.o.weight_0", "blocks.0.o.weight_1"]
assert_close(model_forward(model, tokens, train=False)[0], model_forward(base, tokens, train=False)[0],
             rtol=1e-11, atol=1e-12, what="logits")

# %% [markdown]
# ## 2. Your own strategy: the smallest Down columns

# %%
down = base.blocks[0].down.weight  # (C, F)
mine = tuple(sorted(np.argsort(np.linalg.norm(down, axis=0), kind="stable")[:4].tolist()))
theirs = select_units(base, S2FTConfig(channels=4, strategy="weight", variant="small"))[0][1]
print("smallest-norm Down columns:", mine)
assert mine == theirs

# %% [markdown]
# ## 3. V and O together
#
# V is a producer: its selected heads are output **rows**, so it becomes a `RowBlock`. With GQA a
# key/value head serves G query heads; V trains the whole key/value head of every group the
# selection touches. Given the selection, `s2ft_parameter_count` counts exactly that; without one
# it counts the fewest groups the heads can touch (⌈heads / G⌉), a lower bound for a random draw.

# %%
s2 = S2FTConfig(heads=3, head_targets=("v", "o"))
model = apply_s2ft(copy.deepcopy(base), s2, rng=np.random.default_rng(0))
assert isinstance(model.blocks[0].v, RowBlock)
n = sum(p.size for p in trainable_parameters(model).values())
D, C, G = 4, 24, 2
heads = method_record(model).state["layers"]["0"]["heads"]
touched = len({h // G for h in heads})
layers = method_record(model).state["layers"]
selection = {int(i): (layer["heads"], layer["channels"]) for i, layer in layers.items()}
print(f"heads {heads} touch {touched} groups: {n} trainable = O {3 * D * C} + V {touched * D * C}; "
      f"s2ft_parameter_count says {s2ft_parameter_count(config, s2, selection)} for this selection, "
      f"{s2ft_parameter_count(config, s2)} before one is drawn")
assert n == 3 * D * C + touched * D * C == s2ft_parameter_count(config, s2, selection)
assert n >= s2ft_parameter_count(config, s2)


# %% [markdown]
# ## The answers for the tutorial's check cells

# %%
def smallest_down_channels(down, k):
    # channel j of the FFN is column j of Down (C, F): norms over axis 0
    return tuple(sorted(np.argsort(np.linalg.norm(down, axis=0), kind="stable")[:k].tolist()))


def n_head_segments(heads, n_heads, n_kv_heads):
    G = n_heads // n_kv_heads
    count = [sum(h // G == g for h in heads) for g in range(n_kv_heads)]
    p = sum(0 < c < G for c in count)  # partially selected groups
    return 0 if not heads else max(1, (p + 1) // 2)  # ⌈p/2⌉, and one when only whole groups


def vo_parameters(heads, C, D, G):
    # O: D columns per selected query head; V: D rows per key/value head that a selected head reads
    return D * C * (len(heads) + len({h // G for h in heads}))
