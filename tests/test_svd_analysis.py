"""SVD-deviation analysis (svd_analysis.py): the SORSA paper's ΔΣ and ΔD.

Properties: both equal a naive per-triplet loop; they are zero for the same weight and blind to the
sign ambiguity of singular vectors; changing only the singular values gives ΔD = 0 and ΔΣ = the mean
change; rotating the singular vectors away gives ΔD > 0; the trajectory recorder records every trained
projection at the chosen interval, starting from zero.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.errors import ShapeError
from minift.methods.lora import LoRAConfig, apply_lora
from minift.methods.svd_analysis import SVDTrajectory, svd_deviation
from tests.adapters import base_model, perturb


def _naive(w0: np.ndarray, w1: np.ndarray, k: int) -> tuple[float, float]:
    U0, s0, Vt0 = np.linalg.svd(w0)
    U1, s1, Vt1 = np.linalg.svd(w1)
    d_sigma = sum(abs(s1[i] - s0[i]) for i in range(k)) / k
    cos = sum(abs(U0[:, i] @ U1[:, i]) + abs(Vt0[i] @ Vt1[i]) for i in range(k))
    return d_sigma, 1 - cos / (2 * k)


@pytest.mark.parametrize("r", [None, 2])
def test_svd_deviation_equals_a_naive_per_triplet_loop(r):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 7))
    w1 = w0 + 0.3 * rng.standard_normal((5, 7))
    d = svd_deviation(w0, w1, r)
    assert (d.delta_sigma, d.delta_d) == pytest.approx(_naive(w0, w1, r or 5), rel=1e-12)


@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6)), seed=st.integers(0, 2**16),
       factor=st.floats(0.1, 10))
@example(shape=(3, 4), seed=0, factor=2.0)
def test_scaling_a_weight_changes_singular_values_only(shape, seed, factor):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    same = svd_deviation(w, w)
    assert same.delta_sigma == 0.0
    assert abs(same.delta_d) < 1e-12
    U, s, Vt = np.linalg.svd(w, full_matrices=False)
    flipped = (-U * s) @ -Vt  # the same matrix built from sign-flipped vectors
    assert abs(svd_deviation(w, flipped).delta_d) < 1e-9
    scaled = svd_deviation(w, factor * w)
    assert scaled.delta_sigma == pytest.approx(abs(factor - 1) * s.mean(), rel=1e-9, abs=1e-12)
    assert abs(scaled.delta_d) < 1e-9


def test_rotating_the_singular_vectors_away_gives_a_positive_delta_d():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 6))
    Q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    d = svd_deviation(w, Q @ w)  # same σ, rotated left vectors
    assert d.delta_sigma < 1e-12
    assert d.delta_d > 0.05


def test_weights_of_different_shapes_are_a_shape_error():
    with pytest.raises(ShapeError, match=r"\(2, 3\) and \(3, 2\)"):
        svd_deviation(np.ones((2, 3)), np.ones((3, 2)))


def test_trajectory_records_every_trained_projection_at_the_interval():
    model = apply_lora(base_model(), LoRAConfig(r=2, targets=("q", "down")), np.random.default_rng(0))
    trajectory = SVDTrajectory.start(model, every=2)
    assert sorted(trajectory.reference) == ["blocks.0.down", "blocks.0.q", "blocks.1.down", "blocks.1.q"]
    for step in range(5):
        if step:
            perturb(model, seed=step, scale=0.05)
        trajectory(model, step)
    assert trajectory.steps == [0, 2, 4]
    means = list(trajectory.mean())
    assert means[0] == (0, pytest.approx(0.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    assert means[2][1] > means[1][1] > 0  # the weights drift further from W₀
    assert all(len(v) == 3 for v in trajectory.values.values())
