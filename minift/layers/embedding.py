"""Token (or position) embedding lookup y = E[ids]."""

from __future__ import annotations

from minift.backend import Array, get_xp, scatter_add


def embedding_forward(ids: Array, table: Array) -> Array:
    """y[n] = E[ids[n]]. The backward needs only ``ids``, which the caller already holds.

    Shapes:
        ids: (...) integer   table: (V, C)   returns: (..., C)
    """
    return table[ids]


def embedding_backward(dy: Array, ids: Array, vocab_size: int) -> Array:
    """dE[v] = Σ_{n: ids[n] = v} dy[n]; repeated ids accumulate (scatter-add).

    Shapes:
        dy: (..., C)   ids: (...)   returns: (V, C)
    """
    xp = get_xp(dy)
    C = dy.shape[-1]
    dtable = xp.zeros((vocab_size, C), dtype=dy.dtype)
    scatter_add(dtable, ids.reshape(-1), dy.reshape(-1, C))
    return dtable
