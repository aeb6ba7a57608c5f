"""RMSNorm y = w ⊙ x / sqrt(mean(x²) + eps) (transformers' ``LlamaRMSNorm``).

Properties: matches the naive reference; dx and dw match finite differences; with eps = 0 it is
invariant to positive rescaling of its input, and with w = 1 every output row has unit RMS; float32
is preserved; backward is idempotent and leaves its inputs alone.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, example, given
from hypothesis import strategies as st

from minift.backend import to_numpy
from minift.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations


def test_rmsnorm_forward_matches_the_naive_reference(xp, rng):
    x, w = rng.standard_normal((4, 6)), rng.standard_normal(6)
    y, _ = rmsnorm_forward(xp.asarray(x), xp.asarray(w), 1e-5)
    assert_close(y, ref.rmsnorm(x, w, 1e-5), rtol=1e-12, atol=1e-12, what="y")


def test_rmsnorm_backward_gives_the_finite_difference_gradient_of_x_and_w(rng):
    def backward(G, x, w):
        dx, dw = rmsnorm_backward(G, rmsnorm_forward(x, w, 1e-5)[1], w)
        return {"x": dx, "w": dw}

    args = {"x": rng.standard_normal((4, 6)), "w": rng.standard_normal(6)}
    check_grad(lambda x, w: rmsnorm_forward(x, w, 1e-5)[0], backward, args, rng=rng)


@given(x=activations((3, 5)), c=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
@example(x=np.arange(15.0).reshape(3, 5) - 7, c=10.0, seed=0)
def test_rmsnorm_is_invariant_to_positive_rescaling_of_its_input(x, c, seed):
    assume(np.sqrt((x * x).mean(axis=-1)).min() > 1e-3)  # eps = 0 divides by the RMS
    w = np.random.default_rng(seed).standard_normal(5)
    assert_close(rmsnorm_forward(c * x, w, 0.0)[0], rmsnorm_forward(x, w, 0.0)[0], rtol=1e-9, atol=1e-12,
                 what="y(c·x)")


@given(x=activations((3, 5)))
@example(x=np.full((3, 5), 2.0))
def test_rmsnorm_with_unit_weight_gives_rows_of_unit_rms(x):
    assume(np.sqrt((x * x).mean(axis=-1)).min() > 1e-3)
    y, _ = rmsnorm_forward(x, np.ones(5), 0.0)
    assert_close(np.sqrt((y * y).mean(axis=-1)), np.ones(3), rtol=1e-12, atol=0, what="rms(y)")


def test_rmsnorm_keeps_float32_and_its_backward_is_idempotent_and_pure(xp, rng):
    x = xp.asarray(rng.standard_normal((4, 6)).astype(np.float32))
    w = xp.asarray(rng.standard_normal(6).astype(np.float32))
    dy = xp.asarray(rng.standard_normal((4, 6)).astype(np.float32))
    x0, w0, dy0 = x.copy(), w.copy(), dy.copy()
    y, cache = rmsnorm_forward(x, w, 1e-6)
    first = rmsnorm_backward(dy, cache, w)
    second = rmsnorm_backward(dy, cache, w)
    assert y.dtype == first[0].dtype == first[1].dtype == np.float32
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    for a, b in ((x, x0), (w, w0), (dy, dy0)):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
