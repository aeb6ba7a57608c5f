"""Gradient checking and readable comparisons, shipped in the package so tutorials can use them.

``check_grad`` compares an analytic backward with float64 central differences of
L(args) = Σ f(args) ⊙ G for a *random* upstream gradient G (with G = 1 only the gradient of Σ y is
tested, which misses whole classes of bugs). Every named input is checked, inputs and parameters alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from minift.backend import Array, to_numpy


@dataclass(frozen=True)
class GradCheck:
    """The result of one argument's check."""

    name: str
    rel_error: float  # ‖analytic − numeric‖ / max(‖analytic‖, ‖numeric‖, zero_floor)
    max_abs_error: float
    norm: float  # ‖numeric‖, to tell a vanishing gradient from a matching one


@dataclass(frozen=True)
class GradReport:
    """All arguments' checks; ``ok`` when every relative error is within the tolerance."""

    checks: tuple[GradCheck, ...]
    tol: float

    @property
    def ok(self) -> bool:
        return all(c.rel_error <= self.tol for c in self.checks)

    def __str__(self) -> str:
        lines = [f"{'arg':<24}{'rel error':>12}{'max |Δ|':>12}{'‖grad‖':>12}"]
        for c in self.checks:
            flag = "" if c.rel_error <= self.tol else "   <-- FAIL"
            lines.append(f"{c.name:<24}{c.rel_error:>12.2e}{c.max_abs_error:>12.2e}{c.norm:>12.2e}{flag}")
        return "\n".join(lines)


def numerical_grad(loss: Callable[[], float], x: Array, eps: float = 1e-6) -> np.ndarray:
    """Central differences (L(x + εe_i) − L(x − εe_i)) / 2ε for every entry of x, perturbed in place."""
    grad = np.zeros(x.shape, dtype=np.float64)
    # Index x itself, not x.reshape(-1): for a non-contiguous view (an S2FT block W[:, :s]) reshape
    # makes a copy, and perturbing the copy would leave the forward unchanged (a zero gradient).
    for idx in np.ndindex(*x.shape):
        old = x[idx].item()
        x[idx] = old + eps
        plus = loss()
        x[idx] = old - eps
        minus = loss()
        x[idx] = old
        grad[idx] = (plus - minus) / (2 * eps)
    return grad


def check_grad(
    forward: Callable[..., Array],
    backward: Callable[..., Mapping[str, Array]],
    args: Mapping[str, Array],
    *,
    rng: np.random.Generator | None = None,
    eps: float = 1e-6,
    tol: float = 1e-6,
    zero_floor: float = 1e-8,
    raise_on_failure: bool = True,
) -> GradReport:
    """Check ``backward`` against finite differences of ``forward`` for every array in ``args``.

    ``forward(**args)`` returns y (any shape, a scalar too); ``backward(G, **args)`` returns the
    gradients of Σ y ⊙ G as a dict with the same keys as ``args`` (keys it omits are checked as zero).
    All arrays must be float64: float32 differences are too coarse to mean anything.
    """
    rng = rng or np.random.default_rng(0)
    for name, a in args.items():
        if a.dtype != np.float64:
            raise TypeError(f"check_grad needs float64 arrays; {name!r} is {a.dtype}")
    y = forward(**args)
    G = rng.standard_normal(np.shape(y))
    if not np.ndim(y):
        G = float(G)
    analytic = backward(G, **args)

    def loss() -> float:
        return float((to_numpy(forward(**args)) * G).sum())

    checks = []
    for name, a in args.items():
        num = numerical_grad(loss, a, eps)
        ana = to_numpy(analytic[name]) if name in analytic else np.zeros_like(num)
        if ana.shape != num.shape:
            raise AssertionError(f"gradient of {name!r} has shape {ana.shape}, expected {num.shape}")
        diff = np.linalg.norm(ana - num)
        # The floor keeps a gradient that is exactly zero (e.g. a key bias without RoPE, which shifts
        # every score of a row equally) from reading as a 100% error against rounding noise.
        scale = max(np.linalg.norm(ana), np.linalg.norm(num), zero_floor)
        checks.append(GradCheck(name, float(diff / scale), float(np.abs(ana - num).max(initial=0.0)),
                                float(np.linalg.norm(num))))
    report = GradReport(tuple(checks), tol)
    if raise_on_failure and not report.ok:
        raise AssertionError(f"gradient check failed:\n{report}")
    return report


def assert_close(
    actual: Array,
    expected: Array,
    *,
    rtol: float = 1e-7,
    atol: float = 0.0,
    what: str = "array",
    show: int = 5,
) -> None:
    """Assert |actual − expected| ≤ atol + rtol·|expected| everywhere, else print the worst entries."""
    a, e = to_numpy(actual), to_numpy(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    err = np.abs(a64 - e64)
    bad = ~(err <= atol + rtol * np.abs(e64))  # NaN counts as bad
    if not bad.any():
        return
    excess = np.where(bad, np.nan_to_num(err, nan=np.inf) - rtol * np.abs(e64), -np.inf).reshape(-1)
    worst = np.argsort(excess)[::-1][: min(show, int(bad.sum()))]
    lines = [f"{what}: {int(bad.sum())} of {a.size} entries differ (rtol={rtol:g}, atol={atol:g})",
             f"{'index':<20}{'actual':>16}{'expected':>16}{'|Δ|':>12}"]
    for flat in worst:
        idx = tuple(int(i) for i in np.unravel_index(flat, a.shape))  # (0, 2), not (np.int64(0), …)
        lines.append(f"{idx!s:<20}{a64[idx]:>16.8g}{e64[idx]:>16.8g}{err[idx]:>12.3e}")
    raise AssertionError("\n".join(lines))
