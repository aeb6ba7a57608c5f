"""minift.testing is the checker every gradient spec relies on, so it is specified too: check_grad
passes a right backward and catches a wrong one (even a wrong input gradient alone, and a missing
gradient), perturbs non-contiguous views in place, refuses float32, and assert_close reports a table
of the worst entries.
"""

from __future__ import annotations

import numpy as np
import pytest

from minift.testing import assert_close, check_grad


def _forward(x, w):
    return np.sin(x) * w  # y = sin(x) ⊙ w


def _right(G, x, w):
    return {"x": G * np.cos(x) * w, "w": G * np.sin(x)}


def test_check_grad_passes_a_right_backward(rng):
    args = {"x": rng.standard_normal((3, 2)), "w": rng.standard_normal((3, 2))}
    report = check_grad(_forward, _right, args)
    assert report.ok
    assert [c.name for c in report.checks] == ["x", "w"]


@pytest.mark.parametrize("wrong", [
    lambda G, x, w: {"x": -G * np.cos(x) * w, "w": G * np.sin(x)},  # sign of dx
    lambda G, x, w: {"x": np.cos(x) * w, "w": G * np.sin(x)},  # G ignored: right only for G = 1
    lambda G, x, w: {"w": G * np.sin(x)},  # dx missing: read as zero
], ids=["sign", "ignores-upstream", "missing"])
def test_check_grad_catches_a_wrong_input_gradient(rng, wrong):
    args = {"x": rng.standard_normal((3, 2)), "w": rng.standard_normal((3, 2))}
    report = check_grad(_forward, wrong, args, raise_on_failure=False)
    assert not report.ok
    assert [c.rel_error > report.tol for c in report.checks] == [True, False]
    with pytest.raises(AssertionError, match="<-- FAIL"):
        check_grad(_forward, wrong, args)


def test_check_grad_perturbs_a_non_contiguous_view_in_place(rng):
    w, x = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    block = w[:, :2]  # a column block: a view, not contiguous (S2FT's trainable arrays look like this)
    report = check_grad(lambda block: x @ w.T, lambda G, block: {"block": (G.T @ x)[:, :2]}, {"block": block},
                        raise_on_failure=False)
    assert report.checks[0].norm > 0  # the forward saw the perturbation
    assert report.ok


def test_check_grad_refuses_float32_arrays():
    with pytest.raises(TypeError, match="'x' is float32"):
        check_grad(_forward, _right, {"x": np.ones(2, dtype=np.float32), "w": np.ones(2)})


def test_assert_close_passes_within_tolerance_and_treats_nan_as_different():
    assert_close(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]), rtol=1e-8)
    with pytest.raises(AssertionError, match="1 of 2 entries differ"):
        assert_close(np.array([1.0, np.nan]), np.array([1.0, 2.0]), rtol=1e-3)


def test_assert_close_prints_a_table_of_the_worst_entries_first():
    actual = np.zeros((2, 3))
    actual[1, 2], actual[0, 1] = 5.0, 0.5  # (1, 2) is off by 5, (0, 1) by 0.5
    with pytest.raises(AssertionError) as info:
        assert_close(actual, np.zeros((2, 3)), atol=0.1, what="dW")
    lines = str(info.value).splitlines()
    assert lines[0] == "dW: 2 of 6 entries differ (rtol=1e-07, atol=0.1)"
    assert lines[1].split() == ["index", "actual", "expected", "|Δ|"]
    assert lines[2].startswith("(1, 2)")
    assert lines[3].startswith("(0, 1)")


def test_assert_close_reports_a_shape_mismatch():
    with pytest.raises(AssertionError, match=r"shape \(2,\) != expected \(3,\)"):
        assert_close(np.zeros(2), np.zeros(3))
