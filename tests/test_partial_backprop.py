"""Partial backpropagation: with the lower blocks frozen, the forward keeps nothing below the lowest
trainable block and the backward stops there (``minift.model``, "Partial backpropagation").

Properties: the upper parameters' gradients equal those of the full backward (float64, tight); the
frozen blocks' caches are None; block_backward runs only on the trainable blocks, and the lowest one
is asked for no input gradient.
"""

from __future__ import annotations

import numpy as np
import pytest

import minift.model
from minift.config import ModelConfig
from minift.model import init_model, loss_and_grads, model_forward, named_modules, set_trainable
from minift.testing import assert_close

L = 4
CONFIGS = {
    "llama-gqa": ModelConfig(vocab_size=7, hidden_size=8, intermediate_size=6, n_layers=L, n_heads=2,
                             n_kv_heads=1, qkv_bias=True),
    "gpt2": ModelConfig(vocab_size=7, hidden_size=8, intermediate_size=6, n_layers=L, n_heads=2, arch="gpt2",
                        qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                        max_position_embeddings=4),
}


def _freeze_lower_half(model):
    """Freeze the embeddings and blocks 0 .. L/2 − 1; everything above stays trainable."""
    for path, holder in named_modules(model):
        below = path.startswith("blocks.") and int(path.split(".")[1]) < L // 2
        if below or path in ("embed", "pos_embed"):
            holder.requires_grad = False
    return model


def _setup(name):
    model = set_trainable(init_model(CONFIGS[name], np.random.default_rng(0), dtype=np.float64, std=0.5))
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, 7, (2, 4)), rng.integers(0, 7, (2, 4))
    return model, tokens, targets


@pytest.mark.parametrize("name", CONFIGS)
def test_the_upper_gradients_equal_those_of_the_full_backward(name):
    model, tokens, targets = _setup(name)
    _, full = loss_and_grads(model, tokens, targets)
    _, partial = loss_and_grads(_freeze_lower_half(model), tokens, targets)
    assert partial, "the upper half is trainable"
    assert all(not k.startswith(("embed", "pos_embed", "blocks.0.", "blocks.1.")) for k in partial)
    for key, g in partial.items():
        assert_close(g, full[key], rtol=1e-12, atol=1e-14, what=key)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_frozen_blocks_forward_keeps_no_cache(name):
    model, tokens, _ = _setup(name)
    _, cache = model_forward(_freeze_lower_half(model), tokens)
    assert cache.lowest == L // 2
    assert [c is None for c in cache.blocks] == [True] * (L // 2) + [False] * (L - L // 2)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_backward_does_no_work_below_the_lowest_trainable_block(name, monkeypatch):
    model, tokens, targets = _setup(name)
    calls = []
    real = minift.model.block_backward

    def recording(block, dx, cache, shape, rope, config, grads, prefix, *, need_dx=True):
        calls.append((prefix, need_dx))
        return real(block, dx, cache, shape, rope, config, grads, prefix, need_dx=need_dx)

    monkeypatch.setattr(minift.model, "block_backward", recording)
    loss_and_grads(_freeze_lower_half(model), tokens, targets)
    assert calls == [("blocks.3", True), ("blocks.2", False)]  # top down; no dx out of the lowest
