"""Per-head RMSNorm (the q/k norms of Qwen3 and Gemma 3): each head's D values normalised on their own,
y[n, h] = w ⊙ x[n, h] / sqrt(mean_d(x[n, h]²) + eps), one weight (D,) for every head.

Properties: matches a naive per-head loop; dx and dw match finite differences; permuting whole heads
commutes with the norm (what keeps S2FT's head permutation exact); each head is invariant to its own
positive rescaling when eps = 0; one head is plain RMSNorm; float32 is preserved.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minift.layers.headnorm import head_rmsnorm_backward, head_rmsnorm_forward
from minift.layers.rmsnorm import rmsnorm_forward
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations


def test_head_rmsnorm_forward_matches_a_naive_loop_over_heads(xp, rng):
    N, H, D = 3, 4, 5
    x, w = rng.standard_normal((N, H * D)), 1.0 + 0.3 * rng.standard_normal(D)
    y, _ = head_rmsnorm_forward(xp.asarray(x), xp.asarray(w), 1e-3)
    expected = np.concatenate([ref.rmsnorm(x[:, h * D:(h + 1) * D], w, 1e-3) for h in range(H)], axis=1)
    assert_close(y, expected, rtol=1e-12, atol=1e-14, what="y")


def test_head_rmsnorm_backward_gives_the_finite_difference_gradient_of_x_and_w(rng):
    def backward(G, x, w):
        dx, dw = head_rmsnorm_backward(G, head_rmsnorm_forward(x, w, 0.05)[1], w)
        return {"x": dx, "w": dw}

    args = {"x": rng.standard_normal((3, 4 * 6)), "w": 1.0 + 0.3 * rng.standard_normal(6)}
    check_grad(lambda x, w: head_rmsnorm_forward(x, w, 0.05)[0], backward, args, rng=rng)


@given(x=activations((3, 4 * 2)), order=st.permutations(range(4)))
def test_permuting_whole_heads_commutes_with_the_norm(x, order):
    w = np.array([0.5, 2.0])
    cols = [c for h in order for c in range(2 * h, 2 * h + 2)]
    y, _ = head_rmsnorm_forward(x[:, cols], w, 1e-6)
    assert_close(y, head_rmsnorm_forward(x, w, 1e-6)[0][:, cols], rtol=0, atol=0, what="permuted y")


@given(x=arrays(np.float64, (2, 3 * 4), elements=st.one_of(st.floats(-3.0, -0.5), st.floats(0.5, 3.0))),
       scales=st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3))
def test_each_head_is_invariant_to_its_own_positive_scale_without_eps(x, scales):
    w = np.array([1.0, -0.5, 2.0, 0.3])
    scaled = (x.reshape(2, 3, 4) * np.array(scales)[None, :, None]).reshape(2, 12)
    assert_close(head_rmsnorm_forward(scaled, w, 0.0)[0], head_rmsnorm_forward(x, w, 0.0)[0],
                 rtol=1e-12, atol=1e-12, what="y of rescaled heads")


def test_one_head_is_plain_rmsnorm(rng):
    x, w = rng.standard_normal((5, 6)), rng.standard_normal(6)
    np.testing.assert_array_equal(head_rmsnorm_forward(x, w, 1e-5)[0], rmsnorm_forward(x, w, 1e-5)[0])


def test_head_rmsnorm_keeps_float32(xp, rng):
    x, w = xp.asarray(rng.standard_normal((3, 8)).astype(np.float32)), xp.ones(4, dtype=np.float32)
    y, cache = head_rmsnorm_forward(x, w, 1e-6)
    dx, dw = head_rmsnorm_backward(xp.ones_like(y), cache, w)
    assert y.dtype == dx.dtype == dw.dtype == np.float32
