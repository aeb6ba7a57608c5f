"""Partial-backpropagation slots: a frozen weight with trainable contiguous blocks (S2FT, paper Sec. 3.3).

After co-permutation (``minift.methods.s2ft.permute``) the selected heads or channels of a matrix
occupy contiguous ranges ("segments") of its input columns (O, Down: the consumer side, W2) or output
rows (Q, K, V, Gate, Up: the producer side, W1). The trainable arrays are NumPy *views* of those
ranges, so the optimizer updates the weight in place and keeps state of the blocks' size only.

| slot          | forward    | kept for backward     | gradients                      |
|---------------|------------|-----------------------|--------------------------------|
| ColumnBlock   | y = x Wᵀ+b | x[:, a:b] per segment | dx = dy W, dW[:, a:b] = dyᵀ x[:, a:b] |
| RowBlock      | y = x Wᵀ+b | x                     | dx = dy W, dW[a:b, :] = dy[:, a:b]ᵀ x |

Cost per slot on N tokens with s = Σ (b − a) selected columns or rows (multiply-adds ×2; paper Sec. 3.3):

| | full FT | ColumnBlock (W2) | RowBlock (W1) | frozen |
|---|---|---|---|---|
| dx FLOPs | 2·N·I·O | 2·N·I·O | 2·N·I·O | 2·N·I·O |
| dW FLOPs | 2·N·I·O | 2·N·s·O | 2·N·s·I | 0 |
| activation kept | N·I | N·s | N·I | 0 |
| gradient + Adam m, v | 3·I·O | 3·s·O | 3·s·I | 0 |

So the backward of a slot drops from 2× to about 1× its forward, and the column side is also the
memory-friendly side: it keeps an N×s copy of the input, not the input itself. Biases stay frozen.

Parameters are named ``weight`` when there is one segment (always for MHA and FFN channels) and
``weight_0``, ``weight_1``, … when a grouped-query head selection needs several (see ``permute``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from minift.backend import Array, get_xp
from minift.layers.linear import linear_backward_input, linear_backward_weight, linear_forward
from minift.slots import Grads, WeightShape

Segments = tuple[tuple[int, int], ...]  # contiguous [start, stop) ranges, ascending and disjoint


def segment_names(segments: Segments) -> list[str]:
    """Parameter names of the blocks: ``weight`` for one segment, ``weight_<k>`` for several."""
    return ["weight"] if len(segments) == 1 else [f"weight_{k}" for k in range(len(segments))]


def segment_size(segments: Segments) -> int:
    """S, the number of selected columns or rows."""
    return sum(b - a for a, b in segments)


@dataclass(eq=False)
class ColumnBlock(WeightShape):
    """Frozen W (O, I) whose input columns W[:, a:b] of each segment are trainable (O and Down).

    ``reference`` holds a copy of the blocks as they were when the slot was made (O, S), so the
    adapter ΔW = W[:, blocks] − reference can be extracted after training without the base model.
    """

    weight: Array  # (O, I)
    segments: Segments
    reference: Array  # (O, S): the initial blocks, concatenated in segment order
    bias: Array | None = None  # (O,), frozen

    def forward(
        self, x: Array, *, keep: bool, rng: np.random.Generator | None = None
    ) -> tuple[Array, tuple[Array, ...] | None]:
        """y = x Wᵀ + b; keeps a contiguous copy of x[:, a:b] per segment, N·S values instead of N·I
        (a slice would be a view that keeps all of x alive)."""
        y = linear_forward(x, self.weight, self.bias)
        if not keep:
            return y, None
        xp = get_xp(x)
        return y, tuple(xp.ascontiguousarray(x[:, a:b]) for a, b in self.segments)

    def backward(
        self, dy: Array, cache: tuple[Array, ...], *, need_dx: bool = True
    ) -> tuple[Array | None, Grads]:
        """dx = dy W (full: the layers below need it) and dW[:, a:b] = dyᵀ x[:, a:b] per segment."""
        dx = linear_backward_input(dy, self.weight) if need_dx else None
        names = segment_names(self.segments)
        return dx, {n: linear_backward_weight(dy, xs) for n, xs in zip(names, cache, strict=True)}

    def parameters(self) -> dict[str, Array]:
        """Views W[:, a:b], derived on access so that moving ``weight`` keeps them tied."""
        names = segment_names(self.segments)
        return {n: self.weight[:, a:b] for n, (a, b) in zip(names, self.segments, strict=True)}

    def dense_weight(self) -> Array:
        return self.weight

    def flops(self, n_tokens: int, *, need_dx: bool = True) -> tuple[int, int]:
        fwd = 2 * n_tokens * self.in_features * self.out_features
        return fwd, fwd * int(need_dx) + 2 * n_tokens * segment_size(self.segments) * self.out_features


@dataclass(eq=False)
class RowBlock(WeightShape):
    """Frozen W (O, I) whose output rows W[a:b, :] of each segment are trainable (Q, K, V, Gate, Up).

    Every selected row's gradient needs all input columns, so the whole x is kept. ``reference`` is
    a copy of the initial blocks (S, I), as in ``ColumnBlock``.
    """

    weight: Array  # (O, I)
    segments: Segments
    reference: Array  # (S, I)
    bias: Array | None = None  # (O,), frozen

    def forward(self, x: Array, *, keep: bool, rng: np.random.Generator | None = None) -> tuple[Array, Any]:
        return linear_forward(x, self.weight, self.bias), (x if keep else None)

    def backward(self, dy: Array, cache: Array, *, need_dx: bool = True) -> tuple[Array | None, Grads]:
        """dx = dy W and dW[a:b, :] = dy[:, a:b]ᵀ x per segment."""
        dx = linear_backward_input(dy, self.weight) if need_dx else None
        names = segment_names(self.segments)
        return dx, {
            n: linear_backward_weight(dy[:, a:b], cache)
            for n, (a, b) in zip(names, self.segments, strict=True)
        }

    def parameters(self) -> dict[str, Array]:
        names = segment_names(self.segments)
        return {n: self.weight[a:b, :] for n, (a, b) in zip(names, self.segments, strict=True)}

    def dense_weight(self) -> Array:
        return self.weight

    def flops(self, n_tokens: int, *, need_dx: bool = True) -> tuple[int, int]:
        fwd = 2 * n_tokens * self.in_features * self.out_features
        return fwd, fwd * int(need_dx) + 2 * n_tokens * segment_size(self.segments) * self.in_features


def block_slot(
    kind: str, weight: Array, segments: Segments, bias: Array | None = None
) -> ColumnBlock | RowBlock:
    """A ``ColumnBlock`` (kind ``"columns"``) or ``RowBlock`` (``"rows"``) over ``weight``, its
    reference copied from the current blocks."""
    xp = get_xp(weight)
    if kind == "columns":
        ref = xp.concatenate([weight[:, a:b] for a, b in segments], axis=1)
        return ColumnBlock(weight, segments, ref, bias)
    ref = xp.concatenate([weight[a:b, :] for a, b in segments], axis=0)
    return RowBlock(weight, segments, ref, bias)
