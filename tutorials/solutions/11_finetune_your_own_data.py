# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 11 · Fine-tuning on your own data

# %%
import atexit
import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minift import loss_and_grads
from minift.data import BatchStream, collate, encode_example, read_jsonl
from minift.data.tasks import pretrain_heldout, task_tokenizer
from minift.methods import method_record
from minift.methods.registry import get_method
from minift.methods.s2ft import S2FTConfig, apply_s2ft, unpermute
from minift.tools.pretrain import load_embedded
from minift.train import TrainConfig, train

# Every file this tutorial writes goes into a scratch folder that is deleted when Python exits:
# the tutorial can be rerun, from any folder, and leaves the checkout as it found it.
work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)

tokenizer = task_tokenizer()
quick = dict(schedule="cosine", warmup_steps=2, progress=False)

# %% [markdown]
# ## 1. Plain text
#
# With `{"text": …}` every token is a target (BOS, text, EOS), so `labels == ids`; with
# prompt/completion only the completion and EOS are.

# %%
with open(work / "notes.jsonl", "w", encoding="utf-8") as f:
    for line in ("the cat sat on the mat.", "a dog ran in the park.", "the sun is warm today."):
        f.write(json.dumps({"text": line}) + "\n")
text_examples = [encode_example(tokenizer, r) for r in read_jsonl(work / "notes.jsonl")]
assert all(e.labels == e.ids for e in text_examples)
print("every token counts:", text_examples[0].labels[:8], "…")

base = load_embedded()  # the tutorial's base model
lora = get_method("lora")
model = lora.apply(copy.deepcopy(base), lora.Config(r=4, alpha=8.0), np.random.default_rng(1))
run = train(model, BatchStream(text_examples, 3, tokenizer.pad_id), TrainConfig(steps=25, lr=2e-2, **quick))
print(f"LoRA on plain text: loss {run.losses[0]:.2f} → {run.losses[-1]:.2f}")
assert run.losses[-1] < run.losses[0]

# %% [markdown]
# ## 2. Where did it forget?
#
# Measure the loss on held-out *pretraining* prompts before and after fine-tuning on a new skill.
# Full fine-tuning moves every weight; S2FT moves a few columns, so its function can drift less
# far from the base — the paper's argument for its better out-of-domain retention. At this
# miniature scale the retention numbers are only indicative (run it with several seeds before
# concluding anything); how much of the model changed is unambiguous.

# %%
r = np.random.default_rng(0)
triples = [tuple(int(d) for d in r.integers(0, 10, 3)) for _ in range(64)]
task = [encode_example(tokenizer, {"prompt": f"Q: min {a} {b} {c}\nA: ", "completion": str(min(a, b, c))})
        for a, b, c in triples]  # the tutorial's new skill
retention = collate([encode_example(tokenizer, ex.record) for ex in pretrain_heldout(0, 4)],
                    tokenizer.pad_id)


def retention_loss(model):
    return loss_and_grads(model, retention.tokens, retention.targets,
                          attention_mask=retention.attention_mask)[0]


full = get_method("full").apply(copy.deepcopy(base), None, None)
s2 = apply_s2ft(copy.deepcopy(base), S2FTConfig(heads=1, channels=8), rng=np.random.default_rng(0))
for model in (full, s2):  # the same learning rate for both
    train(model, BatchStream(task, 16, tokenizer.pad_id), TrainConfig(steps=20, lr=3e-3, **quick))
unpermute(s2)


def entries_changed(model):
    return sum(int((s1.dense_weight() != s0.weight).sum())
               for b0, b1 in zip(base.blocks, model.blocks, strict=True)
               for (_, s0), (_, s1) in zip(b0.slots(), b1.slots(), strict=True))


print(f"retention loss: base {retention_loss(base):.3f}, full FT {retention_loss(full):.3f}, "
      f"S2FT {retention_loss(s2):.3f}")
print(f"projection entries changed: full FT {entries_changed(full)}, S2FT {entries_changed(s2)}")
assert entries_changed(s2) < 0.1 * entries_changed(full)

# %% [markdown]
# ## 3. S2FT with small activations
#
# Activation scores need calibration batches of (tokens, targets); the "small" variant picks the
# heads and channels whose inputs are smallest on them (the paper's best in Table 4).

# %%
data = BatchStream(task, 16, tokenizer.pad_id)
calib = [(data.batch(i).tokens, data.batch(i).targets) for i in range(2)]
small = apply_s2ft(copy.deepcopy(base), S2FTConfig(heads=1, channels=8, strategy="activation",
                                                   variant="small"), calib)
print("selected (heads, channels) per layer:",
      {i: (d["heads"], d["channels"]) for i, d in method_record(small).state["layers"].items()})
run = train(small, data, TrainConfig(steps=20, lr=1e-2, **quick))
print(f"S2FT-A (small): loss {run.losses[0]:.2f} → {run.losses[-1]:.2f}")
assert run.losses[-1] < run.losses[0]


# %% [markdown]
# ## The answers for the tutorial's check cells

# %%
def text_labels(ids):
    return list(ids)  # plain text: every token is a target, BOS and EOS included


def calibration_batches(stream, n):
    return [(stream.batch(i).tokens, stream.batch(i).targets) for i in range(n)]
