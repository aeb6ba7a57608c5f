"""The embedded base model and its tokenizer against transformers: the shipped folder is a standard
Hugging Face checkpoint, tokenized and answered the same way by both libraries."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minift.data.tasks import generate_answers, pretrain_heldout, task_splits, task_tokenizer  # noqa: E402
from minift.model import model_forward  # noqa: E402
from minift.testing import assert_close  # noqa: E402
from minift.tools.cli import main  # noqa: E402
from minift.tools.finetune import attach_adapter  # noqa: E402
from minift.tools.pretrain import EMBEDDED, load_embedded  # noqa: E402

pytestmark = pytest.mark.crosscheck


def test_transformers_tokenizes_the_tasks_as_minift_does():
    hf = transformers.AutoTokenizer.from_pretrained(EMBEDDED)
    ours = task_tokenizer()
    for ex in pretrain_heldout(0, 2):
        assert hf(ex.prompt)["input_ids"] == ours.encode(ex.prompt)
        assert (
            hf.decode(ours.encode(ex.prompt + ex.answer), skip_special_tokens=True) == ex.prompt + ex.answer
        )


def test_transformers_computes_the_embedded_models_logits_and_answers():
    hf = transformers.AutoModelForCausalLM.from_pretrained(EMBEDDED, torch_dtype=torch.float32).eval()
    model, tok = load_embedded(), task_tokenizer()
    examples = pretrain_heldout(0, 2)
    ids = tok.encode(examples[0].prompt)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits.numpy()
    assert_close(
        model_forward(model, np.array([ids]), train=False)[0], expected, rtol=1e-4, atol=1e-4, what="logits"
    )
    stop = [tok.eos_ids[0], tok.encode("\n", bos=False)[0]]
    for ex, answer in zip(examples, generate_answers(model, tok, examples), strict=True):
        prompt = torch.tensor([tok.encode(ex.prompt)])
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=0)
        assert tok.decode(out[0, prompt.shape[1] :].tolist()).split("\n")[0].strip() == answer


@pytest.mark.parametrize("method", ["lora", "sorsa"])
def test_peft_loads_the_adapter_of_minift_finetune_with_the_logits_minift_generates_from(method, tmp_path):
    peft = pytest.importorskip("peft")
    records = task_splits("min", 0, n_train=16, n_eval=2, n_retention=1).train
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(ex.record) + "\n" for ex in records))
    argv = [
        "finetune",
        "--data",
        data,
        "--method",
        method,
        "--out",
        tmp_path / "run",
        "--steps",
        3,
        "--batch-size",
        4,
        "--rank",
        2,
        "--lr",
        1e-2,
        "--no-progress",
    ]
    assert main([str(a) for a in argv]) == 0
    adapter = tmp_path / "run" / "adapter"
    hf = transformers.AutoModelForCausalLM.from_pretrained(EMBEDDED, attn_implementation="eager").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ids = task_tokenizer().encode(records[0].prompt)
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor([ids])).logits.numpy()
    ours = model_forward(attach_adapter(load_embedded(), adapter), np.array([ids]), train=False)[0]
    base = model_forward(load_embedded(), np.array([ids]), train=False)[0]
    assert np.abs(ours - base).max() > 1e-3  # the adapter changes something
    assert_close(ours, theirs, rtol=0, atol=1e-4, what=f"{method} adapter logits")
