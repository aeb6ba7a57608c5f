# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 10 · S2FT adapters and serving

# %%
import copy

import numpy as np

from minift import ModelConfig, init_model, model_forward, trainable_parameters
from minift.data import Batch
from minift.methods.s2ft import S2FTConfig, apply_s2ft, extract_adapter, s2ft_parameter_count
from minift.optim import AdamW
from minift.serving import fuse_adapters, merge_adapter
from minift.testing import assert_close
from minift.train import train_step

config = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4,
                     n_kv_heads=2)
base = init_model(config, np.random.default_rng(0), dtype=np.float64, std=0.2)
seq = np.array([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37]])
batch = Batch(seq[:, :-1], seq[:, 1:], np.ones_like(seq[:, :-1]))
s2 = S2FTConfig(heads=1, channels=8)


def train_adapter(seed, steps=20, lr=3e-2):
    model = apply_s2ft(copy.deepcopy(base), s2, rng=np.random.default_rng(seed))
    opt = AdamW(trainable_parameters(model))
    for _ in range(steps):
        train_step(model, opt, [batch], lr)
    return extract_adapter(model)


A, B = train_adapter(1), train_adapter(2)

# %% [markdown]
# ## 1. Cost of a switch
#
# An S2FT switch subtracts the old blocks and adds the new ones: 2 × (adapter entries) additions.
# A LoRA switch recomputes `s B A` (O·I·R multiply-adds) for every adapted matrix, twice, and
# adds O·I entries twice.

# %%
s2ft_adds = sum(b.delta.size for b in A.blocks.values()) + sum(b.delta.size for b in B.blocks.values())
print(f"S2FT switch: {s2ft_adds} additions ({s2ft_parameter_count(config, s2)} entries per adapter)")
R = 8
lora_shapes = [(32, 32), (16, 32), (16, 32), (64, 32), (32, 64)]  # q, k, v, up, down per layer
lora_macs = 2 * config.n_layers * sum(o * i * R + o * i for o, i in lora_shapes)
print(f"LoRA r={R} switch on q, k, v, up, down: ≈ {lora_macs} multiply-adds")
assert s2ft_adds < lora_macs

# %% [markdown]
# ## 2. Weighted fusion

# %%
half = fuse_adapters([A, B], [0.5, 0.5])
only_a = fuse_adapters([A, B], [1.0, 0.0])
m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
merge_adapter(m1, only_a)
merge_adapter(m2, A)
assert_close(model_forward(m1, seq, train=False)[0], model_forward(m2, seq, train=False)[0],
             rtol=1e-12, atol=1e-13, what="fuse (1, 0) = A")
print("fused with (1, 0) equals A alone; (0.5, 0.5) covers", len(half.blocks["blocks.0.down"].indices),
      "down columns")

# %% [markdown]
# ### The shared case
#
# The same seed selects the same columns; a longer run gives a different update on them. The
# fused block on shared columns is the sum — what `fuse_columns` below computes by hand.

# %%
A_long = train_adapter(1, steps=40)
fused = fuse_adapters([A, A_long], [1.0, 1.0])
for key, blk in fused.blocks.items():
    assert np.array_equal(blk.indices, A.blocks[key].indices)
    assert_close(blk.delta, A.blocks[key].delta + A_long.blocks[key].delta, rtol=1e-12, what=key)
print("same columns: the fused delta is the sum of the two deltas")


# %% [markdown]
# ## 3. Merging by hand
#
# The adapter's indices are original coordinates, so the block is added to exactly those columns
# of the base weight (`merge_columns` below); adding it to the first S columns, where the block sat
# in the co-permuted model during training, would change the wrong columns.
#
# ## The answers for the tutorial's check cells

# %%
def switch_additions(old, new):
    # subtract every entry of the old blocks, add every entry of the new ones
    return sum(b.delta.size for b in old.blocks.values()) + sum(b.delta.size for b in new.blocks.values())


def fuse_columns(blocks, weights):
    union = sorted({int(i) for indices, _ in blocks for i in indices})
    where = {u: n for n, u in enumerate(union)}
    fused = np.zeros((blocks[0][1].shape[0], len(union)))
    for (indices, delta), lam in zip(blocks, weights, strict=True):
        fused[:, [where[int(i)] for i in indices]] += lam * delta  # shared columns add up
    return np.array(union), fused


def merge_columns(W, indices, delta):
    merged = W.copy()
    merged[:, indices] += delta  # original coordinates: the columns the adapter names, not the first S
    return merged
