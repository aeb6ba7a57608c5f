"""Activation checkpointing and lean caches: what the forward keeps, and that it changes no gradient.

Properties (float64): with ``checkpoint=True`` the loss and every gradient equal those without it, for
every method (full, LoRA with dropout, PiSSA, SORSA, S2FT), GQA and GPT-2, under left padding and
ignored targets; a checkpointed block keeps only its input, and blocks below the lowest trainable one
keep nothing at all; the backward that frees each cache as it goes (``loss_and_grads``) gives the
gradients of the one that leaves the cache intact (``model_backward``), and a freed block's cache
holds no array afterwards; ``minift finetune --activation-checkpointing`` reaches the trainer.

The lean caches (``minift.model.lean_mlp``: an MLP with frozen gate and up keeps neither output and
runs by row chunks; ``attention_backward_needed``: the lowest block keeps no attention cache when
nothing below needs dx; the LM head and the loss fused by row chunks) each give the loss and
gradients of the plain path, in float64, for any chunk size, with and without checkpointing, and
dropout drawn chunk by chunk is the same draw as over all rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minift.model
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


# ----------------------------------------------------------------------------------------------------
# lean caches: each change gives the gradients of the plain path it replaces


LEAN_CONFIGS = CONFIGS | {
    "qwen3": ModelConfig(vocab_size=V, hidden_size=8, intermediate_size=12, n_layers=L, n_heads=4,
                         n_kv_heads=2, head_dim=4, qk_norm=True, tie_word_embeddings=True),
}
LEAN_METHODS = {
    # S2FT on O heads and Down channels: gate and up frozen, so every MLP is lean
    "s2ft-o-down": lambda m, rng: apply_s2ft(m, S2FTConfig(heads=1, channels=3), rng=rng),
    # a lean MLP whose down draws dropout chunk by chunk: the draws must be those of one whole draw
    "lora-o-down-dropout": lambda m, rng: apply_lora(
        m, LoRAConfig(r=2, alpha=4.0, targets=("o", "down"), dropout=0.3), rng
    ),
    "full": METHODS["full"],
    "s2ft": METHODS["s2ft"],
}


def _plain_loss_and_grads(model, tokens, targets, mask, seed, monkeypatch):
    """The gradients without the lean paths: logits and the loss on all rows at once, MLPs that keep
    g and u, and an attention backward in every trained block."""
    with monkeypatch.context() as m:
        m.setattr(minift.model, "lean_mlp", lambda block: False)
        m.setattr(minift.model, "attention_backward_needed", lambda block, need_dx: True)
        logits, cache = model_forward(model, tokens, attention_mask=mask, rng=np.random.default_rng(seed))
        loss, ce = cross_entropy_forward(logits.reshape(tokens.size, V), targets.reshape(-1))
        dlogits = cross_entropy_backward(ce, 0.7).reshape(logits.shape)
        return loss, model_backward(model, dlogits, cache)


@pytest.mark.parametrize("arch", LEAN_CONFIGS)
@pytest.mark.parametrize("method", LEAN_METHODS)
@pytest.mark.parametrize("rows", [1, 3, 64])  # row chunks: one token each, uneven (10 = 3+3+3+1), one
@pytest.mark.parametrize("checkpoint", [False, True])
def test_lean_caches_and_row_chunks_change_neither_the_loss_nor_any_gradient(
    arch, method, rows, checkpoint, monkeypatch
):
    if method == "lora-o-down-dropout" and arch == "gpt2":
        pytest.skip("GPT-2's MLP has no gate: it is never lean")
    rng = np.random.default_rng(3)
    model = LEAN_METHODS[method](init_model(LEAN_CONFIGS[arch], rng, dtype=np.float64, std=0.5), rng)
    for p in dict(_trainable(model)).values():
        p += 0.3 * rng.standard_normal(p.shape)
    tokens, targets, mask = _batch(3)
    loss, grads = _plain_loss_and_grads(model, tokens, targets, mask, 3, monkeypatch)
    monkeypatch.setattr(minift.model, "ROW_CHUNK", rows)
    loss_l, grads_l = loss_and_grads(model, tokens, targets, attention_mask=mask, loss_scale=0.7,
                                     rng=np.random.default_rng(3), checkpoint=checkpoint)
    assert grads.keys() == grads_l.keys()
    assert_close(loss_l, loss, rtol=1e-12, atol=0.0, what="loss")
    for key, g in grads.items():
        assert_close(grads_l[key], g, rtol=1e-12, atol=1e-14, what=key)


def test_a_lean_block_keeps_no_gate_or_up_output_and_the_lowest_keeps_no_attention():
    config = CONFIGS["gqa"]
    rng = np.random.default_rng(0)
    model = apply_s2ft(init_model(config, rng, dtype=np.float64), S2FTConfig(heads=1, channels=3), rng=rng)
    tokens, _, mask = _batch(0)
    _, cache = model_forward(model, tokens, attention_mask=mask)
    for i, entry in enumerate(cache.blocks):
        assert minift.model.lean_mlp(model.blocks[i])
        assert (entry.act, entry.gate, entry.up) == (None, None, None)
        widths = {a.shape[-1] for a in _arrays_of(entry)}
        assert config.intermediate_size not in widths, f"block {i} keeps an (N, F) array"
        assert (entry.attn is None) == (i == 0)  # block 0: nothing below needs dx, q/k/v are frozen
        assert (entry.attn_norm is None) == (i == 0)


def _arrays_of(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _arrays_of(getattr(obj, f.name))
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _arrays_of(item)
