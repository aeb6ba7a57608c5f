# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 04 · The decoder and a training step

# %%
import dataclasses

import numpy as np

from minift import ModelConfig, init_model, loss_and_grads, model_forward, set_trainable
from minift.data import Batch
from minift.testing import assert_close
from minift.tools.measure import step_memory
from minift.train import accumulate_gradients

config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, n_layers=2, n_heads=4,
                     n_kv_heads=2)
model = set_trainable(init_model(config, np.random.default_rng(0), dtype=np.float64, std=0.3))
rng = np.random.default_rng(1)

# %% [markdown]
# ## 1. Gradient accumulation
#
# The loss is a mean over *counted* tokens. Micro-batch i with n_i counted tokens must enter with
# weight n_i / Σn; a plain average weights a micro-batch with few counted tokens as much as one
# with many, which is not the gradient of the whole batch.

# %%
tokens = rng.integers(0, 32, size=(4, 7))
targets = rng.integers(0, 32, size=(4, 7))
targets[2:, :5] = -100  # the second micro-batch counts far fewer tokens
_, whole = loss_and_grads(model, tokens, targets)
_, accumulated, counted = accumulate_gradients(model, [(tokens[:2], targets[:2], None),
                                                       (tokens[2:], targets[2:], None)])
for k in whole:
    assert_close(accumulated[k], whole[k], rtol=1e-10, atol=1e-14, what=k)
_, g1 = loss_and_grads(model, tokens[:2], targets[:2])
_, g2 = loss_and_grads(model, tokens[2:], targets[2:])
plain = {k: (g1[k] + g2[k]) / 2 for k in g1}
gap = max(np.abs(plain[k] - whole[k]).max() for k in whole)
print(f"{counted} counted tokens; token-weighted accumulation is exact, a plain average is off by up to "
      f"{gap:.2e} in an entry")
assert gap > 1e-4

# %% [markdown]
# ## 2. What the cache holds
#
# Walk the cache tree keeping the path of each array, each array once (by identity: q, k and v
# keep the same normalised input). The blocks' caches are dataclasses, so a walk over tuples and
# lists alone would miss them.

# %%
big = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160, n_layers=4, n_heads=4,
                  n_kv_heads=2)
full = set_trainable(init_model(big, np.random.default_rng(3)))
tok = np.random.default_rng(2).integers(0, 256, size=(4, 64))
_, cache = model_forward(full, tok)


def walk(obj, path, found):
    if isinstance(obj, np.ndarray):
        found.setdefault(id(obj), (path, obj))
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for f in obj._fields:
            walk(getattr(obj, f), f"{path}.{f}", found)
    elif dataclasses.is_dataclass(obj):  # a block's cache
        for f, value in vars(obj).items():
            walk(value, f"{path}.{f}", found)
    elif isinstance(obj, tuple | list):
        for i, item in enumerate(obj):
            walk(item, f"{path}[{i}]", found)
    return found


def five_largest(cache):
    return sorted(walk(cache, "cache", {}).values(), key=lambda pa: -pa[1].nbytes)[:5]


for path, a in five_largest(cache):
    print(f"{a.nbytes / 1024:8.0f} KiB  {a.shape!s:<22} {path}")
assert all(path.startswith("cache.blocks[") for path, _ in five_largest(cache))  # all inside blocks

# %% [markdown]
# ## 3. Memory against sequence length
#
# The linear terms (activations of width C or F per token) grow like T; the attention scores and
# probabilities, one sequence's (K, G·T, T) at a time, built in the forward and rebuilt in the
# backward but never kept, grow like T². The fit gives both parts; at these tiny widths T²
# takes over early.

# %%
def fit_growth(Ts, peaks):
    Ts = np.asarray(Ts, dtype=float)
    design = np.stack([np.ones_like(Ts), Ts, Ts**2], axis=1)  # columns 1, T, T²: a, b, c in this order
    return np.linalg.lstsq(design, np.asarray(peaks, dtype=float), rcond=None)[0]


peaks = {}
for T in (16, 32, 64, 128):
    x = np.random.default_rng(4).integers(0, 256, size=(2, T + 1))
    peaks[T] = step_memory(full, [Batch(x[:, :-1], x[:, 1:], np.ones_like(x[:, :-1]))]).step_peak_bytes
    print(f"T = {T:>3}: step peak {peaks[T] / 2**20:6.2f} MiB")
a, b, c = fit_growth(list(peaks), list(peaks.values()))
print(f"fit: peak ≈ {a / 2**20:.2f} MiB + {b / 2**10:.2f} KiB·T + {c:.1f} B·T²;"
      f" at T = 128 the T² term is {c * 128**2 / peaks[128]:.0%} of the peak")
growth = [peaks[2 * T] / peaks[T] for T in (16, 32, 64)]
print("growth per doubling of T:", np.round(growth, 2), "(2 = linear, 4 = quadratic)")
assert growth[-1] > growth[0]  # the quadratic term takes over as T grows
assert c > 0


# %% [markdown]
# ## The answers for the tutorial's check cells
#
# The main text's "your turn", the embedding's backward: row t of dE sums dx over the positions
# holding token t. `np.add.at` adds once per occurrence; `dE[tokens] += dx` would not.

# %%
def embedding_backward_by_hand(dx, tokens, V):
    dE = np.zeros((V, dx.shape[-1]), dtype=dx.dtype)
    np.add.at(dE, tokens, dx)
    return dE


def combine_micro_batches(grads, counted):
    total = sum(counted)  # each micro-batch enters with weight n_i / Σ n
    return {k: sum(n / total * g[k] for g, n in zip(grads, counted, strict=True)) for k in grads[0]}
