"""SwiGLU h = silu(g) ⊙ u, silu(g) = g σ(g) (the Llama MLP: down(silu(gate(x)) ⊙ up(x))).

Properties: matches the naive reference (scipy's logistic); dg and du match finite differences;
h(g, u) − h(−g, u) = g ⊙ u (since σ(g) + σ(−g) = 1); extreme pre-activations neither overflow nor
warn; float32 is preserved.
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from minift.layers.swiglu import swiglu_backward, swiglu_forward
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations


def test_swiglu_forward_matches_the_naive_reference(xp, rng):
    g, u = 3 * rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    h, _ = swiglu_forward(xp.asarray(g), xp.asarray(u))
    assert_close(h, ref.swiglu(g, u), rtol=1e-12, atol=1e-14, what="h")


def test_swiglu_backward_gives_the_finite_difference_gradient_of_gate_and_up(rng):
    def backward(G, g, u):
        dg, du = swiglu_backward(G, swiglu_forward(g, u)[1])
        return {"g": dg, "u": du}

    args = {"g": 3 * rng.standard_normal((4, 5)), "u": rng.standard_normal((4, 5))}
    check_grad(lambda g, u: swiglu_forward(g, u)[0], backward, args, rng=rng)


@given(g=activations((3, 4), bound=30.0), u=activations((3, 4)))
@example(g=np.array([[-30.0, -1.0, 0.0, 2.0]] * 3), u=np.ones((3, 4)))
def test_swiglu_of_g_minus_swiglu_of_minus_g_is_g_times_u(g, u):
    diff = swiglu_forward(g, u)[0] - swiglu_forward(-g, u)[0]
    assert_close(diff, g * u, rtol=1e-12, atol=1e-12, what="h(g) − h(−g)")


def test_swiglu_is_finite_and_silent_for_extreme_preactivations():
    g = np.array([[-1e4, -800.0, 800.0, 1e4]], dtype=np.float32)
    u = np.ones_like(g)
    h, cache = swiglu_forward(g, u)  # filterwarnings = error turns an overflow warning into a failure
    dg, du = swiglu_backward(np.ones_like(g), cache)
    for a in (h, dg, du):
        assert np.isfinite(a).all()
    assert_close(h, [[0.0, 0.0, 800.0, 1e4]], rtol=1e-6, atol=1e-6, what="h")


def test_swiglu_keeps_float32(xp, rng):
    g, u = (xp.asarray(rng.standard_normal((3, 4)).astype(np.float32)) for _ in range(2))
    h, cache = swiglu_forward(g, u)
    dg, du = swiglu_backward(xp.ones_like(h), cache)
    assert h.dtype == dg.dtype == du.dtype == np.float32


@given(st.integers(0, 2**32 - 1))
def test_the_in_place_backward_equals_the_textbook_formula(seed):
    """du = dh ⊙ silu(g), dg = dh ⊙ u ⊙ (σ + silu·(1 − σ)) written plainly, float64, to 1e-12."""
    rng = np.random.default_rng(seed)
    g, u, dh = (3.0 * rng.standard_normal((7, 5)) for _ in range(3))
    s = 1.0 / (1.0 + np.exp(-g))
    dg, du = swiglu_backward(dh, swiglu_forward(g, u)[1])
    assert_close(du, dh * g * s, rtol=1e-12, atol=1e-14, what="du")
    assert_close(dg, dh * u * (s + g * s * (1.0 - s)), rtol=1e-12, atol=1e-14, what="dg")
