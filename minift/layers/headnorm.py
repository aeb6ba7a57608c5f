"""Per-head RMSNorm (Qwen3's and Gemma 3's q_norm/k_norm): each head's D values normalised on their own,
with one weight (D,) shared by all heads: y[n, h] = w ⊙ x[n, h] / sqrt(mean_d(x[n, h]²) + eps).

It is RMSNorm over rows of D values: the (N, H·D) projection is viewed as N·H rows, and the pair below
runs ``minift.layers.rmsnorm`` on that view. Sharing w across heads is what keeps S2FT's head
permutation exact: moving a head moves its D values, never the weight they are scaled by.
"""

from __future__ import annotations

from typing import NamedTuple

from minift.backend import Array
from minift.layers.rmsnorm import RMSNormCache, rmsnorm_backward, rmsnorm_forward


class HeadRMSNormCache(NamedTuple):
    rows: RMSNormCache  # the RMSNorm cache of the (N·H, D) view: x and rstd (N·H, 1), nothing more


def head_rmsnorm_forward(x: Array, w: Array, eps: float) -> tuple[Array, HeadRMSNormCache]:
    """y[n, h·D + d] = w[d] · x[n, h·D + d] · rstd[n, h],  rstd[n, h] = 1 / sqrt(mean_d(x[n, h, :]²) + eps).

    Shapes:
        x: (N, H·D)   w: (D,)   returns y: (N, H·D)
    """
    N, D = x.shape[0], w.shape[0]
    y, rows = rmsnorm_forward(x.reshape(-1, D), w, eps)  # (N·H, D)
    return y.reshape(N, -1), HeadRMSNormCache(rows)


def head_rmsnorm_backward(dy: Array, cache: HeadRMSNormCache, w: Array) -> tuple[Array, Array]:
    """Return (dx, dw): RMSNorm's backward on each head's row; dw sums over tokens and heads alike.

    Shapes:
        dy: (N, H·D)   returns dx: (N, H·D), dw: (D,)
    """
    N, D = dy.shape[0], w.shape[0]
    dx, dw = rmsnorm_backward(dy.reshape(-1, D), cache.rows, w)
    return dx.reshape(N, -1), dw
