"""RMSNorm: y = w ⊙ x / sqrt(mean(x²) + eps), as in Llama (no mean subtraction, no bias).

Tutorial: tutorials/02_rmsnorm_and_rope.py.
"""

from __future__ import annotations

from typing import NamedTuple

from minift.backend import Array, get_xp


class RMSNormCache(NamedTuple):
    x: Array  # (N, C) input; x̂ = x · rstd is recomputed in backward rather than stored twice
    rstd: Array  # (N, 1) 1 / sqrt(mean(x²) + eps)


def rmsnorm_forward(x: Array, w: Array, eps: float) -> tuple[Array, RMSNormCache]:
    """y = w ⊙ x · rstd,  rstd = 1 / sqrt(mean_c(x²) + eps).

    Shapes:
        x: (N, C)   w: (C,)   returns y: (N, C)
    """
    xp = get_xp(x)
    rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (N, 1)
    y = x * rstd
    y *= w  # in place: one (N, C) temporary instead of two
    return y, RMSNormCache(x, rstd)


def rmsnorm_backward(dy: Array, cache: RMSNormCache, w: Array) -> tuple[Array, Array]:
    """Return (dx, dw).

    forward: y = w ⊙ x̂ with x̂ = x · rstd, so dw = Σ_n dy ⊙ x̂ and, with g = dy ⊙ w,
    dx = rstd · (g − x̂ · mean_c(g ⊙ x̂))   (the second term is rstd's dependence on x).

    Shapes:
        dy: (N, C)   returns dx: (N, C), dw: (C,)
    """
    x, rstd = cache
    xhat = x * rstd  # (N, C)
    dw = (dy * xhat).sum(axis=0)
    dx = dy * w  # g, turned into dx in place (it is a fresh temporary)
    dx -= xhat * (dx * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx, dw
