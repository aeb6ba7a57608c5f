"""The interface an implementation exposes to be checked against the minift spec.

Every argument and result is a NumPy float64 array (an implementation converts internally), and
model weights use Hugging Face key names and layouts (``model.layers.0.self_attn.o_proj.weight``,
PyTorch's ``[out, in]``; GPT-2's ``transformer.h.0.attn.c_attn.weight`` in Conv1D's ``[in, out]``), so
the spec speaks the lingua franca of checkpoints rather than minift's own structures. A weight dict
holds biases where the family has them and no ``lm_head.weight`` when the head is tied
(``minift.spec.cases.shapes`` lists them). The S2FT operations take the rotary families' configs
(every family but GPT-2).

A *selection* maps a layer index to a list of distinct indices (heads, or FFN channels).

What the decoder computes is defined by ``minift.spec.reference`` (float64 throughout, RoPE pairing
dimension i with i + D/2, attention scale 1/√head_dim, the config's ``rms_norm_eps``, ``rope_theta`` and
``rope_scaling``, biases per family, tied or untied head); the spec compares logits and loss against it
normwise: ‖a − r‖_F ≤ 1e-6 · ‖r‖_F for logits, |a − r| ≤ 1e-6 · max(1, |r|) for the loss (a float32
RoPE table, as Hugging Face builds it, is off by about 1e-8).

Inputs: the spec hands every call its own deep copy of every argument, so an implementation may
write into its inputs; nothing it does to them is seen by the property or by a later call.

S2FT co-permutation layout (``copermute``). With H query heads, K key/value heads and G = H / K
heads per group, a valid permutation moves whole key/value groups and permutes query heads only within
their group (query head h reads kv head h // G, before and after); Q rows, O input columns (and q/o
biases) move with their query head, K/V rows with their group, Gate/Up rows and Down columns with
their channel. Call a group *full*, *partial* or *empty* by how many of its heads are selected; p is
the number of partial groups. The documented layout is the minimal one:

- the key/value groups touched by the selection come first (one segment of K/V rows);
- the selected query heads form ⌈p/2⌉ contiguous segments (one when p ≤ 2; always one under MHA), the
  fewest any valid permutation can reach: order the groups partial₀, full…, partial₁, partial₂, …,
  empty…, with the selected heads last inside partial₀, partial₂, … and first inside the others;
- a selection of whole groups only (p = 0) occupies exactly the leading query heads and kv heads;
- the selected channels are the leading Down columns and Gate/Up rows.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Protocol

import numpy as np

Weights = dict[str, np.ndarray]
Selection = dict[int, list[int]]


class Implementation(Protocol):
    """The operations the spec's properties are written against."""

    name: str

    # Optional: ``supports(config) -> bool``, the decoder configs the implementation computes. A port of
    # one family declares it, and the decoder and S2FT properties then draw only configs it accepts
    # (``minift.spec.properties.computes``); without it every family the spec defines is drawn.

    def decoder_logits(self, config: dict[str, Any], weights: Weights, tokens: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of the decoder ``config`` (a HF ``config.json`` dict: Llama, Mistral, Qwen2,
        Qwen3, Gemma 3 or GPT-2) for tokens (B, T), as ``minift.spec.reference.logits`` defines them."""
        ...

    def decoder_loss_and_grads(
        self, config: dict[str, Any], weights: Weights, tokens: np.ndarray, targets: np.ndarray
    ) -> tuple[float, Weights]:
        """Mean cross-entropy of next-token targets (B, T) over every position whose target is not −100
        (already shifted: targets[b, t] follows position t; one mean over the batch, not per sequence)
        and its gradient with respect to every weight, keyed like ``weights`` (a tied head's gradient is
        part of the embedding's)."""
        ...

    def copermute(
        self, config: dict[str, Any], weights: Weights, heads: Selection, channels: Selection
    ) -> tuple[Weights, Any]:
        """S2FT co-permutation bringing the selected heads and channels of each layer to the front of
        their matrices; returns the permuted weights and whatever ``unpermute`` needs."""
        ...

    def unpermute(self, config: dict[str, Any], weights: Weights, state: Any) -> Weights:
        """Inverse of ``copermute``."""
        ...

    def s2ft_block_grads(
        self,
        config: dict[str, Any],
        weights: Weights,
        tokens: np.ndarray,
        targets: np.ndarray,
        heads: Selection,
        channels: Selection,
    ) -> Weights:
        """S2FT's partial-backprop gradients of the trained blocks, in original coordinates: for each
        layer l, ``...layers.l.self_attn.o_proj.weight`` → (C, S·D), the input columns of the selected
        heads in selection order, and ``...layers.l.mlp.down_proj.weight`` → (C, S), the selected channels."""
        ...

    def lora_forward(
        self, x: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
    ) -> np.ndarray:
        """y = x Wᵀ + scaling · (x Aᵀ) Bᵀ.  x: (N, I), W: (O, I), A: (R, I), B: (O, R)."""
        ...

    def lora_merge(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
        """W + scaling · B A."""
        ...

    def lora_unmerge(self, W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
        """W − scaling · B A."""
        ...

    def pissa_init(self, W: np.ndarray, r: int, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """PiSSA's exact-SVD init with scaling alpha / r: (W_res, A (R, I), B (O, R))."""
        ...

    def sorsa_split(self, W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """SORSA's split W = W_res + B diag(S) A: (W_res, B (O, R), S (R,), A (R, I))."""
        ...

    def sorsa_forward(
        self, x: np.ndarray, W_res: np.ndarray, B: np.ndarray, S: np.ndarray, A: np.ndarray
    ) -> np.ndarray:
        """y = x W_resᵀ + ((x Aᵀ) ⊙ S) Bᵀ."""
        ...

    def sorsa_merge(self, W_res: np.ndarray, B: np.ndarray, S: np.ndarray, A: np.ndarray) -> np.ndarray:
        """W_res + B diag(S) A."""
        ...

    def sorsa_regularizer(
        self, factors: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """The orthonormal regularizer over adapted matrices given as (A, B) pairs, and its gradient:
        mean over the 2·len(factors) matrices of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (not squared)."""
        ...


def _fresh(value: Any) -> Any:
    return copy.deepcopy(value)


class Guarded:
    """An implementation whose every call gets its own deep copy of the arguments: what it writes into
    them is seen neither by the property nor by a later call (the spec's promise to implementations)."""

    def __init__(self, impl: Implementation) -> None:
        self._impl = impl

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._impl, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return attr(*_fresh(args), **_fresh(kwargs))

        return call
