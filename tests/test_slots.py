"""The dense linear slot and the norm/embedding holders (the slot table of ``minift.slots``).

Properties: a frozen Dense keeps nothing and returns dx only; a trainable one keeps x and its dx, dW,
db match finite differences; need_dx=False skips dx; parameters() are the slot's own arrays (so the
optimizer's in-place update reaches the model) and empty when frozen; FLOPs count the weight gradient
only when trained; Norm is RMSNorm without a bias and LayerNorm with one, and keeps no cache in
inference mode.
"""

from __future__ import annotations

import numpy as np
import pytest

from minift.slots import Dense, Embedding, LinearSlot, Norm
from minift.testing import assert_close, check_grad
from tests import reference as ref


def test_a_dense_slot_is_a_linear_slot_computing_x_wt_plus_b(rng):
    x, w, b = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.standard_normal(4)
    slot = Dense(w, b)
    assert isinstance(slot, LinearSlot)
    assert (slot.in_features, slot.out_features) == (3, 4)
    assert slot.dense_weight() is w
    assert_close(slot.forward(x, keep=True)[0], ref.linear(x, w, b), rtol=1e-12, atol=1e-12, what="y")


def test_a_frozen_dense_slot_keeps_nothing_and_returns_only_dx(rng):
    w = rng.standard_normal((4, 3))
    slot = Dense(w, rng.standard_normal(4))
    y, cache = slot.forward(rng.standard_normal((5, 3)), keep=True)
    dy = rng.standard_normal(y.shape)
    dx, grads = slot.backward(dy, cache)
    assert cache is None
    assert grads == {}
    assert slot.parameters() == {}
    assert_close(dx, dy @ w, rtol=1e-12, atol=1e-12, what="dx")


@pytest.mark.parametrize("bias", [False, True])
def test_a_trainable_dense_slot_gives_the_finite_difference_gradients_of_x_w_and_b(rng, bias):
    slot = Dense(rng.standard_normal((4, 3)), rng.standard_normal(4) if bias else None, requires_grad=True)
    args = {"x": rng.standard_normal((5, 3)), **slot.parameters()}  # its own arrays, perturbed in place

    def backward(G, x, **_params):
        dx, grads = slot.backward(G, slot.forward(x, keep=True)[1])
        return {"x": dx, **grads}

    check_grad(lambda x, **_params: slot.forward(x, keep=True)[0], backward, args, rng=rng)


def test_a_trainable_dense_slot_exposes_its_own_arrays_and_skips_dx_when_not_needed(rng):
    w, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
    slot = Dense(w, b, requires_grad=True)
    params = slot.parameters()
    assert params["weight"] is w
    assert params["bias"] is b
    x = rng.standard_normal((5, 3))
    _, cache = slot.forward(x, keep=True)
    dx, grads = slot.backward(np.ones((5, 4)), cache, need_dx=False)
    assert dx is None
    assert set(grads) == {"weight", "bias"}
    assert slot.forward(x, keep=False)[1] is None  # inference mode keeps nothing even when trainable


def test_dense_flops_charge_the_weight_gradient_only_when_trained(rng):
    frozen, trained = Dense(np.zeros((4, 3))), Dense(np.zeros((4, 3)), requires_grad=True)
    mac = 2 * 10 * 3 * 4
    assert frozen.flops(10) == (mac, mac)
    assert frozen.flops(10, need_dx=False) == (mac, 0)
    assert trained.flops(10) == (mac, 2 * mac)


@pytest.mark.parametrize("layernorm", [False, True], ids=["rmsnorm", "layernorm"])
def test_a_norm_is_rmsnorm_without_bias_and_layernorm_with_one(rng, layernorm):
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    norm = Norm(w, b if layernorm else None, eps=1e-5, requires_grad=True)
    expected = ref.layernorm(x, w, b, 1e-5) if layernorm else ref.rmsnorm(x, w, 1e-5)
    y, cache = norm.forward(x, keep=True)
    assert_close(y, expected, rtol=1e-12, atol=1e-12, what="y")
    assert set(norm.backward(np.ones_like(y), cache)[1]) == ({"weight", "bias"} if layernorm else {"weight"})
    assert norm.forward(x, keep=False)[1] is None


def test_frozen_norms_and_embeddings_return_no_gradients(rng):
    norm = Norm(np.ones(4), eps=1e-6)
    x = rng.standard_normal((2, 4))
    y, cache = norm.forward(x, keep=True)
    dx, grads = norm.backward(np.ones_like(y), cache)
    assert grads == {}
    assert dx.shape == x.shape
    assert norm.parameters() == {}
    emb = Embedding(rng.standard_normal((5, 4)))
    assert emb.backward(np.ones((2, 4)), np.array([0, 1])) == {}
    assert emb.parameters() == {}
