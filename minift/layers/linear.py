"""Linear layer y = x Wᵀ + b, with the backward split into an input part and a weight part.

The split is what makes the fine-tuning methods cheap: a frozen weight calls only
``linear_backward_input``; S2FT calls ``linear_backward_weight`` on the trainable slice alone.
Tutorial: tutorials/01_backprop_by_hand.py.
"""

from __future__ import annotations

from minift.backend import Array, get_xp


def linear_forward(x: Array, w: Array, b: Array | None = None) -> Array:
    """y = x Wᵀ + b.

    No cache is returned: what the backward needs (x for dW, W for dx) depends on which side is
    trained, so the caller (a linear slot) decides what to keep.

    Shapes:
        x: (N, I)   w: (O, I)   b: (O,)   returns: (N, O)
    """
    y = x @ w.T  # (N, O)
    if b is not None:
        y += b
    return y


def linear_backward_input(dy: Array, w: Array) -> Array:
    """dx = dy W  (forward: y = x Wᵀ).

    Shapes:
        dy: (N, O)   w: (O, I)   returns: (N, I)
    """
    return dy @ w


def linear_backward_weight(dy: Array, x: Array) -> Array:
    """dW = dyᵀ x  (forward: y = x Wᵀ). Pass column slices of x to get column blocks of dW.

    Shapes:
        dy: (N, O)   x: (N, I)   returns: (O, I)
    """
    return dy.T @ x


def linear_backward_bias(dy: Array) -> Array:
    """db = Σ_n dy  (forward: y = x Wᵀ + b).

    Shapes:
        dy: (N, O)   returns: (O,)
    """
    return get_xp(dy).sum(dy, axis=0)
