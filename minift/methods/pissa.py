"""PiSSA (Meng, Wang, Zhang 2024, arXiv 2404.02948, §3): LoRA initialised with the principal singular
triplets of W, the rest frozen as a residual; as Hugging Face PEFT implements it (``pissa_init``).

With W (O, I) = U diag(σ) Vᵀ and s the LoRA scaling (alpha/r or alpha/√r):

    σ_r ← σ_r / s,   A = diag(√σ_r) V_rᵀ  (R, I),   B = U_r diag(√σ_r)  (O, R)
    W_res = W − s · B A           (= W − U_r diag(σ_r) V_rᵀ, whatever alpha is)

so s·B A is the best rank-r part of W and the adapted model starts exactly as the base model. The
residual is computed from the factors as stored (after the cast to the weight's dtype), so the
function is preserved even by an approximate (randomized) SVD.

The SVD (exact, or PyTorch's randomized ``svd_lowrank`` with ``niter`` subspace iterations, as PEFT's
``init_lora_weights="pissa_niter_K"``) is ``minift.methods.lowrank.top_svd``. The training itself is
LoRA's: the slot is ``minift.methods.lowrank.LowRankLinear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minift.backend import Array, get_xp
from minift.methods import MethodRecord, record_method
from minift.methods.lora import LoRAConfig
from minift.methods.lowrank import (
    LowRankLinear,
    check_niter,
    merge,
    require_dense,
    svd_lowrank,
    top_svd,
    unmerge,
)
from minift.methods.targets import freeze, replace_slot, select_targets
from minift.model import Model

__all__ = ["PiSSAConfig", "apply_pissa", "merge", "pissa_factors", "svd_lowrank", "top_svd", "unmerge"]


def pissa_factors(
    w: Array, r: int, scaling: float, *, niter: int | None = None, rng: np.random.Generator | None = None
) -> tuple[Array, Array, Array]:
    """PiSSA's (A, B, W_res) for one weight, in the weight's dtype (see the module doc).

    Shapes:
        w: (O, I)   returns A: (R, I)   B: (O, R)   W_res: (O, I)
    """
    xp = get_xp(w)
    U, sigma, Vt = top_svd(w, r, niter=niter, rng=rng)
    root = xp.sqrt(sigma / scaling)
    A = (root[:, None] * Vt).astype(w.dtype)
    B = (U * root).astype(w.dtype)
    residual = w.astype(xp.float64) - scaling * (B.astype(xp.float64) @ A.astype(xp.float64))
    return A, B, residual.astype(w.dtype)


@dataclass(frozen=True)
class PiSSAConfig(LoRAConfig):
    """LoRA's hyperparameters plus the SVD: exact (``niter=None``) or randomized with ``niter`` steps."""

    niter: int | None = None  # PEFT: "pissa" (None) or "pissa_niter_<niter>"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_niter(self.niter)


def apply_pissa(
    model: Model, config: PiSSAConfig | None = None, rng: np.random.Generator | None = None
) -> Model:
    """Freeze the model; replace every target W by its residual plus a PiSSA adapter (in place).

    ``rng`` draws the randomized SVD's test matrices (unused by the exact SVD).
    """
    config = config or PiSSAConfig()
    rng = rng if rng is not None else np.random.default_rng(0)
    freeze(model)
    for i, name, slot in select_targets(model, config.targets, config.layers):
        dense = require_dense(slot, i, name)
        A, B, residual = pissa_factors(dense.weight, config.r, config.scaling, niter=config.niter, rng=rng)
        replace_slot(model, i, name, LowRankLinear(
            residual, A, B, config.scaling, bias=dense.bias, dropout=config.dropout,
            A0=A.copy(), B0=B.copy(),
        ))
    record_method(model, MethodRecord("pissa", config))
    return model


Config = PiSSAConfig
apply = apply_pissa
