"""The study's statistics: paired differences over seeds, Holm's correction, and the three verdicts.

Every comparison in the study is **paired by seed**: two arms trained with the same seed see the same
batch order (and, for S2FT's random selection, draw from the same stream), so the per-seed difference
dᵢ = aᵢ − bᵢ removes what the seeds share. Each claim is oriented so that the paper predicts d > 0.

For n paired differences with mean d̄ and sample standard deviation s, the 95% interval is
d̄ ± t₀.₉₇₅,ₙ₋₁ · s/√n (Student's t), and two p-values are computed:

- ``p`` (two-sided) for H₀: δ = 0, the test that the claimed effect exists at all;
- ``p_effect`` (one-sided) for H₀: δ ≥ e against δ < e, where e is the paper's effect in the study's
  units: the test that the effect is smaller than the paper's.

Both families are corrected across the claims by Holm's step-down method (Holm 1979): sort the m
p-values ascending, multiply the k-th smallest by (m − k + 1), take running maxima, cap at 1. Holm
controls the family-wise error rate at α without assuming independence between the claims.

Verdicts (α = 0.05 after correction):

- **reproduced**: the effect is significantly positive (the claimed direction);
- **contradicted**: the effect is significantly negative, or significantly smaller than the paper's
  (the data rule out an effect as large as claimed);
- **inconclusive**: neither, after the correction: the study has too little power to tell "no effect"
  from "the paper's effect". The reported interval is the claim's own (unadjusted) 95% interval, so
  one that excludes zero can still be inconclusive once Holm's correction across the claims applies.

Degenerate samples: with n = 1 nothing can be concluded (p = 1, interval unbounded). With s = 0 the
differences are exact: a nonzero one is decided by its sign (p = 0), while all-zero differences mean
the measure does not separate the arms on any seed (both at a floor or a ceiling), which supports
neither side (both p-values 1: inconclusive).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as sps

ALPHA = 0.05
VERDICTS = ("reproduced", "contradicted", "inconclusive")


@dataclass(frozen=True)
class Paired:
    """One paired comparison: n differences, their mean, the t-based 95% interval and both p-values."""

    n: int
    mean: float
    ci95: tuple[float, float]
    p: float  # two-sided, H₀: δ = 0
    p_effect: float  # one-sided, H₀: δ ≥ effect


def paired(a: Sequence[float], b: Sequence[float], effect: float) -> Paired:
    """Compare ``a`` with ``b`` paired by position (one entry per seed): d = a − b.

    ``effect`` is the paper's effect in the same units (> 0: the claimed direction)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, (-math.inf, math.inf), 1.0, 1.0)
    mean = math.fsum(d) / n
    if n == 1:
        return Paired(1, mean, (-math.inf, math.inf), 1.0, 1.0)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0.0:
        if mean == 0.0:  # the measure does not tell the arms apart on any seed (a floor or a ceiling)
            return Paired(n, 0.0, (0.0, 0.0), 1.0, 1.0)
        return Paired(n, mean, (mean, mean), 0.0, 0.0 if mean < effect else 1.0)  # exact: the sign decides
    se = sd / math.sqrt(n)
    half = float(sps.t.ppf(1 - ALPHA / 2, n - 1)) * se
    t0 = mean / se
    p = float(2 * sps.t.sf(abs(t0), n - 1))
    p_effect = float(sps.t.cdf((mean - effect) / se, n - 1))
    return Paired(n, mean, (mean - half, mean + half), p, p_effect)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(result: Paired, p_holm: float, p_effect_holm: float, alpha: float = ALPHA) -> str:
    """The verdict on one claim from its comparison and its Holm-adjusted p-values (see the module)."""
    if p_holm < alpha:
        return "reproduced" if result.mean > 0 else "contradicted"
    if p_effect_holm < alpha:
        return "contradicted"
    return "inconclusive"


def judge(results: Sequence[Paired], alpha: float = ALPHA) -> list[tuple[float, float, str]]:
    """(p_holm, p_effect_holm, verdict) for each claim, Holm-corrected across all of them."""
    ph = holm([r.p for r in results])
    pe = holm([r.p_effect for r in results])
    return [(a, b, verdict(r, a, b, alpha)) for r, a, b in zip(results, ph, pe, strict=True)]
