"""The study's statistics (``minift.tools.study.stats``): paired t-intervals against SciPy, Holm's
correction on known p-values, and every verdict reachable."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from minift.tools.study.stats import VERDICTS, Paired, holm, judge, paired, verdict


def test_the_paired_interval_and_p_value_are_scipys_paired_t_test():
    a = [0.91, 0.85, 0.88, 0.95, 0.80]
    b = [0.82, 0.84, 0.80, 0.90, 0.79]
    r = paired(a, b, effect=0.1)
    ref = sps.ttest_rel(a, b)
    assert r.n == 5
    assert r.mean == pytest.approx(0.048)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-12)
    lo, hi = ref.confidence_interval(0.95)
    assert r.ci95 == pytest.approx((lo, hi), rel=1e-12)
    # one-sided against the paper's effect: H0 δ ≥ 0.1, as SciPy's one-sample test of d − 0.1 < 0
    d = [x - y - 0.1 for x, y in zip(a, b, strict=True)]
    assert r.p_effect == pytest.approx(sps.ttest_1samp(d, 0.0, alternative="less").pvalue, rel=1e-12)


def test_holm_adjusts_known_p_values_in_the_input_order():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == pytest.approx([0.02])
    assert holm([]) == []


def test_holm_never_lowers_a_p_value_and_keeps_the_order():
    ps = [0.001, 0.2, 0.013, 0.04, 0.5, 0.009]
    adj = holm(ps)
    assert all(q >= p for p, q in zip(ps, adj, strict=True))
    by_p = sorted(range(len(ps)), key=ps.__getitem__)
    assert [adj[i] for i in by_p] == sorted(adj)


@pytest.mark.parametrize(
    ("a", "b", "effect", "expected"),
    [
        ([0.9, 0.92, 0.91, 0.93], [0.5, 0.51, 0.49, 0.5], 0.3, "reproduced"),  # clearly positive
        ([0.5, 0.51, 0.49, 0.5], [0.9, 0.92, 0.91, 0.93], 0.3, "contradicted"),  # clearly negative
        ([0.50, 0.52, 0.49, 0.51], [0.50, 0.51, 0.50, 0.50], 0.3, "contradicted"),  # ≈ 0, far below 0.3
        ([0.7, 0.4, 0.9, 0.3], [0.5, 0.6, 0.4, 0.6], 0.1, "inconclusive"),  # noisy: covers 0 and 0.1
    ],
)
def test_each_verdict_is_reachable(a, b, effect, expected):
    r = paired(a, b, effect)
    ((_, _, v),) = judge([r])
    assert v == expected
    if expected == "inconclusive":
        assert r.ci95[0] < 0 < effect < r.ci95[1]


def test_the_verdict_uses_the_corrected_p_values():
    r = Paired(5, 0.1, (0.01, 0.19), p=0.03, p_effect=0.9)
    assert verdict(r, 0.03, 0.9) == "reproduced"
    # the same comparison among three claims whose other p-values are large: 3 · 0.03 > 0.05
    assert (
        judge([r, Paired(5, 0, (-1, 1), 0.8, 0.8), Paired(5, 0, (-1, 1), 0.9, 0.9)])[0][2] == "inconclusive"
    )
    assert set(VERDICTS) == {"reproduced", "contradicted", "inconclusive"}


def test_degenerate_samples_conclude_nothing_unless_the_differences_are_exact():
    one = paired([1.0], [0.0], 0.1)
    assert (one.p, one.ci95) == (1.0, (-math.inf, math.inf))
    assert judge([one])[0][2] == "inconclusive"
    ceiling = paired([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 0.1)  # both arms perfect on every seed
    assert judge([ceiling])[0][2] == "inconclusive"
    exact = paired([0.5, 0.75], [0.25, 0.5], 0.1)  # d = 0.25 on both seeds, exactly
    assert exact.ci95 == (0.25, 0.25)
    assert judge([exact])[0][2] == "reproduced"
    with pytest.raises(ValueError, match="length"):
        paired([1.0], [1.0, 2.0], 0.0)
