"""GeGLU gating h = gelu(g) ⊙ u with the tanh-approximated GELU, the non-linearity of Gemma's MLP
down(gelu(gate x) ⊙ up x) (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5; transformers'
``gelu_pytorch_tanh``). The GELU and its derivative are GPT-2's pair, ``minift.layers.gelu``.
"""

from __future__ import annotations

from typing import NamedTuple

from minift.backend import Array
from minift.layers.gelu import gelu_backward, gelu_forward


class GeGLUCache(NamedTuple):
    g: Array  # (N, F) gate pre-activation; gelu(g) is recomputed (one tanh) instead of stored
    u: Array  # (N, F) up projection


def geglu_forward(g: Array, u: Array) -> tuple[Array, GeGLUCache]:
    """h = gelu(g) ⊙ u,  gelu(g) = ½ g (1 + tanh(√(2/π)(g + 0.044715 g³))).

    Shapes:
        g, u: (N, F)   returns h: (N, F)
    """
    h = gelu_forward(g)
    h *= u
    return h, GeGLUCache(g, u)


def geglu_backward(dh: Array, cache: GeGLUCache) -> tuple[Array, Array]:
    """Return (dg, du):  du = dh ⊙ gelu(g),  dg = gelu'(g) ⊙ (dh ⊙ u).

    Shapes:
        dh: (N, F)   returns dg, du: (N, F)
    """
    g, u = cache
    du = gelu_forward(g)
    du *= dh
    return gelu_backward(dh * u, g), du
