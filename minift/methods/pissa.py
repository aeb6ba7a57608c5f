"""PiSSA (Meng, Wang, Zhang 2024, arXiv 2404.02948, §3): LoRA initialised with the principal singular
triplets of W, the rest frozen as a residual; as Hugging Face PEFT implements it (``pissa_init``).

With W (O, I) = U diag(σ) Vᵀ and s the LoRA scaling (alpha/r or alpha/√r):

    σ_r ← σ_r / s,   A = diag(√σ_r) V_rᵀ  (R, I),   B = U_r diag(√σ_r)  (O, R)
    W_res = W − s · B A           (= W − U_r diag(σ_r) V_rᵀ, whatever alpha is)

so s·B A is the best rank-r part of W and the adapted model starts exactly as the base model. The
residual is computed from the factors as stored (after the cast to the weight's dtype), so the
function is preserved even by an approximate (randomized) SVD.

The SVD is exact (``numpy.linalg.svd``), or the randomized ``svd_lowrank`` of PyTorch (Halko, Martinsson,
Tropp 2011, Alg. 4.4 + 5.1) with ``niter`` subspace iterations and no oversampling, as PEFT's
``init_lora_weights="pissa_niter_K"``; its Gaussian test matrix comes from an explicit Generator.
The training itself is LoRA's: the slot is ``minift.methods.lora.LowRankLinear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from minift.backend import Array, get_xp
from minift.errors import ConfigError
from minift.methods import MethodRecord, record_method
from minift.methods.lora import LoRAConfig, LowRankLinear, merge, require_dense, unmerge
from minift.methods.targets import freeze, replace_slot, select_targets
from minift.model import Model

__all__ = ["PiSSAConfig", "apply_pissa", "merge", "pissa_factors", "svd_lowrank", "top_svd", "unmerge"]


def _orth(xp: ModuleType, X: Array) -> Array:
    """An orthonormal basis of X's columns: the Q factor of a thin QR."""
    return xp.linalg.qr(X)[0]


def svd_lowrank(
    M: Array, q: int, *, niter: int = 2, rng: np.random.Generator
) -> tuple[Array, Array, Array]:
    """Randomized rank-q SVD, M ≈ U diag(σ) Vᵀ, as ``torch.svd_lowrank(M, q, niter)`` computes it.

    A wide M is handled through Mᵀ (tall), then U and V are swapped back:

        Q = orth(M Ω),  Ω ~ N(0, 1) (n, q);  niter × { Q = orth(Mᵀ Q); Q = orth(M Q) }
        U_B, σ, Vᵀ = svd(Qᵀ M);  U = Q U_B

    Shapes:
        M: (m, n)   returns U: (m, q)   σ: (q,)   V: (n, q)
    """
    xp = get_xp(M)
    wide = M.shape[0] < M.shape[1]
    X = M.T if wide else M  # (m', n'), m' ≥ n'
    omega = xp.asarray(rng.standard_normal((X.shape[1], q)), dtype=X.dtype)
    Q = _orth(xp, X @ omega)
    for _ in range(niter):
        Q = _orth(xp, X.T @ Q)
        Q = _orth(xp, X @ Q)
    U_b, sigma, Vt = xp.linalg.svd(Q.T @ X, full_matrices=False)
    U, V = Q @ U_b, Vt.T
    return (V, sigma, U) if wide else (U, sigma, V)


def top_svd(
    w: Array, r: int, *, niter: int | None = None, rng: np.random.Generator | None = None
) -> tuple[Array, Array, Array]:
    """The top-r singular triplets of w in float64: exact when ``niter`` is None, else randomized.

    Shapes:
        w: (O, I)   returns U_r: (O, R)   σ_r: (R,)   V_rᵀ: (R, I)
    """
    xp = get_xp(w)
    if not 0 < r <= min(w.shape):
        raise ConfigError(
            f"rank r={r} must be between 1 and min(out, in) = {min(w.shape)} for a {w.shape} weight"
        )
    w64 = w.astype(xp.float64)
    if niter is None:
        U, sigma, Vt = xp.linalg.svd(w64, full_matrices=False)
        return U[:, :r], sigma[:r], Vt[:r]
    U, sigma, V = svd_lowrank(w64, r, niter=niter, rng=rng if rng is not None else np.random.default_rng(0))
    return U, sigma, V.T


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


def check_niter(niter: int | None) -> None:
    """None (exact SVD) or a number of randomized subspace iterations ≥ 0."""
    if niter is not None and not (isinstance(niter, int) and niter >= 0):
        raise ConfigError(f"niter must be None (exact SVD) or an integer ≥ 0, got {niter!r}")


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
