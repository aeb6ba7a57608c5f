"""SwiGLU gating h = silu(g) ⊙ u, the non-linearity of the Llama MLP down(silu(gate x) ⊙ up x)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minift.backend import Array, get_xp


class SwiGLUCache(NamedTuple):
    g: Array  # (N, F) gate pre-activation; σ(g) is recomputed (one exp) instead of stored
    u: Array  # (N, F) up projection


def _sigmoid(z: Array) -> Array:
    # 1 / (1 + exp(−z)): one exp, half the cost of tanh's form 0.5·(1 + tanh(z/2)). For z below about
    # −88 (float32) exp(−z) overflows to inf, and 1 / inf is the correct 0, so that warning is muted.
    xp = get_xp(z)
    with np.errstate(over="ignore"):
        s = xp.exp(-z)
    s += 1.0  # in place on the fresh exp: (N, F) temporaries are what these element-wise ops cost
    return xp.reciprocal(s, out=s)


def swiglu_forward(g: Array, u: Array) -> tuple[Array, SwiGLUCache]:
    """h = silu(g) ⊙ u,  silu(g) = g · σ(g).

    Shapes:
        g, u: (N, F)   returns h: (N, F)
    """
    h = _sigmoid(g)
    h *= g
    h *= u
    return h, SwiGLUCache(g, u)


def swiglu_backward(dh: Array, cache: SwiGLUCache) -> tuple[Array, Array]:
    """Return (dg, du):  du = dh ⊙ silu(g),  dg = dh ⊙ u ⊙ silu'(g),
    silu'(g) = σ(g)(1 + g(1 − σ(g))) = σ(g) + silu(g)(1 − σ(g)).

    Shapes:
        dh: (N, F)   returns dg, du: (N, F)
    """
    g, u = cache
    s = _sigmoid(g)
    # textbook:  du = dh ⊙ silu(g);  dg = dh ⊙ u ⊙ (σ + silu(g)·(1 − σ)),  σ = sigmoid(g)
    # below, the same products built in place in two (N, F) buffers:
    du = g * s  # silu(g), turned into du in place
    dg = 1.0 - s  # built up in place into dg = dh ⊙ u ⊙ (σ + silu·(1 − σ)) = dh ⊙ u ⊙ σ(1 + g(1 − σ))
    dg *= g
    dg += 1.0
    dg *= s
    del s  # three (N, F) temporaries at most, not four
    du *= dh
    dg *= u
    dg *= dh
    return dg, du
