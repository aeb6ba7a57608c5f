"""How far fine-tuning moves a weight's singular values and singular vectors (SORSA paper, the ΔΣ/ΔD
analysis; code ``analysis/data.ipynb``, ``calc_x_y``).

For W_old = U diag(σ) Vᵀ and W_new = U' diag(σ') V'ᵀ, each with its k = min(O, I) (or the top r)
triplets sorted by singular value:

    ΔΣ = 1/k Σ_i |σ'_i − σ_i|
    ΔD = 1 − 1/(2k) Σ_i ( |⟨u'_i, u_i⟩| + |⟨v'_i, v_i⟩| )

The absolute values remove the sign ambiguity of singular vectors, which have unit norm, so each dot
product is a cosine: ΔD = 0 when every singular direction is kept, and ΔD is near 1 when all are
rotated away. ``SVDTrajectory`` records both for every trained projection of a model during training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from minift.backend import Array, get_xp
from minift.errors import ShapeError
from minift.methods.targets import slot_paths
from minift.model import Model


class SVDDeviation(NamedTuple):
    delta_sigma: float  # ΔΣ, mean |Δσ_i|
    delta_d: float  # ΔD, 1 − mean |cos| of the left and right singular vectors


def _svd(w: Array, r: int | None) -> tuple[Array, Array, Array]:
    xp = get_xp(w)
    U, sigma, Vt = xp.linalg.svd(w.astype(xp.float64), full_matrices=False)
    k = sigma.shape[0] if r is None else r
    return U[:, :k], sigma[:k], Vt[:k]


def _deviation(old: tuple[Array, Array, Array], new: tuple[Array, Array, Array]) -> SVDDeviation:
    xp = get_xp(old[0])
    (U0, s0, Vt0), (U1, s1, Vt1) = old, new
    d_sigma = xp.mean(xp.abs(s1 - s0))
    cos_u = xp.abs(xp.sum(U0 * U1, axis=0))  # (k,) column-wise dot products
    cos_v = xp.abs(xp.sum(Vt0 * Vt1, axis=1))  # (k,) row-wise
    return SVDDeviation(float(d_sigma), float(1.0 - (xp.mean(cos_u) + xp.mean(cos_v)) / 2))


def svd_deviation(w_old: Array, w_new: Array, r: int | None = None) -> SVDDeviation:
    """ΔΣ and ΔD between two weights of the same shape (see the module doc), in float64.

    ``r`` restricts both to the top r singular triplets (default: all min(O, I)).

    Shapes:
        w_old, w_new: (O, I)
    """
    if w_old.shape != w_new.shape:
        raise ShapeError(f"svd_deviation needs two weights of one shape, got {w_old.shape} and {w_new.shape}")
    if r is not None and not 0 < r <= min(w_old.shape):
        raise ShapeError(f"r={r} must be between 1 and min(O, I) = {min(w_old.shape)}")
    return _deviation(_svd(w_old, r), _svd(w_new, r))


@dataclass
class SVDTrajectory:
    """ΔΣ and ΔD of every trained projection against its effective weight when recording started.

    Build it with ``SVDTrajectory.start(model, every=100)`` before training and call it with
    ``(model, step)`` after each optimizer step: it records every ``every`` steps (the SORSA analysis
    merges and records every 100 steps). The reference SVDs are computed once, at the start.
    """

    every: int = 100
    r: int | None = None  # top-r triplets only (default: all)
    reference: dict[str, tuple[Array, Array, Array]] = field(default_factory=dict)  # path → SVD of W₀
    steps: list[int] = field(default_factory=list)
    values: dict[str, list[SVDDeviation]] = field(default_factory=dict)  # path → one per recorded step

    @classmethod
    def start(cls, model: Model, *, every: int = 100, r: int | None = None) -> SVDTrajectory:
        """Take the reference of every projection with trainable arrays (an adapter, S2FT, full FT)."""
        trained = [(path, slot) for path, slot in slot_paths(model) if slot.parameters()]
        reference = {path: _svd(slot.dense_weight(), r) for path, slot in trained}
        return cls(every, r, reference, [], {path: [] for path in reference})

    def record(self, model: Model, step: int) -> None:
        """Record ΔΣ, ΔD of every reference projection now."""
        slots = dict(slot_paths(model))
        self.steps.append(step)
        for path, ref in self.reference.items():
            self.values[path].append(_deviation(ref, _svd(slots[path].dense_weight(), self.r)))

    def __call__(self, model: Model, step: int) -> None:
        if step % self.every == 0:
            self.record(model, step)

    def mean(self) -> Iterator[tuple[int, float, float]]:
        """(step, mean ΔΣ, mean ΔD) over the projections, per recorded step: the paper's thick line."""
        for j, step in enumerate(self.steps):
            points = np.array([v[j] for v in self.values.values()]).reshape(-1, 2)  # (paths, 2)
            yield step, float(points[:, 0].mean()), float(points[:, 1].mean())
