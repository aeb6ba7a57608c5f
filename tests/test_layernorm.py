"""LayerNorm y = w ⊙ (x − mean(x)) / sqrt(var(x) + eps) + b, GPT-2's norm (biased variance).

Properties: matches the naive reference; dx, dw and db match finite differences; with eps = 0 it is
invariant to a shift and a positive rescaling of its input; with w = 1, b = 0 every row has zero mean
and unit (biased) variance; dx sums to zero over each row (a shift of x changes nothing); float32 is
preserved; the backward is idempotent and leaves its inputs alone.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, example, given
from hypothesis import strategies as st

from minift.backend import to_numpy
from minift.layers.layernorm import layernorm_backward, layernorm_forward
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations


def test_layernorm_forward_matches_the_naive_reference(xp, rng):
    x, w, b = rng.standard_normal((4, 6)), rng.standard_normal(6), rng.standard_normal(6)
    y, _ = layernorm_forward(xp.asarray(x), xp.asarray(w), xp.asarray(b), 1e-5)
    assert_close(y, ref.layernorm(x, w, b, 1e-5), rtol=1e-12, atol=1e-12, what="y")


def test_layernorm_backward_gives_the_finite_difference_gradient_of_x_w_and_b(rng):
    def backward(G, x, w, b):
        dx, dw, db = layernorm_backward(G, layernorm_forward(x, w, b, 1e-5)[1], w)
        return {"x": dx, "w": dw, "b": db}

    args = {"x": rng.standard_normal((4, 6)), "w": rng.standard_normal(6), "b": rng.standard_normal(6)}
    check_grad(lambda x, w, b: layernorm_forward(x, w, b, 1e-5)[0], backward, args, rng=rng)


@given(x=activations((3, 5)), shift=st.floats(-10, 10), c=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16))
@example(x=np.arange(15.0).reshape(3, 5) - 7, shift=3.0, c=10.0, seed=0)
def test_layernorm_is_invariant_to_a_shift_and_a_positive_rescaling_of_its_input(x, shift, c, seed):
    assume(x.std(axis=-1).min() > 1e-2)  # eps = 0 divides by the standard deviation
    r = np.random.default_rng(seed)
    w, b = r.standard_normal(5), r.standard_normal(5)
    assert_close(layernorm_forward(c * x + shift, w, b, 0.0)[0], layernorm_forward(x, w, b, 0.0)[0],
                 rtol=1e-7, atol=1e-7, what="y(c·x + s)")


@given(x=activations((3, 5)))
@example(x=np.array([[1.0, 2.0, 3.0, 4.0, 5.0]] * 3))
def test_layernorm_with_unit_weight_and_zero_bias_gives_rows_of_zero_mean_and_unit_variance(x):
    assume(x.std(axis=-1).min() > 1e-2)
    y, _ = layernorm_forward(x, np.ones(5), np.zeros(5), 0.0)
    assert_close(y.mean(axis=-1), np.zeros(3), rtol=0, atol=1e-12, what="mean(y)")
    assert_close(y.var(axis=-1), np.ones(3), rtol=1e-10, atol=0, what="var(y)")


@given(x=activations((3, 5)), dy=activations((3, 5)), seed=st.integers(0, 2**16))
@example(x=np.eye(3, 5), dy=np.ones((3, 5)), seed=1)
def test_layernorm_input_gradient_sums_to_zero_over_each_row(x, dy, seed):
    w = np.random.default_rng(seed).standard_normal(5)
    dx, _, _ = layernorm_backward(dy, layernorm_forward(x, w, np.zeros(5), 1e-5)[1], w)
    scale = 1.0 + np.abs(dx).max()
    assert_close(dx.sum(axis=-1), np.zeros(3), rtol=0, atol=1e-10 * scale, what="Σ_c dx")


def test_layernorm_keeps_float32_and_its_backward_is_idempotent_and_pure(xp, rng):
    x, w, b, dy = (xp.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((4, 6), 6, 6, (4, 6)))
    before = [a.copy() for a in (x, w, b, dy)]
    y, cache = layernorm_forward(x, w, b, 1e-5)
    first = layernorm_backward(dy, cache, w)
    second = layernorm_backward(dy, cache, w)
    assert y.dtype == first[0].dtype == first[1].dtype == first[2].dtype == np.float32
    for a, c in zip(first, second, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(c))
    for a, c in zip((x, w, b, dy), before, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(c))
