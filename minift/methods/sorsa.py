"""SORSA (Cao et al., arXiv 2409.00055): trainable singular values and vectors with an orthonormal
regularizer, as the official code ``Gunale0926/SORSA`` (``sorsalib/src/sorsa/{layer,trainer}.py``) does it.

Layout: the paper writes y = x W with W (in, out), the transpose of the stored weight. minift (like the
SORSA code, which takes the SVD of ``weight.T``) works on the stored W (O, I) = U diag(σ) Vᵀ:

    B = U_r (O, R),   S = σ_r (R,),   A = V_rᵀ (R, I)         all three trainable
    W_res = W − s · B diag(S) A                               frozen
    y = x W_resᵀ + s · ((x Aᵀ) ⊙ S) Bᵀ                        (``LowRankLinear`` with S)

with s = 1 (the paper; ``alpha=None``) or alpha / r. Unlike PiSSA, S is not folded into A and B, and
a scale ≠ 1 leaves (1 − s) W_p in the residual (``sorsa_init``), which still preserves the function.

The orthonormal regularizer (paper eq. for L_reg; code ``calc_ortho``), mean over the 2·(number of
adapted modules) factor matrices of the *non-squared* Frobenius norms:

    L_ortho = 1/N_mat · Σ_modules ( ‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F )
    ∇_A ‖M‖_F = 2 M A / ‖M‖_F,   ∇_B ‖N‖_F = 2 B N / ‖N‖_F   (zero where the norm is zero, as PyTorch)

It enters the update as in the official training loop (patched HF Trainer, ``trainer.py`` ≈ L2625–2665):
the task gradient is clipped first, then (γ / η_max) · ∇L_ortho is *added* to it unclipped, where η_max
is the peak learning rate, and the sum goes through AdamW. ``accelerate`` divides every backward by the
gradient-accumulation steps, so the code's run actually adds γ / (η_max · GA) · ∇L_ortho: that is
``mode="faithful"`` (default); ``mode="plain"`` omits the division (the paper's formula and the
repository's analysis script, where GA = 1). S is not regularized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from minift.backend import Array, get_xp
from minift.errors import ConfigError
from minift.methods import MethodRecord, record_method
from minift.methods.lowrank import (
    LowRankLinear,
    check_adapter_config,
    check_niter,
    low_rank_slots,
    merge,
    require_dense,
    top_svd,
    unmerge,
)
from minift.methods.targets import freeze, replace_slot, select_targets
from minift.model import SLOT_NAMES, Model
from minift.slots import Grads

__all__ = [
    "SORSAConfig",
    "SORSARegularizer",
    "apply_sorsa",
    "merge",
    "orthonormal_regularizer",
    "orthonormality_backward",
    "orthonormality_forward",
    "unmerge",
]

# ----------------------------------------------------------------------------------------------------
# the regularizer


class OrthoCache(NamedTuple):
    X: Array  # (R, n) the factor whose rows should be orthonormal
    M: Array  # (R, R) X Xᵀ − I, the gradient's direction
    norm: float  # ‖M‖_F


def orthonormality_forward(X: Array) -> tuple[float, OrthoCache]:
    """‖X Xᵀ − I‖_F (not squared): the deviation of X's rows from an orthonormal set.

    For SORSA's A (R, I) pass A; for B (O, R), whose *columns* should be orthonormal, pass Bᵀ.

    Shapes:
        X: (R, n)   returns a scalar
    """
    xp = get_xp(X)
    M = X @ X.T - xp.eye(X.shape[0], dtype=X.dtype)
    norm = float(xp.sqrt(xp.sum(M * M)))
    return norm, OrthoCache(X, M, norm)


def orthonormality_backward(dvalue: float, cache: OrthoCache) -> Array:
    """dX = dvalue · 2 M X / ‖M‖_F, and 0 where ‖M‖_F = 0 (the norm is not differentiable there;
    PyTorch's norm backward returns 0, and no ε is added, which would change the value).

    Shapes:
        returns dX: (R, n)
    """
    if cache.norm == 0.0:
        return get_xp(cache.X).zeros_like(cache.X)
    return (2.0 * dvalue / cache.norm) * (cache.M @ cache.X)


def factor_regularizer(factors: Sequence[tuple[Array, Array]]) -> tuple[float, list[tuple[Array, Array]]]:
    """L_ortho = mean over the 2·len(factors) matrices of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (SORSA §3,
    the official ``calc_ortho``), and its gradient (dA, dB) for every (A, B) pair.

    Shapes:
        factors: [(A (R, I), B (O, R)), ...]   returns the value and [(dA (R, I), dB (O, R)), ...]
    """
    weight = 1.0 / (2 * len(factors))  # the mean over N_mat = 2 · modules matrices
    total, grads = 0.0, []
    for A, B in factors:
        value_a, cache_a = orthonormality_forward(A)
        value_b, cache_b = orthonormality_forward(B.T)
        total += value_a + value_b
        grads.append((orthonormality_backward(weight, cache_a), orthonormality_backward(weight, cache_b).T))
    return weight * total, grads


def orthonormal_regularizer(model: Model) -> tuple[float, Grads]:
    """L_ortho over every SORSA slot and its gradient, keyed like the model's gradients
    (``blocks.{i}.{name}.A`` / ``.B``). Zero, with no gradients, when the model has no SORSA slot."""
    slots = [(path, slot) for path, slot in low_rank_slots(model) if slot.S is not None and not slot.merged]
    if not slots:
        return 0.0, {}
    value, pairs = factor_regularizer([(slot.A, slot.B) for _, slot in slots])
    grads: Grads = {}
    for (path, _), (dA, dB) in zip(slots, pairs, strict=True):
        grads[f"{path}.A"], grads[f"{path}.B"] = dA, dB
    return value, grads


# ----------------------------------------------------------------------------------------------------
# the method


RegMode = Literal["faithful", "plain"]


@dataclass(frozen=True)
class SORSAConfig:
    """SORSA hyperparameters (defaults from the official scripts, except the rank)."""

    r: int = 8  # R; the paper used 128 (Llama 2 7B) and 64 (Mistral, Gemma)
    alpha: float | None = None  # None: scale 1 (the paper); else scale alpha / r
    dropout: float = 0.0  # on the adapter input only
    targets: tuple[str, ...] = SLOT_NAMES  # all seven projections
    layers: tuple[int, ...] | None = None
    niter: int | None = None  # None: exact SVD (the official code); else randomized, as PiSSA's
    gamma: float = 4e-4  # regularizer strength γ
    mode: RegMode = "faithful"  # divide the regularizer by the accumulation steps (see module doc)

    def __post_init__(self) -> None:
        check_adapter_config(self)
        check_niter(self.niter)
        if self.mode not in ("faithful", "plain"):
            raise ConfigError(f"SORSA regularizer mode must be 'faithful' or 'plain', got {self.mode!r}")
        if self.gamma < 0:
            raise ConfigError(f"SORSA gamma must be ≥ 0, got {self.gamma!r}")

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


@dataclass(frozen=True)
class SORSARegularizer:
    """The training loop's gradient hook: after clipping and before AdamW, add c · ∇L_ortho to the
    gradients in place, with c = γ / η_max (÷ accumulation steps in ``"faithful"`` mode; see the module
    doc). γ and the mode are read from the method's ``SORSAConfig`` — their one place — so the hook
    and the adapted model cannot disagree. Returns L_ortho, the unscaled value the official code logs
    as "orthonormality"."""

    config: SORSAConfig

    def __post_init__(self) -> None:
        if not isinstance(self.config, SORSAConfig):
            raise ConfigError(f"SORSARegularizer takes the method's SORSAConfig, which holds γ and the mode; "
                              f"got {self.config!r}")

    def coefficient(self, lr_max: float, accum_steps: int = 1) -> float:
        """c, the factor on ∇L_ortho."""
        if lr_max <= 0:
            raise ConfigError(f"lr_max must be positive for the SORSA regularizer, got {lr_max!r}")
        return self.config.gamma / lr_max / (accum_steps if self.config.mode == "faithful" else 1)

    def __call__(self, model: Model, grads: Grads, *, lr_max: float, accum_steps: int = 1) -> float:
        value, reg = orthonormal_regularizer(model)
        c = self.coefficient(lr_max, accum_steps)
        for key, g in reg.items():
            grads[key] = grads[key] + c * g if key in grads else c * g
        return value


def sorsa_factors(
    w: Array, r: int, scaling: float, *, niter: int | None = None, rng: np.random.Generator | None = None
) -> tuple[Array, Array, Array, Array]:
    """SORSA's (A, S, B, W_res) for one weight, in the weight's dtype; W_res = W − s·B diag(S) A is
    computed from the factors as stored, so the function is preserved exactly.

    Shapes:
        w: (O, I)   returns A: (R, I)   S: (R,)   B: (O, R)   W_res: (O, I)
    """
    xp = get_xp(w)
    U, sigma, Vt = top_svd(w, r, niter=niter, rng=rng)
    A, S, B = Vt.astype(w.dtype), sigma.astype(w.dtype), U.astype(w.dtype)
    principal = (B.astype(xp.float64) * S.astype(xp.float64)) @ A.astype(xp.float64)
    return A, S, B, (w.astype(xp.float64) - scaling * principal).astype(w.dtype)


def apply_sorsa(
    model: Model, config: SORSAConfig | None = None, rng: np.random.Generator | None = None
) -> Model:
    """Freeze the model; split every target into a frozen residual and trainable A, S, B (in place)."""
    config = config or SORSAConfig()
    rng = rng if rng is not None else np.random.default_rng(0)
    freeze(model)
    for i, name, slot in select_targets(model, config.targets, config.layers):
        dense = require_dense(slot, i, name)
        A, S, B, residual = sorsa_factors(dense.weight, config.r, config.scaling, niter=config.niter, rng=rng)
        replace_slot(model, i, name, LowRankLinear(
            residual, A, B, config.scaling, S=S, bias=dense.bias, dropout=config.dropout,
            A0=A.copy(), B0=B.copy(), S0=S.copy(),
        ))
    record_method(model, MethodRecord("sorsa", config))
    return model


def gradient_hook(config: SORSAConfig) -> SORSARegularizer:
    """The regularizer hook the training loop calls after clipping, built from the config."""
    return SORSARegularizer(config)


Config = SORSAConfig
apply = apply_sorsa
