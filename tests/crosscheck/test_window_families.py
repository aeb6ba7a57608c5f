"""A LoRA and an S2FT training step on transformers-built Qwen3, Mistral and Gemma 3 models with sliding
windows, from Python and through ``minift finetune``.

The batch (9 tokens) is longer than the windows (4). One plain gradient step with a small learning
rate must lower the loss on the same batch (first order: by lr·‖g‖²), and S2FT's co-permutation of
every head target (q, k, v, o) must keep the logits of the loaded model, q/k norms and Gemma's
post-norms included. The command line fine-tunes each folder (with the embedded tasks' tokenizer) and
writes an adapter.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from minift.io.hub import load_pretrained  # noqa: E402
from minift.methods.lora import LoRAConfig, apply_lora  # noqa: E402
from minift.methods.s2ft import S2FTConfig, apply_s2ft  # noqa: E402
from minift.model import loss_and_grads, model_forward, trainable_parameters  # noqa: E402
from minift.testing import assert_close  # noqa: E402
from tests.crosscheck.make_fixtures import batch, build_hf_model, minift_targets  # noqa: E402

pytestmark = pytest.mark.crosscheck

METHODS = {
    "lora": lambda m, rng: apply_lora(m, LoRAConfig(r=2, alpha=4.0,
                                                    targets=("q", "k", "v", "o", "gate", "up", "down")), rng),
    "s2ft": lambda m, rng: apply_s2ft(m, S2FTConfig(heads=1, channels=4, head_targets=("q", "k", "v", "o"),
                                                    channel_targets=("gate", "up", "down")), rng=rng),
}


SPECS = ["qwen3_window", "mistral_window", "gemma3_window"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", list(METHODS))
def test_one_training_step_lowers_the_loss_and_the_method_keeps_the_logits(spec, method, tmp_path):
    build_hf_model(spec, seed=5).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=np.float64)
    data = batch()
    tokens, mask = data["tokens"], data["attention_mask"]
    targets = minift_targets(data["labels"])
    before, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    METHODS[method](model, np.random.default_rng(0))
    after, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    real = mask == 1
    assert_close(after[real], before[real], rtol=1e-9, atol=1e-10, what="logits after applying the method")

    loss, grads = loss_and_grads(model, tokens, targets, attention_mask=mask)
    params = trainable_parameters(model)
    assert params
    assert set(grads) == set(params)
    for key, p in params.items():
        p -= 1e-3 * grads[key]
    new_loss, _ = loss_and_grads(model, tokens, targets, attention_mask=mask)
    assert new_loss < loss


@pytest.mark.parametrize("spec", SPECS)
def test_minift_finetune_runs_lora_and_s2ft_on_the_transformers_folder(spec, tmp_path):
    from minift.data.tasks import save_tokenizer
    from tests.test_families import finetune_the_folder

    folder = tmp_path / spec
    build_hf_model(spec, seed=6, vocab=100).save_pretrained(folder)  # the tasks' 100-id vocabulary
    save_tokenizer(folder)
    finetune_the_folder(folder, tmp_path, METHODS)
