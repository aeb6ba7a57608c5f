# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 11 · Fine-tune a small model on your own data with every method, and compare
#
# **What you will build.** The whole workflow end to end, with your own data: a JSONL file of
# prompt/completion pairs, a base model, the five methods of this project — full fine-tuning,
# LoRA, PiSSA, SORSA and S2FT — trained by the same loop at matched budgets, and a comparison of
# what each costs and what each learns — a small, fast version of a full study.
#
# **Prerequisites.** Tutorials 04–10 (you have met every piece; this one puts them together).
#
# **Library functions explained here.** `minift.data.read_jsonl`, `minift.data.encode_example`,
# `minift.data.BatchStream`, `minift.data.tasks.task_tokenizer`, `minift.data.tasks.generate_answers`,
# `minift.data.tasks.exact_match`, `minift.data.collate`, `minift.tools.pretrain.load_embedded`,
# `minift.train.train`, `minift.train.TrainConfig`, `minift.methods.registry.get_method`,
# `minift.methods.sorsa.gradient_hook`, `minift.methods.s2ft.apply_s2ft`,
# `minift.methods.full.to_dense`, `minift.io.hub.save_pretrained`.

# %%
import atexit
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from minift import loss_and_grads, trainable_parameters
from minift.data import BatchStream, collate, encode_example, read_jsonl
from minift.data.tasks import (
    TaskExample,
    exact_match,
    generate_answers,
    pretrain_heldout,
    task_tokenizer,
)
from minift.io.hub import save_pretrained
from minift.methods.full import to_dense
from minift.methods.registry import get_method
from minift.methods.s2ft import apply_s2ft, match_lora_budget, unpermute
from minift.methods.sorsa import gradient_hook
from minift.tools.measure import step_memory
from minift.tools.pretrain import load_embedded
from minift.train import TrainConfig, train


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


# Every file this tutorial writes goes into a scratch folder that is deleted when Python exits:
# the tutorial can be rerun, from any folder, and leaves the checkout as it found it.
work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)

# %% [markdown]
# ## 1. Your data
#
# Any JSONL file whose lines are `{"prompt": …, "completion": …}` (the loss counts on the
# completion only) or `{"text": …}` (every token counts). Here we write one: the smallest of three
# digits, in the instruction format of minift's embedded tasks, `Q: <question>\nA: <answer>`. The
# base model below learned `max a b c` in pretraining but never saw `min`: a new skill next to one
# it has. Replace the file with yours; a malformed line raises a `DataError` naming the file and
# the line.

# %%
rng = np.random.default_rng(0)
triples = [tuple(int(d) for d in f"{n:03d}") for n in rng.permutation(1000)]  # every (a, b, c), shuffled
test_triples, train_triples = triples[:40], triples[40:640]  # 40 held out, never trained on


def question(t):
    return f"Q: min {t[0]} {t[1]} {t[2]}\nA: "


with open(work / "min.jsonl", "w", encoding="utf-8") as f:
    for t in train_triples:
        f.write(json.dumps({"prompt": question(t), "completion": str(min(t))}) + "\n")
records = read_jsonl(work / "min.jsonl")
test = [TaskExample(question(t), str(min(t)), "min") for t in test_triples]
print(len(records), "training records, e.g.", records[0])

# %% [markdown]
# The tokenizer is the embedded tasks' character-level one. `encode_example` adds BOS and EOS and
# masks the prompt with −100; `BatchStream` pads, shifts and shuffles, deterministically under a
# seed.

# %%
tokenizer = task_tokenizer()
examples = [encode_example(tokenizer, r) for r in records]
data = BatchStream(examples, batch_size=8, pad_id=tokenizer.pad_id, seed=0)
print("one example:", examples[0].ids, "\nlabels:     ", examples[0].labels)

# %% [markdown]
# ## 2. A base model
#
# minift ships a small pretrained Llama (`minift.tools.pretrain.load_embedded`: 4 layers, width
# 128, trained by `minift pretrain` on the embedded tasks' pretraining mix). Asked for a minimum,
# it answers something else — the exact match below is 0 of 40.

# %%
base = load_embedded()
print("the embedded base model:", base.config.n_layers, "layers, width", base.config.hidden_size)
print("its answers to the first test questions:",
      generate_answers(base, tokenizer, test[:5], max_new_tokens=3), "— right:",
      [ex.answer for ex in test[:5]])

# %% [markdown]
# ## 3. Every method, one loop
#
# Each method module has the same small API (`minift.methods.registry.get_method(name)`: `Config`,
# `apply(model, config, rng)`, `merge`), and S2FT has `apply_s2ft`; the training loop
# `minift.train.train` trains whatever `trainable_parameters(model)` returns. The budgets are
# matched: LoRA, PiSSA and SORSA at rank 4 on q, k, v, up, down, and S2FT with the heads and
# channels `match_lora_budget` gives for that rank. SORSA adds its orthonormal regularizer through
# the loop's gradient hook. Every method runs the same 150 steps of 8 examples (two passes over the
# 600 records) with a cosine schedule; learning rates differ per method, as they do in the papers —
# adapters whose updates start small need larger ones, and S2FT, which trains the fewest
# directions per matrix, the largest. (The rates were picked by trying a few on this task.)

# %%
targets = ("q", "k", "v", "up", "down")
steps = 150


def make(name):
    model = copy.deepcopy(base)
    r = np.random.default_rng(1)
    if name == "S2FT":
        return apply_s2ft(model, match_lora_budget(model.config, rank=4), rng=r), [], 1e-1
    if name == "full":
        return get_method("full").apply(model, None, r), [], 3e-3
    module = get_method(name.lower())
    if name == "SORSA":
        cfg = module.Config(r=4, targets=targets)
        return module.apply(model, cfg, r), [gradient_hook(cfg)], 5e-3
    cfg = module.Config(r=4, alpha=8.0, targets=targets)
    return module.apply(model, cfg, r), [], 1e-2 if name == "LoRA" else 5e-3


test_batch = collate([encode_example(tokenizer, ex.record) for ex in test], tokenizer.pad_id)


def held_out(model):
    """Mean loss on the test answers given their prompts, and greedy exact match."""
    loss, _ = loss_and_grads(model, test_batch.tokens, test_batch.targets,
                             attention_mask=test_batch.attention_mask)
    answers = generate_answers(model, tokenizer, test, max_new_tokens=3)
    return loss, exact_match(answers, test)


before = held_out(base)
results = {}
for name in ("full", "LoRA", "PiSSA", "SORSA", "S2FT"):
    model, hooks, lr = make(name)
    n_params = sum(p.size for p in trainable_parameters(model).values())
    memory = step_memory(model, [data.batch(0)]).step_peak_bytes  # lr = 0: measures, changes nothing
    run = train(model, data, TrainConfig(steps=steps, lr=lr, schedule="cosine", warmup_steps=4,
                                         progress=False), grad_hooks=hooks)
    test_loss, accuracy = held_out(model)
    results[name] = dict(params=n_params, loss=(run.losses[0], float(np.mean(run.losses[-10:]))),
                         curve=np.array(run.losses),
                         seconds=run.wall_s, memory=memory, test_loss=test_loss, accuracy=accuracy,
                         model=model)

print(f"before fine-tuning: test loss {before[0]:.3f}, exact match {before[1]:.2f}")
print("train loss: first step → mean of the last 10 (one step's loss is noisy)")
print(f"{'method':>6} {'trainable':>10} {'train loss':>15} {'step peak':>10} {'time':>7} "
      f"{'test loss':>9} {'exact':>6}")
for name, r in results.items():
    print(f"{name:>6} {r['params']:>10} {r['loss'][0]:6.3f} → {r['loss'][1]:6.3f} "
          f"{r['memory'] / 2**20:6.2f} MiB {r['seconds']:6.2f}s {r['test_loss']:9.3f} {r['accuracy']:6.2f}")

# %% [markdown]
# What the table shows (the assertions below check what must hold on any machine): every method
# learns the new skill — the training loss falls, so does the loss on the 40 *held-out* questions,
# and exact match rises from the base's 0 to a clear majority of them; the four parameter-efficient
# methods train a few percent of what full fine-tuning trains, at matched budgets; and S2FT's
# training step keeps the least memory. On this seed full FT, LoRA, PiSSA and SORSA answer all or
# all but one of the 40 right, and S2FT about two thirds: it changes only a few whole columns of O
# and Down per layer, and at matched budgets needs more steps than the low-rank methods here (its
# training loss is still falling). Accuracy
# and time depend on the seed and the machine: a real comparison uses several seeds and proper
# evaluation splits (`minift.data.tasks.task_splits` has train, validation, test, near-out-of-domain
# and retention splits for the embedded tasks; `minift study` runs them).

# %%
assert before[1] == 0.0
for name, r in results.items():
    assert r["loss"][1] < r["loss"][0], name
    assert r["test_loss"] < before[0], name
    assert r["accuracy"] >= 0.4, name  # the base: 0
peft = {n: r["params"] for n, r in results.items() if n != "full"}
assert max(peft.values()) < 0.2 * results["full"]["params"]
assert max(peft.values()) < 1.2 * min(peft.values())  # matched budgets
assert results["S2FT"]["memory"] < results["full"]["memory"]

# %% [markdown]
# The same runs as pictures: the training loss, the step memory and the held-out exact match. One
# step's loss is that of one batch of 8 and jumps from batch to batch, so the curves show a
# trailing mean: at step t, the mean of the losses of steps t−9 … t (fewer at the start).

# %%
def trailing_mean(x, window=10):
    c = np.cumsum(np.insert(x, 0, 0.0))
    lo = np.maximum(np.arange(1, len(x) + 1) - window, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(x) + 1) - lo)


fig, axes = plt.subplots(1, 3, figsize=(12, 3))
names = list(results)
for n in names:
    axes[0].plot(trailing_mean(results[n]["curve"]), label=n)
axes[0].set_yscale("log")
axes[0].set_xlabel("step")
axes[0].set_ylabel("train loss (trailing mean of 10 steps)")
axes[0].legend(fontsize=8)
axes[1].bar(names, [results[n]["memory"] / 2**20 for n in names])
axes[1].set_ylabel("training step peak (MiB)")
axes[2].bar(names, [results[n]["accuracy"] for n in names])
axes[2].axhline(before[1], color="k", linestyle="--", label="base")
axes[2].set_ylabel("held-out exact match")
axes[2].legend()
fig.tight_layout()
show(fig, "11_methods")

# %% [markdown]
# ## 4. Ship the result
#
# Any method's result can be written as an ordinary Hugging Face checkpoint: `to_dense` folds
# adapters into plain dense weights (for S2FT, after `unpermute` restores the original
# coordinates), and `save_pretrained` writes the folder. It then loads anywhere a Llama loads —
# in minift, or in transformers.

# %%
s2ft_model = unpermute(results["S2FT"]["model"])
folder = save_pretrained(to_dense(s2ft_model), work / "min-s2ft")
print("wrote", sorted(p.name for p in folder.iterdir()))

# %% [markdown]
# ## Summary
#
# * Your data is a JSONL file; `encode_example` masks the prompt, `BatchStream` batches it.
# * Every method is "apply, then the same training loop"; SORSA adds a gradient hook.
# * Compare at matched budgets, and measure rather than guess: trainable parameters, step memory,
#   time, and task accuracy.
#
# ## Exercises
#
# 1. **Plain text.** Write a `{"text": …}` JSONL file of a few sentences and fine-tune with LoRA;
#    which tokens does the loss count now? (Look at `encode_example`'s labels.)
# 2. **Where did it forget?** Write `retention_loss(model)`: the mean loss on the answers of the
#    held-out pretraining prompts `minift.data.tasks.pretrain_heldout(0, 4)` given their prompts.
#    Evaluate the fine-tuned full-FT and S2FT models with it and compare with the base.
# 3. **S2FT strategies.** Rerun S2FT with `strategy="activation", variant="small"` (the paper's best)
#    using the first few training batches as calibration data: `apply_s2ft(model, config, calib)`
#    takes them as a list of (tokens, targets) pairs.
#
# Solutions: `tutorials/solutions/11_finetune_your_own_data.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def text_labels(ids):
    """Exercise 1: the labels `encode_example` gives a `{"text": …}` record whose token ids (BOS,
    the text, EOS) are `ids`: the target at each position, −100 where the loss ignores it."""
    return None  # your code here


def check_text_labels(text_labels):
    if text_labels([1, 2]) is None:
        print("exercise 1: not answered yet")
        return
    for text in ("the cat sat.", "a", "Q: min 1 2 3"):
        example = encode_example(tokenizer, {"text": text})
        got = list(text_labels(list(example.ids)))
        assert got == list(example.labels), f"{text!r}: {got}, expected {list(example.labels)}"
    print("exercise 1: correct")


check_text_labels(text_labels)


# %%
def retention_loss(model):
    """Exercise 2: the mean loss on the answers of pretrain_heldout(0, 4), given their prompts."""
    return None  # your code here


def check_retention_loss(retention_loss):
    if retention_loss(base) is None:
        print("exercise 2: not answered yet")
        return
    held = collate([encode_example(tokenizer, ex.record) for ex in pretrain_heldout(0, 4)], tokenizer.pad_id)
    for name, m in (("the base", base), ("the S2FT model", results["S2FT"]["model"])):
        expected = loss_and_grads(m, held.tokens, held.targets, attention_mask=held.attention_mask)[0]
        got = float(retention_loss(m))
        assert abs(got - expected) <= 1e-4 * abs(expected), f"{name}: {got:.5f}, expected {expected:.5f}"
    print("exercise 2: correct")


check_retention_loss(retention_loss)


# %%
def calibration_batches(stream, n):
    """Exercise 3: the first n batches of a BatchStream as the (tokens, targets) pairs apply_s2ft
    takes for its activation-scored selection."""
    return None  # your code here


def check_calibration_batches(calibration_batches):
    if calibration_batches(data, 1) is None:
        print("exercise 3: not answered yet")
        return
    got = list(calibration_batches(data, 2))
    assert len(got) == 2, f"{len(got)} batches, expected 2"
    for i, (tokens, targets) in enumerate(got):
        assert np.array_equal(tokens, data.batch(i).tokens), f"batch {i}: tokens"
        assert np.array_equal(targets, data.batch(i).targets), f"batch {i}: targets (shifted, −100 masked)"
    print("exercise 3: correct")


check_calibration_batches(calibration_batches)
