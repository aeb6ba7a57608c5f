# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Solutions to tutorial 13 · Instruction models on a CPU

# %%
import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minift.data import Tokenizer, read_jsonl
from minift.data.tasks import perplexity, task_splits
from minift.tools.cli import main
from minift.tools.finetune import load_with_adapter
from minift.tools.pretrain import EMBEDDED

work = Path(tempfile.mkdtemp(prefix="minift-tutorial-"))  # deleted when Python exits
atexit.register(shutil.rmtree, work, ignore_errors=True)
model_dir = work / "chat-model"
shutil.copytree(EMBEDDED, model_dir)
config = json.loads((model_dir / "tokenizer_config.json").read_text())
config["chat_template"] = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
    "{% else %}{{ 'A: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)
(model_dir / "tokenizer_config.json").write_text(json.dumps(config))
splits = task_splits("shift", 0, n_train=64, n_eval=8, n_retention=1)


def write_chats(path, examples):
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": e.prompt.removeprefix("Q: ").removesuffix("\nA: ")},
        {"role": "assistant", "content": e.answer}]}) + "\n" for e in examples))
    return path


train_file = write_chats(work / "train.jsonl", splits.train)
test_file = write_chats(work / "test.jsonl", splits.test)


def finetune(out, *extra):
    argv = ["finetune", "--model", str(model_dir), "--data", str(train_file), "--method", "s2ft",
            "--heads", "1", "--channels", "16", "--batch-size", "16", "--lr", "1e-2", "--out", str(out),
            "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads((Path(out) / "finetune.json").read_text())


# %% [markdown]
# ## 1. Every S2FT target
#
# With heads on q, k, v and o and channels on gate, up and down, each chosen head and channel trains
# more matrices: the trainable count grows (k and v add whole key/value heads of the group).

# %%
default = finetune(work / "default", "--steps", "2")
every = finetune(work / "every", "--steps", "2", "--s2ft-head-targets", "q,k,v,o",
                 "--s2ft-channel-targets", "gate,up,down")
print("trainable:", default["trainable_parameters"], "(o, down) vs", every["trainable_parameters"], "(all)")
assert every["trainable_parameters"] > 2 * default["trainable_parameters"]

# %% [markdown]
# ## 2. Extending a finished run
#
# The extension restores step 30 bit for bit and trains 30 more steps under the 60-step schedule.

# %%
tokenizer = Tokenizer.from_pretrained(model_dir)
chats = read_jsonl(test_file)
finetune(work / "run", "--steps", "30")
short = perplexity(load_with_adapter(None, work / "run" / "adapter")[0], tokenizer, chats)
record = finetune(work / "run", "--steps", "60", "--extend")
longer = perplexity(load_with_adapter(None, work / "run" / "adapter")[0], tokenizer, chats)
print(f"test perplexity after 30 steps {short:.1f}, after extending to {record['steps']}: {longer:.1f}")
assert record["steps"] == 60


# %% [markdown]
# ## 3. The LoRA form of a column update
#
# A selects the columns (row k of A is the unit vector of input column `columns[k]`), B holds the
# update: (B A)[:, j] = Σ_k delta[:, k] [j = columns[k]], exactly the update in its columns.

# %%
def lora_form(delta, columns, n_in):
    A = np.eye(n_in)[columns]  # (S, n_in)
    return A, delta


A, B = lora_form(np.arange(6.0).reshape(3, 2), [2, 0], 4)
print(B @ A)


# %% [markdown]
# ## The answers for the other check cells
#
# Per selected query head, D rows of Q and D columns of O; per key/value head that a selected head
# reads, D rows of K and of V (whole: its G query heads share them); per channel, a row of Gate and
# of Up and a column of Down. After `--extend` the schedule is the one a fresh 120-step run would
# use, at every step: the old plan's total no longer matters.

# %%
def every_target_parameters(heads, n_channels, C, D, G):
    return 2 * D * C * len(heads) + 2 * D * C * len({h // G for h in heads}) + 3 * C * n_channels


def extended_lr(step, lr_max, old_steps, new_steps):
    return lr_max * (new_steps - step) / new_steps
