"""Linear layer y = x Wᵀ + b, backward split into dx = dy W, dW = dyᵀ x, db = Σ_n dy.

Properties: matches the naive reference; every gradient matches finite differences; the weight
gradient of a column slice of x is the same column block of the full dW (what S2FT relies on);
linear in x; float32 in, float32 out; inputs are not mutated.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.backend import to_numpy
from minift.layers.linear import (
    linear_backward_bias,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
)
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_forward_matches_the_naive_reference(xp, rng, with_bias):
    x, w, b = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.standard_normal(4)
    bias = xp.asarray(b) if with_bias else None
    y = linear_forward(xp.asarray(x), xp.asarray(w), bias)
    assert_close(y, ref.linear(x, w, b if with_bias else None), rtol=1e-12, atol=1e-12, what="y")


def test_linear_backward_gives_the_finite_difference_gradient_of_x_w_and_b(rng):
    args = {"x": rng.standard_normal((5, 3)), "w": rng.standard_normal((4, 3)), "b": rng.standard_normal(4)}

    def backward(G, x, w, b):
        return {"x": linear_backward_input(G, w), "w": linear_backward_weight(G, x),
                "b": linear_backward_bias(G)}

    check_grad(linear_forward, backward, args, rng=rng)


@given(x=activations((4, 5)), cut=st.integers(0, 5), seed=st.integers(0, 2**16))
@example(x=np.arange(20.0).reshape(4, 5) / 10, cut=2, seed=0)
def test_the_weight_gradient_of_a_column_slice_of_x_is_that_column_block_of_dw(x, cut, seed):
    dy = np.random.default_rng(seed).standard_normal((4, 3))
    full = linear_backward_weight(dy, x)
    block = linear_backward_weight(dy, x[:, :cut])
    assert_close(block, full[:, :cut], rtol=1e-12, atol=1e-12, what="dW block")


@given(x1=activations((3, 4)), x2=activations((3, 4)), a=st.floats(-3, 3), seed=st.integers(0, 2**16))
@example(x1=np.ones((3, 4)), x2=np.eye(3, 4), a=2.0, seed=0)
def test_linear_without_bias_is_linear_in_its_input(x1, x2, a, seed):
    w = np.random.default_rng(seed).standard_normal((2, 4))
    lhs = linear_forward(a * x1 + x2, w)
    assert_close(lhs, a * linear_forward(x1, w) + linear_forward(x2, w), rtol=1e-9, atol=1e-9, what="y")


def test_linear_keeps_float32_and_does_not_mutate_its_inputs(xp, rng):
    x, w, b = (xp.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((5, 3), (4, 3), (4,)))
    copies = [a.copy() for a in (x, w, b)]
    dy = xp.asarray(rng.standard_normal((5, 4)).astype(np.float32))
    outs = [linear_forward(x, w, b), linear_backward_input(dy, w), linear_backward_weight(dy, x),
            linear_backward_bias(dy)]
    assert [o.dtype for o in outs] == [np.float32] * 4
    for a, c in zip((x, w, b), copies, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(c))
