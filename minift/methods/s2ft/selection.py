"""Which heads and channels S2FT trains: the five strategies of paper Sec. 3.2 / App. D (Table 4).

Each head or channel is scored on its *consumer* matrix (O for heads, Down for channels), the unit
that the paper's Table 4 ablates; with ``heads`` = query heads and D = head width:

    weight      w_u = ‖W[:, cols(u)]‖_F                     (S2FT-W)
    activation  a_u = ‖A[:, cols(u)]‖_F over calibration tokens,
                A = the input of O (attention output) or of Down (silu(g) ⊙ u)   (S2FT-A)
    product     w_u · a_u                                    (S2FT-S, Wanda-like)
    gradient    ‖G[:, cols(u)]‖_F, G = ∂L/∂W of the mean loss over the calibration batches (S2FT-G)

with cols(head h) = [h·D, (h+1)·D) and cols(channel j) = {j}. The paper gives only "‖·‖₂"; minift reads it
as the Frobenius norm over the unit's columns, as written above. ``large`` takes the top-s scores per layer,
``small`` the bottom-s; ties go to the lower index (stable sort), and ``random`` draws from the given
Generator, so selection is deterministic under a seed. Activation and gradient scores come from the model's
own forward and backward, run on a shallow copy whose O and Down slots record or train; the model is not
changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from minift.backend import Array, get_xp, to_numpy
from minift.errors import ConfigError
from minift.methods.s2ft.config import S2FTConfig
from minift.model import Model, loss_and_grads, model_forward
from minift.slots import Dense

Selection = dict[int, tuple[tuple[int, ...], tuple[int, ...]]]  # layer -> (heads, channels)
CalibBatch = tuple[Array, Array]  # (tokens (B, T), shifted targets (B, T)); targets serve "gradient" only


@dataclasses.dataclass(eq=False)
class _ColumnEnergy:
    """Inference wrapper of a slot that accumulates Σ_n x[n, i]² of its inputs (activation scores)."""

    inner: Any
    energy: Array | None = None  # (I,)

    def forward(self, x: Array, *, keep: bool, rng: np.random.Generator | None = None) -> tuple[Array, Any]:
        e = (x * x).sum(axis=0)
        self.energy = e if self.energy is None else self.energy + e
        return self.inner.forward(x, keep=keep, rng=rng)


def _copy_with(model: Model, wrap: Callable[[Any], Any]) -> Model:
    """A shallow copy of the model whose O and Down slots are ``wrap(slot)``; arrays are shared."""
    blocks = [dataclasses.replace(b, o=wrap(b.o), down=wrap(b.down)) for b in model.blocks]
    return dataclasses.replace(model, blocks=blocks, meta={})


def _need_batches(batches: Sequence[CalibBatch] | None, strategy: str) -> Sequence[CalibBatch]:
    if not batches:
        raise ConfigError(f"S2FT strategy {strategy!r} needs calibration batches (calib_batches)")
    return batches


def _sq_col(w: Array) -> Array:
    return (w * w).sum(axis=0)


def _frozen(holder: Any) -> Any:
    return dataclasses.replace(holder, requires_grad=False)


def _gradient_probe(model: Model) -> Model:
    """A shallow copy in which only the O and Down weights are trainable (dense), everything else
    frozen, so the user's model and its trainable flags are untouched; arrays are shared."""
    blocks = [
        dataclasses.replace(
            b,
            **{name: _frozen(norm) for name, norm in b.norms()},
            **{
                n: Dense(s.dense_weight(), getattr(s, "bias", None), n in ("o", "down")) for n, s in b.slots()
            },
        )
        for b in model.blocks
    ]
    return dataclasses.replace(
        model,
        blocks=blocks,
        meta={},
        embed=_frozen(model.embed),
        final_norm=_frozen(model.final_norm),
        lm_head=None if model.lm_head is None else Dense(model.lm_head.dense_weight()),
        pos_embed=None if model.pos_embed is None else _frozen(model.pos_embed),
    )


def column_energies(
    model: Model, kind: str, batches: Sequence[CalibBatch] | None
) -> list[tuple[Array, Array]]:
    """Per layer, Σ over rows of the squares of the O columns (H·D,) and Down columns (F,) of the
    weight (``weight``), of the calibration activations (``activation``) or of the gradient of the
    mean calibration loss (``gradient``)."""
    if kind == "weight":
        return [(_sq_col(b.o.dense_weight()), _sq_col(b.down.dense_weight())) for b in model.blocks]
    batches = _need_batches(batches, kind)
    if kind == "activation":
        probe = _copy_with(model, _ColumnEnergy)
        for tokens, _ in batches:
            model_forward(probe, tokens, train=False)
        return [(b.o.energy, b.down.energy) for b in probe.blocks]
    if kind == "gradient":
        probe = _gradient_probe(model)
        total: dict[str, Array] = {}
        for tokens, targets in batches:
            _, grads = loss_and_grads(probe, tokens, targets, loss_scale=1.0 / len(batches))
            for k, g in grads.items():
                total[k] = total[k] + g if k in total else g
        return [
            (_sq_col(total[f"blocks.{i}.o.weight"]), _sq_col(total[f"blocks.{i}.down.weight"]))
            for i in range(len(model.blocks))
        ]
    raise ConfigError(f"unknown S2FT score {kind!r}")


def unit_scores(
    model: Model, strategy: str, batches: Sequence[CalibBatch] | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, host float64 scores of the query heads (H,) and FFN channels (F,)."""
    if strategy == "product":
        w, a = unit_scores(model, "weight", None), unit_scores(model, "activation", batches)
        return [(wh * ah, wc * ac) for (wh, wc), (ah, ac) in zip(w, a, strict=True)]
    c = model.config
    out = []
    for eo, ed in column_energies(model, strategy, batches):
        xp = get_xp(eo)
        heads = to_numpy(xp.sqrt(eo.reshape(c.n_heads, c.head_dim).sum(axis=1))).astype(np.float64)
        out.append((heads, to_numpy(xp.sqrt(ed)).astype(np.float64)))
    return out


def _top(scores: np.ndarray, n: int, variant: str) -> tuple[int, ...]:
    order = (-scores if variant == "large" else scores).argsort(kind="stable")
    return tuple(sorted(int(u) for u in order[:n]))


def select_units(
    model: Model,
    config: S2FTConfig,
    calib_batches: Sequence[CalibBatch] | None = None,
    *,
    rng: np.random.Generator | None = None,
) -> Selection:
    """Per selected layer, (query heads, FFN channels) in original coordinates, sorted."""
    c = model.config
    config.check(c)
    layers = config.layer_ids(c)
    if config.strategy == "random":
        if rng is None:
            raise ConfigError("S2FT random selection needs an explicit rng (numpy.random.Generator)")
        return {
            i: (
                tuple(sorted(int(h) for h in rng.choice(c.n_heads, config.heads, replace=False))),
                tuple(
                    sorted(int(j) for j in rng.choice(c.intermediate_size, config.channels, replace=False))
                ),
            )
            for i in layers
        }
    scores = unit_scores(model, config.strategy, calib_batches)
    return {
        i: (
            _top(scores[i][0], config.heads, config.variant),
            _top(scores[i][1], config.channels, config.variant),
        )
        for i in layers
    }
