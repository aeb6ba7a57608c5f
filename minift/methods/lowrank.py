"""The low-rank adapter slot that LoRA, PiSSA and SORSA share, and the SVD helpers PiSSA and SORSA
initialise it with.

    y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ S) Bᵀ

with W and b frozen, A (R, I) and B (O, R) trainable, S (R,) SORSA's trainable singular values
(S ≡ 1 for LoRA and PiSSA) and the scaling s. The factored form never builds the (O, I) matrix
B diag(S) A; the backward is the forward reversed:

    h = x_d Aᵀ,  g = h ⊙ S,  y = x Wᵀ + s g Bᵀ                      (x_d = drop(x))
    dB = s dyᵀ g,  dg = s dy B,  dS = Σ_n dg ⊙ h,  dh = dg ⊙ S,  dA = dhᵀ x_d
    dx = dy W + (dh A) ⊙ mask / (1 − p)

Merging folds the delta into the frozen weight, W ← W + s B diag(S) A, after which the slot is a plain
linear layer; unmerging subtracts it again (PEFT ``merge``/``unmerge``).

The SVD is exact (``numpy.linalg.svd``), or the randomized ``svd_lowrank`` of PyTorch (Halko, Martinsson,
Tropp 2011, Alg. 4.4 + 5.1) with ``niter`` subspace iterations and no oversampling, as PEFT's
``init_lora_weights="pissa_niter_K"``; its Gaussian test matrix comes from an explicit Generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from minift.backend import Array, get_xp
from minift.errors import ConfigError
from minift.layers.linear import linear_backward_input, linear_backward_weight, linear_forward
from minift.methods.targets import slot_names, slot_paths
from minift.model import Model
from minift.slots import Dense, Grads, WeightShape

# ----------------------------------------------------------------------------------------------------
# the pure forward/backward pair


class LowRankCache(NamedTuple):
    x: Array  # (N, I) the adapter's input after dropout: dA = dhᵀ x_d
    h: Array  # (N, R) x_d Aᵀ, for dB and dS; keeping it saves recomputing an (N, I)·(I, R) product
    mask: Array | None  # (N, I) bool, kept entries of the dropout mask; None without dropout


def lowrank_forward(
    x: Array,
    w: Array,
    A: Array,
    B: Array,
    *,
    scaling: float,
    S: Array | None = None,
    b: Array | None = None,
    mask: Array | None = None,
    p: float = 0.0,
) -> tuple[Array, LowRankCache]:
    """y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ S) Bᵀ, drop(x) = x ⊙ mask / (1 − p) (identity if no mask).

    The frozen base path keeps nothing: its backward dx = dy W needs only W.

    Shapes:
        x: (N, I)   w: (O, I)   A: (R, I)   B: (O, R)   S: (R,)   b: (O,)   mask: (N, I)
        returns y: (N, O)
    """
    x_d = x if mask is None else x * mask / (1.0 - p)
    h = linear_forward(x_d, A)  # (N, R)
    g = h if S is None else h * S
    y = linear_forward(x, w, b) + scaling * linear_forward(g, B)
    return y, LowRankCache(x_d, h, mask)


def lowrank_backward(
    dy: Array,
    cache: LowRankCache,
    w: Array,
    A: Array,
    B: Array,
    *,
    scaling: float,
    S: Array | None = None,
    p: float = 0.0,
    need_dx: bool = True,
) -> tuple[Array | None, Array, Array, Array | None]:
    """Gradients (dx, dA, dB, dS) of ``lowrank_forward``; dS is None when S is, dx when not needed.

    Shapes:
        dy: (N, O)   returns dx: (N, I)   dA: (R, I)   dB: (O, R)   dS: (R,)
    """
    xp = get_xp(dy)
    h = cache.h
    g = h if S is None else h * S  # (N, R), cheaper to recompute than to keep
    dB = scaling * linear_backward_weight(dy, g)  # (O, R)
    dg = scaling * linear_backward_input(dy, B)  # (N, R)
    dS = None if S is None else xp.sum(dg * h, axis=0)
    dh = dg if S is None else dg * S
    dA = linear_backward_weight(dh, cache.x)  # (R, I)
    if not need_dx:
        return None, dA, dB, dS
    dx_adapter = linear_backward_input(dh, A)  # (N, I)
    if cache.mask is not None:
        dx_adapter = dx_adapter * cache.mask / (1.0 - p)
    return linear_backward_input(dy, w) + dx_adapter, dA, dB, dS


# ----------------------------------------------------------------------------------------------------
# the slot


@dataclass(eq=False)
class LowRankLinear(WeightShape):
    """A frozen linear layer plus a trainable low-rank adapter s · B diag(S) A (see the module doc).

    LoRA: ``weight`` is the pretrained W, S is None. PiSSA: ``weight`` is the residual W − s B₀A₀,
    S is None. SORSA: ``weight`` is the residual, S holds the singular values. When the weight is a
    residual, A₀, B₀ (and S₀) keep the factors at initialisation, so that the change relative to the
    original W, s(B diag(S) A − B₀ diag(S₀) A₀), can be exported as a LoRA on the original base.
    """

    weight: Array  # (O, I) frozen: W, or the residual W_res
    A: Array  # (R, I) trainable
    B: Array  # (O, R) trainable
    scaling: float  # s
    S: Array | None = None  # (R,) trainable (SORSA only)
    bias: Array | None = None  # (O,) frozen
    dropout: float = 0.0  # p, on the adapter input only
    A0: Array | None = None  # (R, I) frozen copy of A at init (PiSSA, SORSA)
    B0: Array | None = None  # (O, R)
    S0: Array | None = None  # (R,) (SORSA)
    merged: bool = False  # the delta is folded into ``weight``; the slot is then a plain linear layer

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def forward(
        self, x: Array, *, keep: bool, rng: np.random.Generator | None = None
    ) -> tuple[Array, LowRankCache | None]:
        if self.merged:
            return linear_forward(x, self.weight, self.bias), None
        mask = None
        if keep and rng is not None and self.dropout > 0:  # only while training, from the caller's rng
            mask = get_xp(x).asarray(rng.random(x.shape) >= self.dropout)
        y, cache = lowrank_forward(
            x, self.weight, self.A, self.B, scaling=self.scaling, S=self.S, b=self.bias,
            mask=mask, p=self.dropout,
        )
        return y, (cache if keep else None)

    def backward(
        self, dy: Array, cache: LowRankCache | None, *, need_dx: bool = True
    ) -> tuple[Array | None, Grads]:
        if self.merged or cache is None:
            return (linear_backward_input(dy, self.weight) if need_dx else None), {}
        dx, dA, dB, dS = lowrank_backward(
            dy, cache, self.weight, self.A, self.B, scaling=self.scaling, S=self.S, p=self.dropout,
            need_dx=need_dx,
        )
        return dx, {"A": dA, "B": dB} | ({"S": dS} if dS is not None else {})

    def parameters(self) -> dict[str, Array]:
        """A, B (and S); nothing once merged, when the adapter lives inside the frozen weight."""
        if self.merged:
            return {}
        return {"A": self.A, "B": self.B} | ({"S": self.S} if self.S is not None else {})

    def delta(self) -> Array:
        """ΔW = s · B diag(S) A (O, I), what the adapter adds to the frozen weight."""
        B = self.B if self.S is None else self.B * self.S
        return self.scaling * (B @ self.A)

    def dense_weight(self) -> Array:
        return self.weight if self.merged else self.weight + self.delta()

    def merge(self) -> None:
        """W ← W + ΔW, then run as a plain linear layer. A new array: the old W is not mutated."""
        if not self.merged:
            self.weight, self.merged = self.weight + self.delta(), True

    def unmerge(self) -> None:
        """W ← W − ΔW, undoing ``merge`` (to rounding)."""
        if self.merged:
            self.weight, self.merged = self.weight - self.delta(), False

    def flops(self, n_tokens: int, *, need_dx: bool = True) -> tuple[int, int]:
        n, n_in, n_out = n_tokens, self.in_features, self.out_features
        base = 2 * n * n_in * n_out
        if self.merged:
            return base, base * int(need_dx)
        low = 2 * n * self.rank  # one (N, R)-sized product per unit of the other dimension
        forward = base + low * (n_in + n_out)
        backward = low * (2 * n_out + n_in) + int(need_dx) * (base + low * n_in)  # dB, dg, dA; dx
        return forward, backward


def low_rank_slots(model: Model) -> list[tuple[str, LowRankLinear]]:
    """(path, slot) of every low-rank adapter slot, e.g. ("blocks.0.q", slot)."""
    return [(path, slot) for path, slot in slot_paths(model) if isinstance(slot, LowRankLinear)]


def merge(model: Model) -> Model:
    """Fold every low-rank adapter into its frozen weight (in place; returns the model)."""
    for _, slot in low_rank_slots(model):
        slot.merge()
    return model


def unmerge(model: Model) -> Model:
    """Take every merged adapter out of its weight again (in place; returns the model)."""
    for _, slot in low_rank_slots(model):
        slot.unmerge()
    return model


# ----------------------------------------------------------------------------------------------------
# what every low-rank method shares


def check_adapter_config(config: Any) -> None:
    """Validate and normalise the fields every low-rank config has (r, dropout, targets, layers), in
    place on a frozen dataclass; raises ConfigError saying what is wrong."""
    if not (isinstance(config.r, int) and config.r > 0):
        raise ConfigError(f"adapter rank r must be a positive integer, got {config.r!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {config.dropout!r}")
    object.__setattr__(config, "targets", slot_names(config.targets))
    if config.layers is not None:
        object.__setattr__(config, "layers", tuple(int(i) for i in config.layers))


def require_dense(slot: object, layer: int, name: str) -> Dense:
    """Check that a target is a plain dense slot (not already adapted) and return it."""
    if not isinstance(slot, Dense):
        raise ConfigError(
            f"blocks.{layer}.{name} is a {type(slot).__name__}, not a plain dense projection: "
            "apply one adapter method to a base model"
        )
    return slot


# ----------------------------------------------------------------------------------------------------
# the SVD that PiSSA and SORSA initialise from


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


def check_niter(niter: int | None) -> None:
    """None (exact SVD) or a number of randomized subspace iterations ≥ 0."""
    if niter is not None and not (isinstance(niter, int) and niter >= 0):
        raise ConfigError(f"niter must be None (exact SVD) or an integer ≥ 0, got {niter!r}")
