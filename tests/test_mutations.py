"""The gradient checks are not vacuous: flipping the sign of any one gradient that any layer's
backward returns makes the whole-model gradient check fail.

Each mutant replaces a backward where the model looks it up (``minift.model.<name>`` or
``minift.slots.<name>``: both import the functions by name) with a version that negates one of its
outputs. Two tiny fully trainable models cover every backward: a Llama with GQA, tied embeddings
(the head's linear backward in model.py) and biases everywhere, and a GPT-2 (LayerNorm, GELU,
learned positions).
"""

from __future__ import annotations

import numpy as np
import pytest

import minift.model
import minift.slots
from minift.config import ModelConfig
from minift.layers.cross_entropy import cross_entropy_forward
from minift.model import init_model, loss_and_grads, model_forward, set_trainable, trainable_parameters
from minift.testing import GradReport, check_grad

V = 5
LLAMA = ModelConfig(vocab_size=V, hidden_size=4, intermediate_size=4, n_layers=1, n_heads=2, n_kv_heads=1,
                    tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True)
GPT2 = ModelConfig(vocab_size=V, hidden_size=4, intermediate_size=4, n_layers=1, n_heads=2, arch="gpt2",
                   qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                   max_position_embeddings=3, norm_eps=1e-5)

# (module, backward's name, index of the output to flip or None for a single output, model config)
MUTANTS = [
    (minift.slots, "linear_backward_input", None, LLAMA),
    (minift.slots, "linear_backward_weight", None, LLAMA),
    (minift.slots, "linear_backward_bias", None, LLAMA),
    (minift.model, "linear_backward_input", None, LLAMA),  # the tied head's dx
    (minift.model, "linear_backward_weight", None, LLAMA),  # the tied head's dE
    (minift.slots, "rmsnorm_backward", 0, LLAMA),
    (minift.slots, "rmsnorm_backward", 1, LLAMA),
    (minift.slots, "layernorm_backward", 0, GPT2),
    (minift.slots, "layernorm_backward", 1, GPT2),
    (minift.slots, "layernorm_backward", 2, GPT2),
    (minift.model, "rope_backward", None, LLAMA),
    (minift.model, "attention_backward", 0, LLAMA),
    (minift.model, "attention_backward", 1, LLAMA),
    (minift.model, "attention_backward", 2, LLAMA),
    (minift.model, "swiglu_backward", 0, LLAMA),
    (minift.model, "swiglu_backward", 1, LLAMA),
    (minift.model, "gelu_backward", None, GPT2),
    (minift.slots, "embedding_backward", None, LLAMA),
    (minift.slots, "embedding_backward", None, GPT2),  # the learned positions too
    (minift.model, "cross_entropy_backward", None, LLAMA),
]


def _whole_model_check(config: ModelConfig) -> GradReport:
    model = set_trainable(init_model(config, np.random.default_rng(0), dtype=np.float64, std=0.5))
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, V, (1, 3)), rng.integers(0, V, (1, 3))

    def loss(**_params):
        logits, _ = model_forward(model, tokens, train=False)
        return cross_entropy_forward(logits.reshape(-1, V), targets.reshape(-1))[0]

    def grads(G, **_params):
        return loss_and_grads(model, tokens, targets, loss_scale=G)[1]

    return check_grad(loss, grads, trainable_parameters(model), rng=rng, zero_floor=1e-3,
                      raise_on_failure=False)


def _negating(fn, index):
    def mutant(*args, **kwargs):
        out = fn(*args, **kwargs)
        if index is None:
            return -out
        return tuple(-g if i == index else g for i, g in enumerate(out))

    return mutant


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_the_unmutated_model_passes_the_whole_model_gradient_check(config):
    report = _whole_model_check(config)
    assert report.ok, str(report)


MUTANT_IDS = [f"{m.__name__}.{n}{'' if i is None else f'[{i}]'}-{c.arch}" for m, n, i, c in MUTANTS]


@pytest.mark.parametrize(("module", "name", "index", "config"), MUTANTS, ids=MUTANT_IDS)
def test_flipping_the_sign_of_one_returned_gradient_fails_the_whole_model_check(module, name, index, config,
                                                                                monkeypatch):
    monkeypatch.setattr(module, name, _negating(getattr(module, name), index))
    report = _whole_model_check(config)
    assert not report.ok, f"the mutant {module.__name__}.{name}[{index}] went unnoticed:\n{report}"
