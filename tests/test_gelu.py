"""GPT-2's tanh GELU ("gelu_new"): y = ½x(1 + tanh(√(2/π)(x + 0.044715x³))) (transformers'
``NewGELUActivation``).

Properties: matches the naive reference; dx matches finite differences; gelu(x) − gelu(−x) = x (tanh is
odd); gelu(x) → x for large positive x and → 0 for large negative x, without warnings; float32 is
preserved and the backward leaves its inputs alone.
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given

from minift.backend import to_numpy
from minift.layers.gelu import gelu_backward, gelu_forward
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations


def test_gelu_forward_matches_the_naive_reference(xp, rng):
    x = 3 * rng.standard_normal((4, 5))
    assert_close(gelu_forward(xp.asarray(x)), ref.gelu_new(x), rtol=1e-12, atol=1e-14, what="y")


def test_gelu_backward_gives_the_finite_difference_gradient_of_x(rng):
    args = {"x": 3 * rng.standard_normal((4, 5))}
    check_grad(gelu_forward, lambda G, x: {"x": gelu_backward(G, x)}, args, rng=rng)


@given(x=activations((3, 4), bound=30.0))
@example(x=np.array([[-30.0, -1.0, 0.0, 2.0]] * 3))
def test_gelu_of_x_minus_gelu_of_minus_x_is_x(x):
    assert_close(gelu_forward(x) - gelu_forward(-x), x, rtol=1e-12, atol=1e-12, what="gelu(x) − gelu(−x)")


def test_gelu_is_the_identity_far_right_and_zero_far_left_without_warnings():
    x = np.array([[-1e4, -60.0, 60.0, 1e4]], dtype=np.float32)
    y = gelu_forward(x)  # filterwarnings = error turns an overflow warning into a failure
    dx = gelu_backward(np.ones_like(x), x)
    assert_close(y, [[0.0, 0.0, 60.0, 1e4]], rtol=1e-7, atol=0, what="y")
    assert_close(dx, [[0.0, 0.0, 1.0, 1.0]], rtol=1e-7, atol=0, what="dy/dx")


def test_gelu_keeps_float32_and_its_backward_leaves_its_inputs_alone(xp, rng):
    x = xp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    dy = xp.asarray(rng.standard_normal((3, 4)).astype(np.float32))
    x0, dy0 = x.copy(), dy.copy()
    y, dx = gelu_forward(x), gelu_backward(dy, x)
    assert y.dtype == dx.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(x), to_numpy(x0))
    np.testing.assert_array_equal(to_numpy(dy), to_numpy(dy0))
