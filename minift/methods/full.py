"""Full fine-tuning, and the one operation every method shares: folding a model into plain dense weights.

Like every method module (see ``minift.methods``) it offers ``Config``, ``apply(model, config, rng)``
and ``merge``/``unmerge`` (the identity here: the weights themselves are trained).

``to_dense`` turns a model of any method into a plain model whose slots are frozen ``Dense`` layers with
the effective weights ``slot.dense_weight()``: the "merged full model" that ``minift.io.hub`` writes as a
standard checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from minift.methods import META_KEY, MethodRecord, record_method
from minift.model import SLOT_NAMES, Block, Model, set_trainable
from minift.slots import Dense, Embedding, Norm


@dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning has no hyperparameters of its own: every array is trained."""


def apply_full(
    model: Model, config: FullConfig | None = None, rng: np.random.Generator | None = None
) -> Model:
    """Make every array trainable: embeddings, norms, projections, LM head (in place)."""
    set_trainable(model, True)
    record_method(model, MethodRecord("full", config or FullConfig()))
    return model


def merge(model: Model) -> Model:
    """Nothing to fold: full fine-tuning trains the weights themselves."""
    return model


unmerge = merge


def _dense(slot: object) -> Dense:
    bias = getattr(slot, "bias", None)
    return Dense(slot.dense_weight().copy(), None if bias is None else bias.copy())  # type: ignore[attr-defined]


def _norm(norm: Norm) -> Norm:
    bias = None if norm.bias is None else norm.bias.copy()
    return replace(norm, weight=norm.weight.copy(), bias=bias, requires_grad=False)


def to_dense(model: Model) -> Model:
    """A frozen copy of ``model`` with every linear slot replaced by a ``Dense`` of its effective weight
    (adapters merged in). The original is not changed and shares no array with the copy.

    A method that reparametrizes the model physically (S2FT's head/channel permutation) must map its
    weights back to the original coordinates before or after this.
    """
    blocks = [
        Block(
            **{name: _norm(norm) for name, norm in b.norms()},
            **({name: None for name in SLOT_NAMES} | {name: _dense(slot) for name, slot in b.slots()}),
        )
        for b in model.blocks
    ]
    meta = {k: v for k, v in model.meta.items() if k != META_KEY}
    return Model(
        config=model.config,
        embed=Embedding(model.embed.weight.copy()),
        blocks=blocks,
        final_norm=_norm(model.final_norm),
        lm_head=None if model.lm_head is None else _dense(model.lm_head),
        pos_embed=None if model.pos_embed is None else Embedding(model.pos_embed.weight.copy()),
        meta=meta,
    )


Config = FullConfig
apply = apply_full
