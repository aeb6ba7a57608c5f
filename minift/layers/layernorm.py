"""LayerNorm (GPT-2): y = w ⊙ (x − mean(x)) / sqrt(var(x) + eps) + b."""

from __future__ import annotations

from typing import NamedTuple

from minift.backend import Array, get_xp


class LayerNormCache(NamedTuple):
    xhat: Array  # (N, C) normalised input; dw and dx both need it, so it is kept instead of x
    rstd: Array  # (N, 1) 1 / sqrt(var + eps)


def layernorm_forward(x: Array, w: Array, b: Array, eps: float) -> tuple[Array, LayerNormCache]:
    """y = w ⊙ x̂ + b,  x̂ = (x − μ) · rstd,  rstd = 1 / sqrt(mean_c((x − μ)²) + eps).

    Shapes:
        x: (N, C)   w, b: (C,)   returns y: (N, C)
    """
    xp = get_xp(x)
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)  # (N, 1)
    xhat = xc * rstd
    return xhat * w + b, LayerNormCache(xhat, rstd)


def layernorm_backward(dy: Array, cache: LayerNormCache, w: Array) -> tuple[Array, Array, Array]:
    """Return (dx, dw, db).

    forward: y = w ⊙ x̂ + b, so dw = Σ_n dy ⊙ x̂, db = Σ_n dy, and with g = dy ⊙ w,
    dx = rstd · (g − mean_c(g) − x̂ · mean_c(g ⊙ x̂))   (the mean and the variance both depend on x).

    Shapes:
        dy: (N, C)   returns dx: (N, C), dw, db: (C,)
    """
    xhat, rstd = cache
    g = dy * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)
