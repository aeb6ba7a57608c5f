"""The whole decoder (Llama family and GPT-2), forward and hand-written backward composed from layers/.

Properties: the forward equals a naive float64 reference written from the raw weights
(``tests/reference.py``); the gradient of the loss matches finite differences for every trainable parameter,
on tiny configs covering GQA, tied embeddings, attention/MLP biases (Llama q,k,v,o and Qwen2 q,k,v only),
linear and llama3 RoPE, head_dim ≠ C/H and GPT-2; padding changes no unmasked logit, and left padding with
ignored targets changes neither the loss nor the gradients; the float32 forward agrees with the float64 one
to float32 precision; float32 in gives float32 logits and gradients; inputs are not mutated; the backward is
idempotent; the KV-cache forward equals the full forward; token ids (and targets other than −100) outside
[0, V), arrays of the wrong shape and sequences longer than GPT-2's learned positions are refused with a
MinIFTError instead of a wrong (or wrapped) lookup.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minift.backend import get_xp, to_xp
from minift.config import ModelConfig, RopeScaling
from minift.errors import MinIFTError, ShapeError
from minift.layers.cross_entropy import IGNORE_INDEX, cross_entropy_forward
from minift.model import (
    KVCache,
    init_model,
    loss_and_grads,
    model_backward,
    model_forward,
    set_trainable,
    trainable_parameters,
)
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import configs

V = 7
_BASE = dict(vocab_size=V, hidden_size=8, intermediate_size=6, n_layers=2, n_heads=2)
CONFIGS = {
    "gqa": ModelConfig(**_BASE | dict(n_heads=4, n_kv_heads=2, head_dim=2)),
    "tied-embeddings": ModelConfig(**_BASE, n_kv_heads=1, tie_word_embeddings=True),
    "llama-biases-qkvo-mlp": ModelConfig(**_BASE, qkv_bias=True, o_bias=True, mlp_bias=True),
    "qwen2-biases-qkv-only": ModelConfig(**_BASE, arch="qwen2", qkv_bias=True, tie_word_embeddings=True),
    # θ = 100, D = 6: wavelengths 6, 29, 135 fall in the kept, interpolated and divided bands.
    "llama3-rope": ModelConfig(**_BASE, n_kv_heads=1, head_dim=6, rope_theta=100.0,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64)),
    "linear-rope-head-dim-not-C-over-H": ModelConfig(**_BASE | dict(hidden_size=6, head_dim=4),
                                                     rope_scaling=RopeScaling("linear", 3.0)),
    "gpt2": ModelConfig(**_BASE, arch="gpt2", qkv_bias=True, o_bias=True, mlp_bias=True,
                        tie_word_embeddings=True, max_position_embeddings=6, norm_eps=1e-5),
}


def _model(config: ModelConfig, seed: int = 0, dtype=np.float64, xp=np):
    """A trainable model with O(1) weights (std 0.5), so attention and the MLP are far from linear."""
    model = set_trainable(init_model(config, np.random.default_rng(seed), dtype=dtype, std=0.5, xp=xp))
    rng = np.random.default_rng(seed + 1)
    for name, p in trainable_parameters(model).items():
        if "norm" in name or name.endswith(".bias"):  # init gives ones and zeros: make them matter
            p += to_xp((0.3 * rng.standard_normal(p.shape)).astype(p.dtype), get_xp(p))
    return model


def _batch(seed: int = 0):
    """(B, T) = (2, 4) tokens, shifted targets with an ignored one, and a mask with left padding in row 1."""
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, V, (2, 4)), rng.integers(0, V, (2, 4))
    targets[0, 0] = IGNORE_INDEX
    mask = np.ones((2, 4), dtype=np.int64)
    mask[1, 0] = 0
    targets[1, 0] = IGNORE_INDEX
    return tokens, targets, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_model_forward_equals_the_naive_reference_forward(xp, name):
    model, (tokens, _, mask) = _model(CONFIGS[name], xp=xp), _batch()
    logits, _ = model_forward(model, xp.asarray(tokens), attention_mask=xp.asarray(mask), train=False)
    # Only the RoPE tables differ: float32 in minift (as in Hugging Face), float64 in the reference.
    assert_close(logits, ref.model_forward(model, tokens, mask), rtol=1e-6, atol=1e-6, what="logits")


@settings(max_examples=10)
@given(config=configs(), seed=st.integers(0, 2**16))
@example(config=CONFIGS["gqa"], seed=0)
def test_model_forward_equals_the_naive_reference_forward_on_any_tiny_config(config, seed):
    model = _model(config, seed)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (2, 3))
    assert_close(model_forward(model, tokens, train=False)[0], ref.model_forward(model, tokens), rtol=1e-6,
                 atol=1e-6, what="logits")


@pytest.mark.parametrize("name", CONFIGS)
def test_the_loss_gradient_of_every_trainable_parameter_matches_finite_differences(name):
    model, (tokens, targets, mask) = _model(CONFIGS[name]), _batch()

    def loss(**_params):  # the parameters are perturbed in place, inside the model
        logits, _ = model_forward(model, tokens, attention_mask=mask, train=False)
        return cross_entropy_forward(logits.reshape(-1, V), targets.reshape(-1))[0]

    def grads(G, **_params):
        return loss_and_grads(model, tokens, targets, attention_mask=mask, loss_scale=G)[1]

    params = trainable_parameters(model)
    assert set(grads(1.0)) == set(params)  # a gradient for every parameter, and nothing else
    # Central differences of an O(1) loss carry ~1e-10 of rounding noise per entry; the floor keeps a
    # gradient that is exactly zero (GPT-2's key bias shifts a whole row of scores) from reading that
    # noise as a 100% error, while a wrong gradient of norm ≥ 1e-9 still fails.
    check_grad(loss, grads, params, rng=np.random.default_rng(0), tol=1e-6, zero_floor=1e-3)


@settings(max_examples=10)
@given(config=configs(), n_pad=st.integers(1, 2), pad_id=st.integers(0, 2), seed=st.integers(0, 2**16))
@example(config=CONFIGS["gpt2"], n_pad=2, pad_id=0, seed=0)
def test_padding_changes_no_unmasked_logit(config, n_pad, pad_id, seed):
    model = _model(config, seed)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (1, 3))
    alone, _ = model_forward(model, tokens, train=False)
    pad = np.full((1, n_pad), pad_id % config.vocab_size)
    ones, zeros = np.ones((1, 3), dtype=np.int64), np.zeros((1, n_pad), dtype=np.int64)
    left, _ = model_forward(model, np.concatenate([pad, tokens], axis=1),
                            attention_mask=np.concatenate([zeros, ones], axis=1), train=False)
    right, _ = model_forward(model, np.concatenate([tokens, pad], axis=1),
                             attention_mask=np.concatenate([ones, zeros], axis=1), train=False)
    assert np.isfinite(left).all()  # padding queries see no key at all: zeros, not NaN
    assert_close(left[:, n_pad:], alone, rtol=1e-10, atol=1e-12, what="left-padded logits")
    assert_close(right[:, :3], alone, rtol=1e-10, atol=1e-12, what="right-padded logits")


@pytest.mark.parametrize("name", ["gqa", "gpt2"])
def test_left_padding_with_ignored_targets_changes_neither_the_loss_nor_the_gradients(name):
    model, (tokens, targets, _) = _model(CONFIGS[name]), _batch()
    tokens, targets = tokens[:1], targets[:1]
    loss, grads = loss_and_grads(model, tokens, targets)
    padded_tokens = np.concatenate([np.zeros((1, 2), dtype=tokens.dtype), tokens], axis=1)
    padded_targets = np.concatenate([np.full((1, 2), IGNORE_INDEX), targets], axis=1)
    mask = np.concatenate([np.zeros((1, 2)), np.ones((1, 4))], axis=1).astype(np.int64)
    loss_p, grads_p = loss_and_grads(model, padded_tokens, padded_targets, attention_mask=mask)
    assert abs(loss_p - loss) <= 1e-12
    for key in grads:
        assert_close(grads_p[key], grads[key], rtol=1e-9, atol=1e-12, what=key)


@pytest.mark.parametrize("name", ["gqa", "gpt2"])
def test_the_float32_forward_agrees_with_the_float64_forward_to_float32_precision(name):
    tokens = _batch()[0]
    logits64, _ = model_forward(_model(CONFIGS[name]), tokens, train=False)
    logits32, _ = model_forward(_model(CONFIGS[name], dtype=np.float32), tokens, train=False)
    assert_close(logits32, logits64, rtol=1e-4, atol=1e-5, what="float32 logits")


@pytest.mark.parametrize("name", ["gqa", "gpt2"])
def test_a_float32_model_gives_float32_logits_and_gradients(xp, name):
    model, (tokens, targets, mask) = _model(CONFIGS[name], dtype=np.float32, xp=xp), _batch()
    tokens, targets, mask = xp.asarray(tokens), xp.asarray(targets), xp.asarray(mask)
    logits, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    assert logits.dtype == np.float32
    _, grads = loss_and_grads(model, tokens, targets, attention_mask=mask)
    assert {name: g.dtype for name, g in grads.items()} == dict.fromkeys(grads, np.float32)


@pytest.mark.parametrize("name", ["tied-embeddings", "gpt2"])
def test_loss_and_grads_does_not_mutate_its_inputs_or_the_weights(name):
    model, batch = _model(CONFIGS[name]), _batch()
    before = [a.copy() for a in batch], {k: p.copy() for k, p in trainable_parameters(model).items()}
    loss_and_grads(model, *batch[:2], attention_mask=batch[2])
    for a, b in zip(batch, before[0], strict=True):
        np.testing.assert_array_equal(a, b)
    for k, p in trainable_parameters(model).items():
        np.testing.assert_array_equal(p, before[1][k], err_msg=k)


@pytest.mark.parametrize("name", ["tied-embeddings", "gpt2"])
def test_the_model_backward_is_idempotent(name):
    model, (tokens, _, mask) = _model(CONFIGS[name]), _batch()
    logits, cache = model_forward(model, tokens, attention_mask=mask)
    dlogits = np.random.default_rng(0).standard_normal(logits.shape)
    first, second = model_backward(model, dlogits, cache), model_backward(model, dlogits, cache)
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)


@pytest.mark.parametrize("name", ["gqa", "gpt2"])
def test_the_kv_cache_forward_equals_the_full_forward(name):
    model, (tokens, _, _) = _model(CONFIGS[name]), _batch()
    full, _ = model_forward(model, tokens, train=False)
    cache = KVCache.empty(len(model.blocks))
    first, _ = model_forward(model, tokens[:, :3], kv_cache=cache, train=False)
    last, _ = model_forward(model, tokens[:, 3:], kv_cache=cache, train=False)
    assert cache.length == 4
    assert_close(np.concatenate([first, last], axis=1), full, rtol=1e-10, atol=1e-12, what="logits")


@pytest.mark.parametrize(("tokens", "message"), [(np.array([[0, V]]), r"token ids must lie in \[0, 7\)"),
                                                 (np.array([[-100, 1]]), "got ids from -100"),
                                                 (np.array([1, 2]), r"tokens must be \(B, T\)")],
                         ids=["id-V", "ignore-index-as-token", "one-dimensional"])
def test_tokens_of_the_wrong_shape_or_outside_the_vocabulary_are_refused(tokens, message):
    with pytest.raises(MinIFTError, match=message):
        model_forward(_model(CONFIGS["gqa"]), tokens, train=False)


def test_a_mask_or_targets_of_the_wrong_shape_are_refused():
    model, (tokens, targets, mask) = _model(CONFIGS["gqa"]), _batch()
    with pytest.raises(ShapeError, match=r"attention_mask must be \(B, P \+ T\)"):
        model_forward(model, tokens, attention_mask=mask[:, 1:])
    with pytest.raises(ShapeError, match="targets"):
        loss_and_grads(model, tokens, targets[:, 1:])


@pytest.mark.parametrize("bad", [V, -1])
def test_targets_outside_the_vocabulary_other_than_the_ignore_index_are_refused(bad):
    model, (tokens, targets, _) = _model(CONFIGS["gqa"]), _batch()
    targets[1, 2] = bad
    with pytest.raises(MinIFTError, match=rf"in \[0, 7\) or -100 \(ignored\), got {bad}$"):
        loss_and_grads(model, tokens, targets)


def test_a_gpt2_sequence_longer_than_its_learned_positions_is_refused():
    model = _model(CONFIGS["gpt2"])  # 6 learned positions
    with pytest.raises(ShapeError, match="position 6 is past the 6 learned positions"):
        model_forward(model, np.zeros((1, 7), dtype=np.int64), train=False)
