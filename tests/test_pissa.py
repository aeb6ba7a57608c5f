"""PiSSA (pissa.py): principal singular triplets as the adapter, the rest as a frozen residual.

Properties: s·B A is the best rank-r part U_r diag(σ_r) V_rᵀ of W and W_res + s·B A = W, whatever
alpha is; B and Aᵀ span the top-r left and right singular subspaces; the randomized ``svd_lowrank``
is exact on a rank-q matrix and converges to the exact SVD as niter grows; a PiSSA model at init (exact
or randomized SVD) reproduces the base model; its slot's gradients match finite differences; merge and
unmerge. PEFT's own PiSSA init is compared in tests/crosscheck/test_against_peft.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.errors import ConfigError
from minift.methods.lora import low_rank_slots, merge, unmerge
from minift.methods.pissa import PiSSAConfig, apply_pissa, pissa_factors, svd_lowrank, top_svd
from minift.testing import assert_close
from tests.adapters import base_model, batch, check_slot_grad, logits, perturb


def _spectrum_matrix(m: int, n: int, sigma: np.ndarray, seed: int) -> np.ndarray:
    """U diag(σ) Vᵀ with random orthonormal U (m, k), V (n, k)."""
    rng = np.random.default_rng(seed)
    k = len(sigma)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return (U * sigma) @ V.T


# ----------------------------------------------------------------------------------------------------
# definition


@given(
    shape=st.tuples(st.integers(2, 7), st.integers(2, 7)),
    r=st.integers(1, 7),
    alpha=st.floats(0.25, 16),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(shape=(4, 6), r=2, alpha=1.0, rslora=False, seed=0)
def test_pissa_adapter_is_the_best_rank_r_part_and_the_residual_completes_w(shape, r, alpha, rslora, seed):
    r = min(r, *shape)
    w = np.random.default_rng(seed).standard_normal(shape)
    scaling = PiSSAConfig(r=r, alpha=alpha, use_rslora=rslora).scaling
    A, B, residual = pissa_factors(w, r, scaling)
    U, s, Vt = np.linalg.svd(w)
    assert_close(scaling * B @ A, (U[:, :r] * s[:r]) @ Vt[:r], rtol=1e-9, atol=1e-10, what="s·BA")
    assert_close(residual + scaling * B @ A, w, rtol=1e-12, atol=1e-12, what="W_res + s·BA")
    # B and Aᵀ span the top-r singular subspaces: projecting onto U_r / V_r leaves them unchanged.
    assert_close(U[:, :r] @ (U[:, :r].T @ B), B, rtol=1e-9, atol=1e-9, what="span B")
    assert_close(Vt[:r].T @ (Vt[:r] @ A.T), A.T, rtol=1e-9, atol=1e-9, what="span Aᵀ")
    # the square root is split evenly: A Aᵀ = BᵀB = diag(σ_r / s)
    assert_close(A @ A.T, np.diag(s[:r] / scaling), rtol=1e-9, atol=1e-9, what="A Aᵀ")
    assert_close(B.T @ B, np.diag(s[:r] / scaling), rtol=1e-9, atol=1e-9, what="BᵀB")


@pytest.mark.parametrize("shape", [(9, 5), (5, 9)], ids=["tall", "wide"])
def test_svd_lowrank_is_exact_on_a_matrix_of_rank_q(shape):
    w = _spectrum_matrix(*shape, np.array([3.0, 2.0, 0.5]), seed=1)
    U, s, V = svd_lowrank(w, 3, niter=0, rng=np.random.default_rng(0))
    assert (U.shape, s.shape, V.shape) == ((shape[0], 3), (3,), (shape[1], 3))
    assert_close(s, [3.0, 2.0, 0.5], rtol=1e-12, what="σ")
    assert_close((U * s) @ V.T, w, rtol=1e-10, atol=1e-12, what="U diag(σ) Vᵀ")


def test_randomized_svd_converges_to_the_exact_one_as_niter_grows():
    sigma = 0.8 ** np.arange(12)  # a slowly decaying spectrum: σ_4/σ_5 = 1.25 only
    w = _spectrum_matrix(20, 16, sigma, seed=2)
    U, s, Vt = top_svd(w, 4)
    exact = (U * s) @ Vt
    errors = []
    for niter in (0, 2, 8, 32):
        Ur, sr, Vtr = top_svd(w, 4, niter=niter, rng=np.random.default_rng(3))
        errors.append(np.linalg.norm((Ur * sr) @ Vtr - exact))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[0] > 1e-2  # the test is not trivial: without iterations the subspace is off
    assert errors[-1] < 1e-5
    assert_close(sr, s, rtol=1e-8, what="σ at niter=32")


# ----------------------------------------------------------------------------------------------------
# gradients (the slot is LoRA's; here on a PiSSA-initialised one)


def test_pissa_slot_gradients_match_finite_differences():
    model = perturb(apply_pissa(base_model(), PiSSAConfig(r=2, alpha=4, targets=("gate",))))
    (_, slot), *_ = low_rank_slots(model)
    check_slot_grad(slot, np.random.default_rng(0).standard_normal((3, slot.in_features)))


# ----------------------------------------------------------------------------------------------------
# invariants on a model


@pytest.mark.parametrize("niter", [None, 2], ids=["exact", "randomized"])
def test_pissa_at_init_reproduces_the_base_model(niter):
    tokens = batch(4)
    expected = logits(base_model(), tokens)
    config = PiSSAConfig(r=3, alpha=6, targets="all", niter=niter)
    model = apply_pissa(base_model(), config, np.random.default_rng(5))
    assert_close(logits(model, tokens), expected, rtol=1e-10, atol=1e-12, what="logits at init")
    for _, slot in low_rank_slots(model):
        assert_close(slot.A0, slot.A, rtol=0, what="A₀")  # the init factors are kept for export


def test_pissa_merge_then_unmerge_is_the_identity_and_merged_equals_adapted():
    model = perturb(apply_pissa(base_model(), PiSSAConfig(r=2, targets=("q", "up"))), seed=1)
    tokens = batch(5)
    adapted = logits(model, tokens)
    residuals = [s.weight.copy() for _, s in low_rank_slots(model)]
    assert_close(logits(merge(model), tokens), adapted, rtol=1e-10, atol=1e-12, what="merged")
    for (p, s), w in zip(low_rank_slots(unmerge(model)), residuals, strict=True):
        assert_close(s.weight, w, rtol=1e-12, atol=1e-13, what=p)


def test_pissa_rank_above_min_dimension_or_a_negative_niter_is_a_config_error():
    with pytest.raises(ConfigError, match="rank r=9"):
        apply_pissa(base_model(), PiSSAConfig(r=9, targets=("k",)))
    with pytest.raises(ConfigError, match="niter"):
        PiSSAConfig(niter=-1)
