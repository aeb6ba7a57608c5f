# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 13 · Fine-tune an instruction model with chat data on a CPU
#
# **What you will build.** The workflow of a real instruction model, end to end and in seconds: a
# model folder that carries a *chat template*, chat data as `{"messages": [...]}` lines, a look at
# which tokens the loss falls on, an S2FT fine-tune from the command line, a reply through the
# template from an adapter that finds its own base model, and the S2FT adapter exported as an exact
# PEFT LoRA adapter.
#
# **Prerequisites.** Tutorials 08–11.
#
# **Library functions explained here.** `minift.data.chat_template.load_chat_template`,
# `minift.data.chat_template.assistant_spans`, `minift.data.chat.chat_prompt_ids`,
# `minift.data.chat.chat_stop_ids`, `minift.data.encode_example`, `minift.tools.cli.main`,
# `minift.io.provenance.recorded_base`, `minift.io.s2ft_peft.lora_form`.
#
# A real instruction model (SmolLM2-Instruct, Llama 3 Instruct, Qwen2.5-Instruct) goes through every
# step below unchanged: point `--model` at its folder. Here the model is the small embedded base, to
# which we give a chat template of our own, so the tutorial runs anywhere without a download.

# %%
import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minift.data import Tokenizer, encode_example, read_jsonl
from minift.data.chat import chat_prompt_ids, chat_stop_ids
from minift.data.chat_template import assistant_spans, load_chat_template
from minift.data.tasks import perplexity, task_splits
from minift.io.hub import load_pretrained
from minift.io.peft import CONFIG_NAME, WEIGHTS_NAME
from minift.io.provenance import recorded_base
from minift.io.safetensors_io import read_safetensors
from minift.layers.cross_entropy import IGNORE_INDEX
from minift.methods.s2ft import S2FTConfig, s2ft_parameter_count
from minift.optim import Schedule
from minift.tools.cli import main
from minift.tools.finetune import load_with_adapter, merged_model
from minift.tools.pretrain import EMBEDDED

# Every file this tutorial writes goes into a scratch folder that is deleted when Python exits:
# the tutorial can be rerun, from any folder, and leaves the checkout as it found it.
work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)

# %% [markdown]
# ## 1. A model with a chat template
#
# A chat template is a small Jinja2 program in the model folder (`chat_template.jinja`, or the key
# `chat_template` of `tokenizer_config.json`). It turns a list of messages into the exact text the
# model was trained on. Ours starts with the BOS token and writes the question/answer format the
# embedded model knows, and ends a reply with the EOS token — as ChatML ends one with `<|im_end|>`
# and Llama 3 with `<|eot_id|>`.
# `add_generation_prompt` asks for the header that opens the assistant's next turn.

# %%
model_dir = work / "chat-model"
shutil.copytree(EMBEDDED, model_dir)
config_path = model_dir / "tokenizer_config.json"
config = json.loads(config_path.read_text())
config["chat_template"] = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant turns') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)
config_path.write_text(json.dumps(config, indent=2))

template = load_chat_template(model_dir)
chat = [{"role": "user", "content": "shift abc"}, {"role": "assistant", "content": "bcd"}]
print(repr(template.render(chat)))
print(repr(template.render(chat[:1], add_generation_prompt=True)))

# %% [markdown]
# ## 2. Chat data and the loss mask
#
# One conversation per JSONL line. The loss must fall on what the *assistant* says — the replies and
# the token that ends them (how the model learns to stop) — never on the user's text or the headers.
# transformers marks assistant text with a `{% generation %}` tag that most templates lack, so minift
# finds each reply by rendering twice: the conversation before the reply with the assistant header,
# and the conversation up to the end of the reply. The characters in between are the reply's.

# %%
tokenizer = Tokenizer.from_pretrained(model_dir)
text, spans = assistant_spans(tokenizer.chat_template, chat)
print("learned text:", [text[a:b] for a, b in spans])
example = encode_example(tokenizer, {"messages": chat})
learned = [t for t, label in zip(example.ids, example.labels, strict=True) if label != IGNORE_INDEX]
print("learned tokens:", repr(tokenizer.decode(learned, skip_special_tokens=False)))
assert tokenizer.decode(learned, skip_special_tokens=False) == "bcd</s>"

# %% [markdown]
# The "shift" task (each letter moves one on) as chat data:

# %%
splits = task_splits("shift", 0, n_train=96, n_eval=8, n_retention=1)


def as_chat(example):
    question = example.prompt.removeprefix("Q: ").removesuffix("\nA: ")
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": example.answer}]}


train_file, test_file = work / "train.jsonl", work / "test.jsonl"
train_file.write_text("".join(json.dumps(as_chat(e)) + "\n" for e in splits.train))
test_file.write_text("".join(json.dumps(as_chat(e)) + "\n" for e in splits.test))
print(train_file.read_text().splitlines()[0])

# %% [markdown]
# ## 3. Fine-tune with S2FT from the command line
#
# `minift finetune` prints the trainable count and the heads and channels S2FT chose in every layer,
# and writes them to `finetune.json`. Outside a terminal there is no progress bar, only one summary
# line, whose peak memory is this process's own (not a parent's).

# %%
run_dir = work / "run"
assert main(["finetune", "--model", str(model_dir), "--data", str(train_file), "--method", "s2ft",
             "--heads", "1", "--channels", "48", "--steps", "60", "--batch-size", "16", "--lr", "1e-2",
             "--out", str(run_dir), "--no-progress"]) == 0
record = json.loads((run_dir / "finetune.json").read_text())
print(record["trainable_parameters"], "trainable;", record["s2ft"]["layers"]["0"])

# %% [markdown]
# ## 4. The adapter knows its base
#
# The adapter folder records the base model's folder and a fingerprint of its config and weights
# (`minift_base.json`), so `generate`, `eval` and `export` need only `--adapter`. `--chat TEXT`
# renders the message with the template and stops at the end-of-turn token.

# %%
base, fingerprint = recorded_base(run_dir / "adapter")
print(base, sorted(fingerprint))
assert Path(base) == model_dir.resolve()
assert main(["generate", "--adapter", str(run_dir / "adapter"), "--chat", "shift abc",
             "--max-new-tokens", "8"]) == 0
assert main(["eval", "--adapter", str(run_dir / "adapter"), "--data", str(test_file)]) == 0

test_chats = read_jsonl(test_file)
before = perplexity(load_pretrained(model_dir), tokenizer, test_chats)
after = perplexity(load_with_adapter(None, run_dir / "adapter")[0], tokenizer, test_chats)
print(f"test perplexity of the replies: base {before:.0f}, fine-tuned {after:.1f}")
assert after < before / 10

# %% [markdown]
# What `--chat` did, by hand: the prompt ids, and the ids generation stops at.

# %%
print(tokenizer.decode(chat_prompt_ids(tokenizer, chat[:1]), skip_special_tokens=False))
print("stops at", chat_stop_ids(tokenizer))

# %% [markdown]
# ## 5. S2FT as an exact LoRA adapter
#
# S2FT changed a few input columns of each O and Down weight: ΔW = ΔW[:, idx] E_idx, where E_idx
# holds the rows of the identity that pick idx. That is a LoRA product of rank |idx| with
# lora_B = ΔW[:, idx] and lora_A = E_idx, so every LoRA serving stack can load it. The ranks differ
# by module (heads and channels differ in width), which PEFT's `rank_pattern` expresses.

# %%
assert main(["export", "--adapter", str(run_dir / "adapter"), "--peft", str(work / "peft")]) == 0
peft_config = json.loads((work / "peft" / CONFIG_NAME).read_text())
print("r", peft_config["r"], "rank_pattern", peft_config["rank_pattern"])
factors, _ = read_safetensors(work / "peft" / WEIGHTS_NAME)
base_model = load_pretrained(model_dir)
tuned, _, _ = load_with_adapter(None, run_dir / "adapter")
tuned = merged_model(tuned)
for i in range(base_model.config.n_layers):
    key = f"base_model.model.model.layers.{i}.self_attn.o_proj"
    A, B = factors[f"{key}.lora_A.weight"], factors[f"{key}.lora_B.weight"]
    np.testing.assert_array_equal(base_model.blocks[i].o.weight + B @ A, tuned.blocks[i].o.weight)
print("W + B A equals the fine-tuned weights exactly, in every layer")

# %% [markdown]
# The price of the LoRA form: A is a one-hot selector, yet a LoRA stack multiplies by it, so the
# form stores (O + I)·S numbers per module where S2FT stores O·S, and served unmerged it computes
# x A and (x A) B for every token. Merged into the weights, both cost nothing per token.
#
# ## Exercises
#
# 1. Train on `--s2ft-head-targets q,k,v,o --s2ft-channel-targets gate,up,down` and compare the
#    trainable count with the default (O and Down only). Give the count for one layer as a formula
#    in the selected heads and channels (a key/value head's K and V rows are shared by its G query
#    heads and train whole).
# 2. Run the fine-tune again with `--steps 120 --extend`: it continues from step 60, with the learning
#    rate schedule re-planned to 120 steps. Does the test perplexity improve? Which learning rate
#    does step s (counted from 0) use after the extension, with `finetune`'s default schedule
#    (`linear`, no warm-up: lr_max · (T − s) / T for a run of T steps)?
# 3. Write the exact LoRA factors of an S2FT column update by hand (the check cell below): what
#    `minift export --peft` writes for O and Down.
#
# Solutions: `tutorials/solutions/13_instruction_models_on_a_cpu.py`.

# %% [markdown]
# ### Check cells
#
# Write each answer in its function below, in place of `return None`, and run the cell: the
# check prints "not answered yet" while a function returns None, "correct" when your answer is
# right, and otherwise stops with an `AssertionError` that says what is wrong. (Each solution in
# `tutorials/solutions/` defines the same functions.)

# %%
def every_target_parameters(heads, n_channels, C, D, G):
    """Exercise 1: the parameters S2FT trains in one layer with heads on q, k, v, o and channels on
    gate, up, down, for the selected query heads `heads` and n_channels channels; width C, head
    width D, G query heads per key/value head."""
    return None  # your code here


def check_every_target_parameters(every_target_parameters):
    if every_target_parameters((0,), 1, 8, 4, 2) is None:
        print("exercise 1: not answered yet")
        return
    cfg = load_pretrained(model_dir).config
    G = cfg.n_heads // cfg.n_kv_heads
    every = S2FTConfig(heads=1, channels=1, head_targets=("q", "k", "v", "o"),
                       channel_targets=("gate", "up", "down"))
    for heads, channels in (((0,), (3,)), ((0, 1), (1, 2)), ((0, G), ()), (tuple(range(cfg.n_heads)), (5,))):
        expected = s2ft_parameter_count(cfg, every, selection={0: (heads, channels)})
        got = every_target_parameters(heads, len(channels), cfg.hidden_size, cfg.head_dim, G)
        assert got == expected, f"heads {heads}, {len(channels)} channels: {got}, expected {expected}"
    print("exercise 1: correct")


check_every_target_parameters(every_target_parameters)


# %%
def extended_lr(step, lr_max, old_steps, new_steps):
    """Exercise 2: the learning rate of step `step` (from 0) of a run of old_steps steps extended to
    new_steps with --extend, under finetune's default schedule (linear, no warm-up)."""
    return None  # your code here


def check_extended_lr(extended_lr):
    if extended_lr(0, 1.0, 1, 2) is None:
        print("exercise 2: not answered yet")
        return
    for step in (0, 30, 59, 60, 90, 119):
        expected = Schedule(1e-2, 120)(step)
        got = extended_lr(step, 1e-2, 60, 120)
        assert abs(got - expected) <= 1e-15, f"step {step}: {got}, the re-planned schedule gives {expected}"
    print("exercise 2: correct")


check_extended_lr(extended_lr)

# %%
def lora_form(delta, columns, n_in):
    """Exercise 3: the LoRA factors (A: (S, n_in), B: (n_out, S)) of an S2FT update that adds
    `delta` (n_out, S) to the input columns `columns` of an (n_out, n_in) weight: B @ A must be the
    whole (n_out, n_in) update, zero outside those columns."""
    return None  # your code here


def check_lora_form(lora_form):
    if lora_form(np.zeros((2, 1)), [0], 3) is None:
        print("exercise 3: not answered yet")
        return
    rng = np.random.default_rng(0)
    for n_out, n_in, columns in ((4, 6, [1, 4]), (3, 5, [3, 0, 2])):
        delta = rng.standard_normal((n_out, len(columns)))
        A, B = lora_form(delta, columns, n_in)
        assert np.shape(A) == (len(columns), n_in), f"A has shape {np.shape(A)}"
        assert np.shape(B) == (n_out, len(columns)), f"B has shape {np.shape(B)}"
        update = np.zeros((n_out, n_in))
        update[:, columns] = delta
        np.testing.assert_allclose(B @ A, update, atol=1e-12, err_msg=f"columns {columns}")
    print("exercise 3: correct")


check_lora_form(lora_form)
