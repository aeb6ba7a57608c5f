# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 09 · S2FT partial backpropagation

# %%
import copy

import numpy as np

from minift import ModelConfig, init_model, model_forward, set_trainable
from minift.data import Batch
from minift.methods.lora import LoRAConfig, apply_lora
from minift.methods.s2ft import RowBlock, S2FTConfig, apply_s2ft
from minift.tools.measure import step_flops, step_memory

config = ModelConfig(vocab_size=256, hidden_size=96, intermediate_size=256, n_layers=4, n_heads=6,
                     n_kv_heads=3)
base = init_model(config, np.random.default_rng(1))
tok = np.random.default_rng(2).integers(0, 256, size=(4, 33))
batch = Batch(tok[:, :-1], tok[:, 1:], np.ones_like(tok[:, :-1]))

# %% [markdown]
# ## 1. Row blocks
#
# An output row j of W is trained with `dW[j, :] = dy[:, j]ᵀ x`: it needs *every* input column, so
# a `RowBlock` keeps the whole input x (N×I), however few rows it trains. A column block keeps only
# N×S. (Here the V and Up inputs are the normalised hidden states, which the frozen slots next to
# them would not otherwise keep.)

# %%
columns = apply_s2ft(copy.deepcopy(base), S2FTConfig(heads=2, channels=17), rng=np.random.default_rng(0))
rows = apply_s2ft(copy.deepcopy(base), S2FTConfig(heads=2, channels=17, head_targets=("v",),
                                                  channel_targets=("up",)), rng=np.random.default_rng(0))
assert isinstance(rows.blocks[0].v, RowBlock)
_, cache = model_forward(rows, batch.tokens)
print("RowBlock v keeps", cache.blocks[0].v.shape, "; ColumnBlock o keeps",
      [a.shape for a in model_forward(columns, batch.tokens)[1].blocks[0].o])
m_cols, m_rows = step_memory(columns, [batch]), step_memory(rows, [batch])
print(f"step peak: columns (O, Down) {m_cols.step_peak_bytes / 2**20:.2f} MiB, "
      f"rows (V, Up) {m_rows.step_peak_bytes / 2**20:.2f} MiB")
assert cache.blocks[0].v.shape == (batch.tokens.size, config.hidden_size)

# %% [markdown]
# ## 2. Partial in depth

# %%
top = apply_s2ft(copy.deepcopy(base), S2FTConfig(heads=2, channels=17, layers=(2, 3)),
                 rng=np.random.default_rng(0))
_, cache = model_forward(top, batch.tokens)
print("blocks with a cache:", [c is not None for c in cache.blocks])
assert cache.blocks[0] is None
assert cache.blocks[1] is None
f_top, f_all = step_flops(top, 4, 32), step_flops(columns, 4, 32)
print(f"backward MFLOPs: top two layers {f_top.backward / 1e6:.0f}, every layer {f_all.backward / 1e6:.0f}")
assert f_top.backward < 0.6 * f_all.backward

# %% [markdown]
# ## 3. Where the FLOPs go
#
# Attention's score and value products have no weights: every method that backpropagates through a
# block pays their backward (dq, dk, dv, dp), trainable or not. Only partial backprop *in depth*
# (exercise 2) removes it, and S2FT's lowest block: nothing below it needs dx and its q, k, v are
# frozen, so its backward stops at O's weight gradient.

# %%
methods = {
    "full FT": set_trainable(copy.deepcopy(base)),
    "LoRA": apply_lora(copy.deepcopy(base), LoRAConfig(r=4, targets=("q", "k", "v", "up", "down"))),
    "S2FT": columns,
}
attention = {}
for name, model in methods.items():
    report = step_flops(model, 4, 32)
    attention[name] = report.by_kind["attention"]
    print(f"{name:>7}:", {k: (round(f / 1e6), round(b / 1e6)) for k, (f, b) in report.by_kind.items()})
assert attention["full FT"] == attention["LoRA"]
assert attention["S2FT"][0] == attention["LoRA"][0]  # the same forward
assert attention["S2FT"][1] < attention["LoRA"][1]  # one block fewer in the backward


# %% [markdown]
# ## The answers for the tutorial's check cells

# %%
def kept_numbers(kind, N, I, S):
    return N * S if kind == "column" else N * I  # x[:, a:b] for a column block, all of x for rows


def backprop_blocks(n_layers, trained_layers):
    # every block above the lowest trained one: that block's backward stops at O's weight gradient
    return n_layers - min(trained_layers) - 1


def attention_flops(B, T, H, D):
    att = 2 * B * H * T * T * D  # one (T, D) by (D, T) product per head and sequence, 2 FLOPs each
    return 2 * att, 4 * att  # forward: scores and p v; backward: dp, dv, dq, dk
