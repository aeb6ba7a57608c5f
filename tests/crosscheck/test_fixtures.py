"""minift against committed transformers outputs, without torch (runs in every test job).

Each folder under ``fixtures/`` was written by ``make_fixtures.py``: a checkpoint saved by transformers'
own ``save_pretrained`` (the Llama one in bf16, with GQA and llama3 RoPE; GPT-2 in float32) and
``expected.safetensors``, the logits, loss and every parameter gradient transformers computed on a
left-padded batch. minift loads the checkpoint and must reproduce them: logits to 1e-4 (max abs) at
every real position, loss and every gradient to relative error 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minift.io.hub import load_pretrained, to_hf_tensors
from minift.io.safetensors_io import read_header, read_safetensors
from minift.model import loss_and_grads, model_forward, set_trainable
from minift.testing import assert_close

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def load(name: str):
    expected, _ = read_safetensors(FIXTURES / name / "expected.safetensors")
    return load_pretrained(FIXTURES / name), expected


def test_the_fixtures_exist_and_one_is_stored_in_bf16():
    assert NAMES == ["gpt2", "llama_gqa_llama3"]
    dtypes = {i.dtype for i in read_header(FIXTURES / "llama_gqa_llama3" / "model.safetensors")[0].values()}
    assert dtypes == {"BF16"}


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_the_committed_transformers_logits(name):
    model, expected = load(name)
    logits, _ = model_forward(model, expected["tokens"], attention_mask=expected["attention_mask"],
                              train=False)
    real = expected["attention_mask"] == 1
    assert_close(logits[real], expected["logits"][real], rtol=0, atol=1e-4, what=f"{name} logits")


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_every_gradient_match_the_committed_torch_autograd_values(name):
    model, expected = load(name)
    labels = expected["labels"]
    targets = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), -100)], axis=1)  # HF shifts
    loss, grads = loss_and_grads(set_trainable(model), expected["tokens"], targets,
                                 attention_mask=expected["attention_mask"])
    assert abs(loss - float(expected["loss"])) <= 1e-4 * abs(float(expected["loss"]))
    ours = to_hf_tensors(model.config, grads)
    theirs = {k.removeprefix("grad."): v for k, v in expected.items() if k.startswith("grad.")}
    assert ours.keys() == theirs.keys()
    for key, g in theirs.items():
        err = np.linalg.norm(ours[key] - g) / np.linalg.norm(g)
        assert err <= 1e-4, f"{name} gradient of {key}: relative error {err:.2e}"
