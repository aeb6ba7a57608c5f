# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 05 · Checkpoints and generation

# %%
import atexit
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from minift import ModelConfig, init_model, model_forward
from minift.errors import CheckpointError
from minift.generate import generate
from minift.io.hub import load_pretrained, save_pretrained
from minift.io.safetensors_io import bf16_to_float32, float32_to_bf16, read_safetensors, write_safetensors

# Every file this tutorial writes goes into a scratch folder that is deleted when Python exits:
# the tutorial can be rerun, from any folder, and leaves the checkout as it found it.
work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)

config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, n_layers=2, n_heads=4,
                     n_kv_heads=2)
model = init_model(config, np.random.default_rng(0))

# %% [markdown]
# ## 1. The work a KV cache saves
#
# Without a cache, step i reprocesses all P + i tokens: Σ_{i=0}^{n−1} (P + i) = nP + n(n−1)/2.
# With a cache: P for the prefill plus 1 per new token, P + n − 1.

# %%
P, n = 10, 30
print("tokens processed without cache:", n * P + n * (n - 1) // 2, " with cache:", P + n - 1)

prompt = np.random.default_rng(1).integers(0, 50, size=(1, 64))


def without_cache(steps):
    seq = prompt
    for _ in range(steps):
        logits, _ = model_forward(model, seq, train=False)
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return seq[0, prompt.shape[1]:].tolist()


t0 = time.perf_counter()
slow = without_cache(32)
t1 = time.perf_counter()
fast = generate(model, prompt.tolist(), max_new_tokens=32, eos_ids=[])[0]
t2 = time.perf_counter()
assert slow == fast
print(f"32 tokens after a 64-token prompt: {t1 - t0:.3f} s without cache, {t2 - t1:.3f} s with")

# %% [markdown]
# ## 2. A missing tensor

# %%
def drop_tensor(folder, name):
    tensors, metadata = read_safetensors(folder / "model.safetensors")
    del tensors[name]
    write_safetensors(folder / "model.safetensors", tensors, metadata=metadata)  # the dict is not the file
    return folder


folder = drop_tensor(save_pretrained(model, work / "m"), "model.layers.1.mlp.up_proj.weight")
try:
    load_pretrained(folder)
    message = ""
except CheckpointError as e:
    message = str(e)
print("CheckpointError:", message)
assert "up_proj" in message, "a checkpoint with a missing tensor must not load"

# %% [markdown]
# ## 3. Half precision
#
# bfloat16 keeps float32's exponent range but only 8 bits of mantissa (~3 significant digits):
# weights move by up to ~0.4 %, logits by a little more. A greedy choice changes only where its
# two best tokens are closer than that; once one flips, the continuation differs from there on.
# The last line below counts how many greedy tokens agree before the first difference.
#
# Rounding to nearest, ties to even, with integers: add 0x7FFF plus the lowest kept bit to the
# float32's bits, then clear the low 16. A carry out of the mantissa correctly bumps the exponent.
# (Truncating, `bits & 0xFFFF0000`, always rounds towards zero: a bias of half a bf16 step.)

# %%
def round_to_bf16(x):
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    kept_lsb = (bits >> 16) & 1
    rounded = (bits + np.uint32(0x7FFF) + kept_lsb) & np.uint32(0xFFFF0000)
    return rounded.astype(np.uint32).view(np.float32)


w = model.blocks[0].q.weight
assert np.array_equal(round_to_bf16(w), bf16_to_float32(float32_to_bf16(w)))
print(f"largest relative change of a weight in bf16: {np.abs(round_to_bf16(w) / w - 1).max():.2%}")

folder = save_pretrained(model, work / "m16")
tensors, metadata = read_safetensors(folder / "model.safetensors")
write_safetensors(folder / "model.safetensors", tensors, metadata=metadata, bf16=True)
half = load_pretrained(folder)
tokens = prompt[:, :16]
full_logits, _ = model_forward(model, tokens, train=False)
half_logits, _ = model_forward(half, tokens, train=False)
rel = np.abs(half_logits - full_logits).max() / np.abs(full_logits).max()
print(f"largest change of a logit with bf16 weights, relative to the largest logit: {rel:.2e}")
assert 0 < rel < 5e-2
greedy32 = generate(model, tokens.tolist(), max_new_tokens=24, eos_ids=[])[0]
greedy16 = generate(half, tokens.tolist(), max_new_tokens=24, eos_ids=[])[0]
agree = next((i for i, (a, b) in enumerate(zip(greedy32, greedy16, strict=True)) if a != b), len(greedy32))
print(f"greedy generation: the first {agree} of {len(greedy32)} tokens agree in bf16 and float32")


# %% [markdown]
# ## The answers for the tutorial's check cells

# %%
def tokens_processed(P, n, cached):
    return P + n - 1 if cached else n * P + n * (n - 1) // 2
