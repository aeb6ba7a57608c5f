"""GeGLU h = gelu(g) ⊙ u with the tanh GELU (Gemma's MLP: down(gelu(gate(x)) ⊙ up(x))).

Properties: matches the naive reference; dg and du match finite differences; h(g, u) − h(−g, u) = g ⊙ u
(since gelu(g) − gelu(−g) = g: tanh is odd); h is linear in u; float32 is preserved.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given

from minift.layers.geglu import geglu_backward, geglu_forward
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations


def test_geglu_forward_matches_the_naive_reference(xp, rng):
    g, u = 3 * rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    h, _ = geglu_forward(xp.asarray(g), xp.asarray(u))
    assert_close(h, ref.gelu_new(g) * u, rtol=1e-12, atol=1e-14, what="h")


def test_geglu_backward_gives_the_finite_difference_gradient_of_gate_and_up(rng):
    def backward(G, g, u):
        dg, du = geglu_backward(G, geglu_forward(g, u)[1])
        return {"g": dg, "u": du}

    args = {"g": 3 * rng.standard_normal((4, 5)), "u": rng.standard_normal((4, 5))}
    check_grad(lambda g, u: geglu_forward(g, u)[0], backward, args, rng=rng)


@given(g=activations((3, 4), bound=30.0), u=activations((3, 4)))
def test_geglu_of_g_minus_geglu_of_minus_g_is_g_times_u(g, u):
    diff = geglu_forward(g, u)[0] - geglu_forward(-g, u)[0]
    assert_close(diff, g * u, rtol=1e-12, atol=1e-12, what="h(g) − h(−g)")


@given(g=activations((2, 3)), u=activations((2, 3)), v=activations((2, 3)))
def test_geglu_is_linear_in_the_up_projection(g, u, v):
    lhs = geglu_forward(g, 2.0 * u - v)[0]
    rhs = 2.0 * geglu_forward(g, u)[0] - geglu_forward(g, v)[0]
    assert_close(lhs, rhs, rtol=1e-12, atol=1e-12, what="h(g, 2u − v)")


def test_geglu_keeps_float32(xp, rng):
    g, u = (xp.asarray(rng.standard_normal((3, 4)).astype(np.float32)) for _ in range(2))
    h, cache = geglu_forward(g, u)
    dg, du = geglu_backward(xp.ones_like(h), cache)
    assert h.dtype == dg.dtype == du.dtype == np.float32
