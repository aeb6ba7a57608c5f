"""GPT-2's tanh-approximated GELU ("gelu_new"): y = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""

from __future__ import annotations

import math

from minift.backend import Array, get_xp

_C = math.sqrt(2.0 / math.pi)


def gelu_forward(x: Array) -> Array:
    """y = ½ x (1 + tanh(u)),  u = √(2/π)(x + 0.044715 x³). The backward needs only x (no cache).

    Shapes:
        x: (N, F)   returns: (N, F)
    """
    xp = get_xp(x)
    return 0.5 * x * (1.0 + xp.tanh(_C * (x + 0.044715 * x**3)))


def gelu_backward(dy: Array, x: Array) -> Array:
    """dx = dy · (½(1 + t) + ½ x (1 − t²) √(2/π)(1 + 3·0.044715 x²)),  t = tanh(u).

    Shapes:
        dy, x: (N, F)   returns: (N, F)
    """
    xp = get_xp(x)
    t = xp.tanh(_C * (x + 0.044715 * x**3))
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * x * x))
