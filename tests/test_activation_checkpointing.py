"""Activation checkpointing and lean caches: what the forward keeps, and that it changes no gradient.

Properties (float64): with ``checkpoint=True`` the loss and every gradient equal those without it, for
every method (full, LoRA with dropout, PiSSA, SORSA, S2FT), GQA and GPT-2, under left padding and
ignored targets; a checkpointed block keeps only its input, and blocks below the lowest trainable one
keep nothing at all; the backward that frees each cache as it goes (``loss_and_grads``) gives the
gradients of the one that leaves the cache intact (``model_backward``), and a freed block's cache
holds no array afterwards; ``minift finetune --activation-checkpointing`` reaches the trainer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.config import ModelConfig
from minift.layers.cross_entropy import IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from minift.methods.full import apply_full
from minift.methods.lora import LoRAConfig, apply_lora
from minift.methods.pissa import PiSSAConfig, apply_pissa
from minift.methods.s2ft import S2FTConfig, apply_s2ft
from minift.methods.sorsa import SORSAConfig, apply_sorsa
from minift.model import (
    BlockCache,
    BlockCheckpoint,
    init_model,
    loss_and_grads,
    model_backward,
    model_forward,
    named_modules,
)
from minift.testing import assert_close

V, L = 11, 3
CONFIGS = {
    "gqa": ModelConfig(vocab_size=V, hidden_size=8, intermediate_size=12, n_layers=L, n_heads=4, n_kv_heads=2,
                       qkv_bias=True),
    "gpt2": ModelConfig(vocab_size=V, hidden_size=8, intermediate_size=12, n_layers=L, n_heads=2, arch="gpt2",
                        qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                        max_position_embeddings=8),
}
TARGETS = ("q", "k", "v", "o", "up", "down")
METHODS = {
    "full": lambda m, rng: apply_full(m),
    "lora": lambda m, rng: apply_lora(m, LoRAConfig(r=2, alpha=4.0, targets=TARGETS, dropout=0.3), rng),
    "pissa": lambda m, rng: apply_pissa(m, PiSSAConfig(r=2, alpha=2.0, targets=TARGETS), rng),
    "sorsa": lambda m, rng: apply_sorsa(m, SORSAConfig(r=2, targets=TARGETS), rng),
    "s2ft": lambda m, rng: apply_s2ft(m, S2FTConfig(heads=1, channels=3), rng=rng),
}


def _model(config, method, seed):
    rng = np.random.default_rng(seed)
    model = METHODS[method](init_model(config, rng, dtype=np.float64, std=0.5), rng)
    for p in dict(_trainable(model)).values():  # move off the init, as training would
        p += 0.3 * rng.standard_normal(p.shape)
    return model


def _trainable(model):
    return [(f"{path}.{n}", a) for path, h in named_modules(model) for n, a in h.parameters().items()]


def _batch(seed, B=2, T=5):
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, : rng.integers(0, T)] = 0  # left padding, its targets ignored
    targets[mask == 0] = IGNORE_INDEX
    return tokens, targets, mask


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=5)
@given(seed=st.integers(0, 2**32 - 1))
def test_checkpointing_changes_neither_the_loss_nor_any_gradient(arch, method, seed):
    model = _model(CONFIGS[arch], method, seed)
    tokens, targets, mask = _batch(seed)
    kw = dict(attention_mask=mask, loss_scale=0.7)
    # the same dropout draws on both sides: each run gets a generator in the same state
    loss, grads = loss_and_grads(model, tokens, targets, rng=np.random.default_rng(seed), **kw)
    loss_c, grads_c = loss_and_grads(model, tokens, targets, rng=np.random.default_rng(seed), checkpoint=True,
                                     **kw)
    assert grads
    assert grads.keys() == grads_c.keys()
    assert_close(loss_c, loss, rtol=1e-12, atol=0.0, what="loss")
    for key, g in grads.items():
        assert_close(grads_c[key], g, rtol=1e-12, atol=1e-14, what=key)


@pytest.mark.parametrize("arch", CONFIGS)
def test_a_checkpointed_block_keeps_only_its_input_and_frozen_lower_blocks_keep_nothing(arch):
    rng = np.random.default_rng(0)
    base = init_model(CONFIGS[arch], rng, dtype=np.float64, std=0.5)
    model = apply_s2ft(base, S2FTConfig(heads=1, channels=3, layers=(1, 2)), rng=rng)  # block 0 frozen
    tokens, targets, mask = _batch(0)
    _, cache = model_forward(model, tokens, attention_mask=mask, checkpoint=True)
    assert cache.lowest == 1
    assert cache.blocks[0] is None
    for entry in cache.blocks[1:]:
        assert isinstance(entry, BlockCheckpoint)
        assert [f.name for f in dataclasses.fields(entry)] == ["x", "rng_state"]
        assert entry.x.shape == (tokens.size, CONFIGS[arch].hidden_size)
    _, plain = loss_and_grads(model, tokens, targets, attention_mask=mask)
    _, ckpt = loss_and_grads(model, tokens, targets, attention_mask=mask, checkpoint=True)
    assert plain.keys() == ckpt.keys()
    assert all(k.startswith(("blocks.1.", "blocks.2.")) for k in plain)
    for key, g in plain.items():
        assert_close(ckpt[key], g, rtol=1e-12, atol=1e-14, what=key)


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("method", ["full", "s2ft"])
def test_the_backward_that_frees_its_cache_gives_the_same_gradients_and_empties_it(arch, method):
    model = _model(CONFIGS[arch], method, 1)
    tokens, targets, mask = _batch(1)
    logits, cache = model_forward(model, tokens, attention_mask=mask)
    _, ce = cross_entropy_forward(logits.reshape(tokens.size, V), targets.reshape(-1))
    dlogits = cross_entropy_backward(ce).reshape(logits.shape)
    intact = model_backward(model, dlogits, cache)
    assert all(isinstance(b, BlockCache) and b.down is not None for b in cache.blocks)  # left as it was
    kept = list(cache.blocks)
    freed = model_backward(model, dlogits, cache, free_cache=True)
    assert cache.blocks == [None] * L
    for block_cache in kept:  # each entry was dropped as soon as it was used
        assert all(getattr(block_cache, f.name) is None for f in dataclasses.fields(block_cache))
    assert intact.keys() == freed.keys()
    for key, g in intact.items():
        np.testing.assert_array_equal(freed[key], g, err_msg=key)
