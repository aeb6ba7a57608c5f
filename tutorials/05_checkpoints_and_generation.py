# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 05 · Hugging Face checkpoints in and out, and generating with a KV cache
#
# **What you will build.** A tiny Llama-style model that has learned one sentence, written as a
# Hugging Face model folder (`config.json`, `model.safetensors`, `tokenizer.json`) that
# transformers can read, loaded back with `load_pretrained` exactly as you would load a real
# checkpoint, and then asked to continue a prompt: greedily and by sampling, with a **KV cache**
# that turns generation from quadratic to linear work per token. Nothing is downloaded: the
# checkpoint is made here.
#
# **Prerequisites.** Tutorials 03 (attention over S ≥ T keys) and 04 (model, training step).
#
# **Library functions explained here.** `minift.io.hub.save_pretrained`, `minift.io.hub.load_pretrained`,
# `minift.io.safetensors_io.read_header`, `minift.data.Tokenizer`, `minift.model.KVCache`,
# `minift.generate.generate`, `minift.generate.SamplingConfig`, `minift.generate.left_pad`,
# and `minift.errors.CheckpointError`.

# %%
import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from minift import (
    ModelConfig,
    init_model,
    loss_and_grads,
    model_forward,
    set_trainable,
    trainable_parameters,
)
from minift.data import Tokenizer
from minift.errors import CheckpointError
from minift.generate import SamplingConfig, generate, left_pad
from minift.io.hub import load_pretrained, save_pretrained
from minift.io.safetensors_io import read_header
from minift.model import KVCache
from minift.optim import AdamW
from minift.testing import assert_close

# Every file this tutorial writes goes into a scratch folder that is deleted when Python exits:
# the tutorial can be rerun, from any folder, and leaves the checkout as it found it.
work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)

# %% [markdown]
# ## 1. A tokenizer and a model worth saving
#
# A real checkpoint comes with a `tokenizer.json` from the `tokenizers` library. Ours is
# character-level: one id per character, plus `<pad>`, `<s>` (BOS) and `</s>` (EOS).

# %%
specials = ["<pad>", "<s>", "</s>"]
chars = sorted(set("the quick brown fox jumps over the lazy dog."))
vocab = {tok: i for i, tok in enumerate(specials + chars)}
hf_tok = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
hf_tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char
hf_tok.decoder = decoders.Fuse()
hf_tok.add_special_tokens(specials)
hf_tok.save(str(work / "tokenizer.json"))
tok = Tokenizer.from_file(work / "tokenizer.json", eos_ids=2, bos_id=1, add_bos=True)

text = "the quick brown fox jumps over the lazy dog."
ids = [*tok.encode(text), 2]  # BOS … EOS
print(len(vocab), "tokens in the vocabulary;", ids[:8], "…")

# %% [markdown]
# Teach a tiny model the sentence (tutorial 04's training step), so that generation has something
# to show.

# %%
config = ModelConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, n_layers=2,
                     n_heads=4, n_kv_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
model = set_trainable(init_model(config, np.random.default_rng(0)))
opt = AdamW(trainable_parameters(model))
seq = np.array([ids])
for _ in range(60):
    loss, grads = loss_and_grads(model, seq[:, :-1], seq[:, 1:])
    opt.step(grads, lr=2e-2)
print(f"loss after 60 steps: {loss:.4f}")
assert loss < 0.05
set_trainable(model, False)

# %% [markdown]
# ## 2. Save as a Hugging Face folder
#
# `save_pretrained` writes what transformers expects: a `config.json` in the architecture's own
# format, the weights as `model.safetensors` under Hugging Face names (`model.layers.0.self_attn
# .q_proj.weight`, …) in PyTorch's `[out, in]` layout, a `generation_config.json`, and the
# tokenizer files. Safetensors is a JSON header followed by raw little-endian arrays — unlike
# pickle (`pytorch_model.bin`), loading it cannot execute code, which is why minift reads only
# safetensors.

# %%
folder = save_pretrained(model, work / "tiny-llama", tokenizer_path=work / "tokenizer.json")
print(sorted(p.name for p in folder.iterdir()))
hf_config = json.loads((folder / "config.json").read_text())
print({k: hf_config[k] for k in ("architectures", "hidden_size", "num_attention_heads",
                                 "num_key_value_heads", "rope_theta")})
header, metadata = read_header(folder / "model.safetensors")
for name in list(header)[:4]:
    print(f"  {name:<45} {header[name].dtype} {list(header[name].shape)}")
print("metadata:", metadata)

# %% [markdown]
# ## 3. Load it back
#
# `load_pretrained(folder)` checks every tensor's name, shape and dtype against `config.json`
# *before* any arithmetic, converts half-precision weights to float32 exactly, and returns a frozen
# `Model`. The folder's extras land in `model.meta`. The round trip is bit-exact:

# %%
loaded = load_pretrained(folder)
print("meta keys:", sorted(loaded.meta))
l0, _ = model_forward(model, seq, train=False)
l1, _ = model_forward(loaded, seq, train=False)
assert np.array_equal(l0, l1)
# the special ids travel in config.json / generation_config.json
tok = Tokenizer.from_file(folder / "tokenizer.json", eos_ids=loaded.config.eos_token_id,
                          bos_id=loaded.config.bos_token_id, add_bos=True)
print("the loaded model computes bit-identical logits; EOS ids:", tok.eos_ids)

# %% [markdown]
# Checkpoints go wrong in practice — a half-copied file, a renamed tensor, a folder with only a
# pickle. Each gives a `CheckpointError` that names the file and what was expected, instead of a
# shape error deep inside a matmul:

# %%
broken = work / "broken"
broken.mkdir()
for f in folder.iterdir():
    (broken / f.name).write_bytes(f.read_bytes())
data = (broken / "model.safetensors").read_bytes()
(broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # a half-copied download
pickled = work / "pickled"
pickled.mkdir()
(pickled / "config.json").write_bytes((folder / "config.json").read_bytes())
(pickled / "pytorch_model.bin").write_bytes(b"not opened: pickle can run code")


def load_error(path):
    try:
        load_pretrained(path)
    except CheckpointError as e:
        return str(e)
    return ""


for path in (broken, pickled):
    message = load_error(path)
    print(f"{path}: CheckpointError: {message}\n")
    assert message, f"{path} must not load"

# %% [markdown]
# ## 4. Generating with a KV cache
#
# Generation repeats: run the model on the sequence so far, pick the next token from the last
# position's logits, append it. Rerunning the whole sequence each time costs O(T) work per layer
# per new token *just for the projections*, and attention over all pairs again. But causal
# attention means the keys and values of earlier positions never change once computed (tutorial
# 03: nothing later can influence them). So keep them: a `KVCache` holds each layer's rotated keys
# and values, and each step feeds only the one new token (T = 1) against S = P + 1 keys: the P
# cached positions and its own (tutorial 03's mask, aligned at the bottom-right corner).
#
# First, the claim itself: logits with a cache equal logits of a full recomputation.

# %%
prompt = np.array([tok.encode("the quick")])
cache = KVCache.empty(config.n_layers)
step_logits = [model_forward(loaded, prompt, kv_cache=cache, train=False)[0][:, -1]]  # prefill
extra = [5, 9, 7]  # any three tokens
for t in extra:
    step_logits.append(model_forward(loaded, np.array([[t]]), kv_cache=cache, train=False)[0][:, -1])
full_seq = np.concatenate([prompt, np.array([extra])], axis=1)
full_logits, _ = model_forward(loaded, full_seq, train=False)
for i, lg in enumerate(step_logits):
    assert_close(lg, full_logits[:, prompt.shape[1] - 1 + i], rtol=1e-5, atol=1e-5, what=f"step {i}")
print("cache holds", cache.length, "positions; cached and recomputed logits agree at every step")

# %% [markdown]
# `generate` wraps that loop: prefill the prompt once, then one token per step until an EOS id or
# `max_new_tokens`. With the default `SamplingConfig()` (temperature 0) it is greedy.

# %%
out = generate(loaded, [tok.encode("the quick")], max_new_tokens=40)
completion = tok.decode(out[0])
print(repr("the quick" + completion))
assert completion.startswith(" brown fox")

# %% [markdown]
# ### A batch of prompts: left padding
#
# Prompts of different lengths are padded on the **left**, so every row's next token is predicted
# at the last column. The attention mask hides the padding, and positions are counted over real
# tokens only, so a padded row generates exactly what it would alone:

# %%
prompts = [tok.encode("the quick brown"), tok.encode("the"), tok.encode("the quick brown fox jumps")]
tokens_padded, mask = left_pad(prompts, pad_id=0)
print("padded shape", tokens_padded.shape, "; attention mask row sums:", mask.sum(axis=1))
together = generate(loaded, prompts, max_new_tokens=16)
alone = [generate(loaded, [p], max_new_tokens=16)[0] for p in prompts]
assert together == alone
for p, o in zip(prompts, together, strict=True):
    print(repr(tok.decode(p) + " ▸ " + tok.decode(o)))

# %% [markdown]
# ### Sampling
#
# With temperature > 0 the logits are divided by the temperature, optionally cut to the top-k
# tokens and to the smallest set whose probability reaches top-p, and a token is drawn with an
# explicit `numpy.random.Generator`: the same seed gives the same text.

# %%
sampling = SamplingConfig(temperature=1.5, top_k=8, top_p=0.95)
a = generate(loaded, prompts[:1], max_new_tokens=20, sampling=sampling, rng=np.random.default_rng(7))
b = generate(loaded, prompts[:1], max_new_tokens=20, sampling=sampling, rng=np.random.default_rng(7))
assert a == b
print("sampled:", repr(tok.decode(a[0])))

# %% [markdown]
# ## Summary
#
# * `save_pretrained` / `load_pretrained` speak the Hugging Face folder format (safetensors only),
#   validate before computing, and round-trip bit-exactly.
# * A KV cache is exact because causal attention never revisits the past; `generate` prefills
#   once, then feeds one token per step.
# * Left padding + a mask + positions counted over real tokens make batched generation equal to
#   one prompt at a time.
#
# ## Exercises
#
# 1. **How much work does the cache save?** Count the tokens the model processes to generate n
#    tokens from a P-token prompt with and without a cache (30 after 10, say). Then time both with
#    `time.perf_counter` on a model with a longer context.
# 2. **A missing tensor.** Save the model, remove one tensor from `model.safetensors` with
#    `minift.io.safetensors_io.read_safetensors` / `minift.io.safetensors_io.write_safetensors`, and
#    read the error `load_pretrained` gives.
# 3. **Half precision.** bfloat16 is the top 16 bits of a float32: the same sign and 8-bit
#    exponent, 7 of the 23 mantissa bits. Write the rounding of float32 values to the nearest
#    bfloat16 (ties to the even one) with integer operations on `x.view(np.uint32)`. Then rewrite
#    `model.safetensors` with bfloat16 weights (`write_safetensors(..., bf16=True)`, which rounds
#    the same way), reload, and measure how far the logits move. Does greedy generation still
#    produce the same tokens?
#
# Solutions: `tutorials/solutions/05_checkpoints_and_generation.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: a check
# prints "not answered yet" while its function returns None, "correct" when your answer is right,
# and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def tokens_processed(P, n, cached):
    """Exercise 1: how many token positions the model runs through to generate n tokens after a
    prompt of P tokens, greedily, with (`cached=True`) or without a KV cache."""
    return None  # your code here


def check_tokens_processed(tokens_processed):
    if tokens_processed(1, 1, True) is None:
        print("exercise 1: not answered yet")
        return
    for P, n in [(10, 30), (1, 1), (5, 2), (64, 32)]:
        # count by running the loops: without a cache every step reruns the whole sequence; with
        # one, the prompt once (the prefill gives the first new token), then one token a step
        without = sum(P + i for i in range(n))
        with_cache = P + (n - 1)
        assert tokens_processed(P, n, False) == without, f"P={P}, n={n}, no cache: expected {without}"
        assert tokens_processed(P, n, True) == with_cache, f"P={P}, n={n}, cached: expected {with_cache}"
    print("exercise 1: correct")


check_tokens_processed(tokens_processed)


# %%
def drop_tensor(folder, name):
    """Exercise 2: rewrite `folder`/model.safetensors without the tensor `name`, keeping the rest;
    return `folder`."""
    return None  # your code here


def check_drop_tensor(drop_tensor):
    copy = save_pretrained(loaded, Path(tempfile.mkdtemp(dir=work)) / "copy")
    name = "model.layers.1.mlp.up_proj.weight"
    if drop_tensor(copy, name) is None:
        print("exercise 2: not answered yet")
        return
    left = read_header(copy / "model.safetensors")[0]
    assert name not in left, f"{name} is still in model.safetensors"
    assert len(left) == len(header) - 1, f"{len(left)} tensors left, expected {len(header) - 1}"
    message = load_error(copy)
    assert message, "the checkpoint without the tensor loaded"
    assert "up_proj" in message, f"the error does not name the tensor: {message}"
    print("exercise 2: correct")


check_drop_tensor(drop_tensor)


# %%
def round_to_bf16(x):
    """Exercise 3: float32 array x rounded to the nearest bfloat16 value (ties to even), returned as
    float32."""
    return None  # your code here


def check_round_to_bf16(round_to_bf16):
    from minift.io.safetensors_io import bf16_to_float32, float32_to_bf16

    x = np.random.default_rng(12).standard_normal(1000).astype(np.float32)
    x[:3] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)]  # exact ties: to the even neighbour
    if round_to_bf16(x) is None:
        print("exercise 3: not answered yet")
        return
    expected = bf16_to_float32(float32_to_bf16(x))
    found = np.asarray(round_to_bf16(x), dtype=np.float32)
    wrong = np.flatnonzero(found != expected)
    assert wrong.size == 0, (f"{wrong.size} of {x.size} values differ, e.g. {x[wrong[0]]!r} → "
                             f"{found[wrong[0]]!r}, expected {expected[wrong[0]]!r} (rounded? ties to even?)")
    print("exercise 3: correct")


check_round_to_bf16(round_to_bf16)
