"""Linear slots: every projection of a block (q, k, v, o, gate, up, down) and the LM head is a slot.

A slot runs itself forward, keeps what its own backward needs, and returns gradients for its
trainable arrays only. The model never asks which fine-tuning method a slot belongs to: a method is
"a slot type, a function that swaps a model's slots, and merge/export" (see ``minift.methods``).

| slot                 | forward               | kept for backward | gradients       |
|----------------------|-----------------------|-------------------|-----------------|
| Dense, frozen        | y = x Wᵀ + b          | nothing           | dx              |
| Dense, trainable     | y = x Wᵀ + b          | x                 | dx, dW, db      |

The same module holds the two non-linear parameter holders, ``Norm`` and ``Embedding``, which can also
be frozen or trainable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from minift.backend import Array
from minift.layers.embedding import embedding_backward, embedding_forward
from minift.layers.headnorm import head_rmsnorm_backward, head_rmsnorm_forward
from minift.layers.layernorm import layernorm_backward, layernorm_forward
from minift.layers.linear import (
    linear_backward_bias,
    linear_backward_input,
    linear_backward_weight,
    linear_forward,
)
from minift.layers.rmsnorm import rmsnorm_backward, rmsnorm_forward

Grads = dict[str, Array]


@runtime_checkable
class LinearSlot(Protocol):
    """What the model needs of a projection. ``x`` is flattened to (N, I) tokens."""

    @property
    def in_features(self) -> int: ...  # I

    @property
    def out_features(self) -> int: ...  # O

    def forward(self, x: Array, *, keep: bool, rng: np.random.Generator | None = None) -> tuple[Array, Any]:
        """Return y (N, O) and a cache; with ``keep=False`` (inference) the cache is None."""
        ...

    def backward(self, dy: Array, cache: Any, *, need_dx: bool = True) -> tuple[Array | None, Grads]:
        """Return dx (N, I) (None when not needed) and gradients named as in ``parameters()``."""
        ...

    def parameters(self) -> dict[str, Array]:
        """The trainable arrays by local name. They are updated in place by the optimizer."""
        ...

    def dense_weight(self) -> Array:
        """The effective weight W (O, I) of y = x Wᵀ + b, adapters included (for merging)."""
        ...

    def flops(self, n_tokens: int, *, need_dx: bool = True) -> tuple[int, int]:
        """Multiply-add FLOPs (2 per MAC) of (forward, backward) on ``n_tokens`` tokens."""
        ...


class WeightShape:
    """``in_features``/``out_features`` of a slot whose function has the shape of its ``weight`` (O, I)."""

    weight: Array

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass(eq=False)
class Dense(WeightShape):
    """A dense projection y = x Wᵀ + b, frozen or trained in full (full fine-tuning)."""

    weight: Array  # (O, I), PyTorch's [out, in] layout
    bias: Array | None = None  # (O,)
    requires_grad: bool = False  # the bias, when present, is trained together with the weight

    def forward(
        self, x: Array, *, keep: bool, rng: np.random.Generator | None = None
    ) -> tuple[Array, Array | None]:
        y = linear_forward(x, self.weight, self.bias)
        # A frozen weight's backward needs only W, which the slot holds: keep nothing.
        return y, (x if keep and self.requires_grad else None)

    def backward(self, dy: Array, cache: Array | None, *, need_dx: bool = True) -> tuple[Array | None, Grads]:
        dx = linear_backward_input(dy, self.weight) if need_dx else None
        if not self.requires_grad:
            return dx, {}
        grads = {"weight": linear_backward_weight(dy, cache)}
        if self.bias is not None:
            grads["bias"] = linear_backward_bias(dy)
        return dx, grads

    def parameters(self) -> dict[str, Array]:
        if not self.requires_grad:
            return {}
        return {"weight": self.weight} | ({"bias": self.bias} if self.bias is not None else {})

    def dense_weight(self) -> Array:
        return self.weight

    def flops(self, n_tokens: int, *, need_dx: bool = True) -> tuple[int, int]:
        mac = 2 * n_tokens * self.in_features * self.out_features
        return mac, mac * (int(need_dx) + int(self.requires_grad))


@dataclass(eq=False)
class Norm:
    """RMSNorm weight (Llama family); ``bias`` is set only for LayerNorm (GPT-2).

    ``per_head``: the weight (D,) normalises each head of an (N, H·D) input on its own (q/k norms).
    ``unit_offset``: the norm scales by (1 + w) instead of w (Gemma; its checkpoints store w, and a
    zero w is the identity scale). Since d(1 + w)/dw = 1, the gradient of w is that of the scale.
    """

    weight: Array  # (C,), or (D,) per head
    bias: Array | None = None  # (C,) LayerNorm only
    eps: float = 1e-6
    requires_grad: bool = False
    per_head: bool = False
    unit_offset: bool = False

    def scale(self) -> Array:
        """The effective scale: w, or 1 + w with ``unit_offset``."""
        return self.weight + 1.0 if self.unit_offset else self.weight

    def forward(self, x: Array, *, keep: bool) -> tuple[Array, Any]:
        if self.bias is not None:
            y, cache = layernorm_forward(x, self.weight, self.bias, self.eps)
        elif self.per_head:
            y, cache = head_rmsnorm_forward(x, self.scale(), self.eps)
        else:
            y, cache = rmsnorm_forward(x, self.scale(), self.eps)
        return y, (cache if keep else None)

    def backward(self, dy: Array, cache: Any) -> tuple[Array, Grads]:
        if self.bias is not None:
            dx, dw, db = layernorm_backward(dy, cache, self.weight)
            grads = {"weight": dw, "bias": db}
        else:
            backward = head_rmsnorm_backward if self.per_head else rmsnorm_backward
            dx, dw = backward(dy, cache, self.scale())
            grads = {"weight": dw}
        return dx, (grads if self.requires_grad else {})

    def parameters(self) -> dict[str, Array]:
        if not self.requires_grad:
            return {}
        return {"weight": self.weight} | ({"bias": self.bias} if self.bias is not None else {})


@dataclass(eq=False)
class Embedding:
    """A lookup table E (V, C) for token ids, or (P, C) for GPT-2's learned positions."""

    weight: Array  # (V, C)
    requires_grad: bool = False

    def forward(self, ids: Array) -> Array:
        return embedding_forward(ids, self.weight)

    def backward(self, dy: Array, ids: Array) -> Grads:
        if not self.requires_grad:
            return {}
        return {"weight": embedding_backward(dy, ids, self.weight.shape[0])}

    def parameters(self) -> dict[str, Array]:
        return {"weight": self.weight} if self.requires_grad else {}
