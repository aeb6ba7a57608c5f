"""SORSA (sorsa.py): trainable singular vectors and values, a frozen residual, the orthonormal regularizer.

Properties: the factors are the top-r SVD of the stored (out, in) weight (B = U_r, S = σ_r, A = V_rᵀ:
the paper's W is the transpose) and the residual completes W; a SORSA model at init reproduces the
base model; the slot's and the whole model's gradients (x, A, B, S) match finite differences; the
regularizer ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (not squared, averaged over matrices) equals a naive reference,
is zero exactly for orthonormal factors and positive otherwise, and its guarded gradient matches finite
differences; the hook adds (γ / η_max [/ GA]) ∇L_ortho to the gradients; merge and unmerge.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from minift.errors import ConfigError
from minift.methods.lora import low_rank_slots, merge, unmerge
from minift.methods.sorsa import (
    SORSAConfig,
    SORSARegularizer,
    apply_sorsa,
    gradient_hook,
    orthonormal_regularizer,
    orthonormality_backward,
    orthonormality_forward,
)
from minift.model import model_backward, model_forward, trainable_parameters
from minift.testing import assert_close, check_grad
from tests.adapters import base_model, batch, check_slot_grad, logits, perturb


def _sorsa(seed: int = 0, **kw):
    return apply_sorsa(base_model(seed), SORSAConfig(**{"r": 2} | kw))


# ----------------------------------------------------------------------------------------------------
# definition


def test_factors_are_the_top_r_svd_of_the_stored_weight_and_the_residual_completes_it():
    base = base_model()
    model = apply_sorsa(base_model(), SORSAConfig(r=3, targets=("k", "down")))
    for path, slot in low_rank_slots(model):
        i, name = int(path.split(".")[1]), path.split(".")[2]
        w = getattr(base.blocks[i], name).weight  # (O, I)
        U, s, Vt = np.linalg.svd(w)
        assert slot.B.shape == (w.shape[0], 3)
        assert slot.A.shape == (3, w.shape[1])
        assert_close(slot.S, s[:3], rtol=1e-12, what=f"{path} S")
        assert_close(np.abs(np.sum(slot.B * U[:, :3], axis=0)), np.ones(3), rtol=1e-10, what=f"{path} B")
        assert_close(np.abs(np.sum(slot.A * Vt[:3], axis=1)), np.ones(3), rtol=1e-10, what=f"{path} A")
        assert_close(slot.weight + (slot.B * slot.S) @ slot.A, w, rtol=1e-12, atol=1e-13, what=path)


@pytest.mark.parametrize("alpha", [None, 4.0], ids=["scale-1", "alpha-over-r"])
def test_sorsa_at_init_reproduces_the_base_model(alpha):
    tokens = batch(6)
    expected = logits(base_model(), tokens)
    model = _sorsa(r=3, alpha=alpha)
    assert len(low_rank_slots(model)) == 2 * 7  # all seven projections by default
    assert_close(logits(model, tokens), expected, rtol=1e-10, atol=1e-12, what="logits at init")


def test_regularizer_equals_the_mean_of_non_squared_frobenius_norms():
    model = perturb(_sorsa(targets=("q", "o")), seed=2)
    slots = low_rank_slots(model)
    naive = np.mean([
        d for _, s in slots
        for d in (np.linalg.norm(s.A @ s.A.T - np.eye(2)), np.linalg.norm(s.B.T @ s.B - np.eye(2)))
    ])
    value, grads = orthonormal_regularizer(model)
    assert value == pytest.approx(naive, rel=1e-12)
    assert sorted(grads) == sorted(f"{p}.{f}" for p, _ in slots for f in "AB")  # S is not regularized


# ----------------------------------------------------------------------------------------------------
# gradients


def test_sorsa_slot_gradients_of_x_A_B_and_S_match_finite_differences():
    model = perturb(_sorsa(alpha=3.0, targets=("v",), dropout=0.25))
    (_, slot), *_ = low_rank_slots(model)
    x = np.random.default_rng(0).standard_normal((3, slot.in_features))
    report = check_slot_grad(slot, x, dropout_seed=1)
    assert {c.name for c in report.checks} == {"x", "A", "B", "S"}


def test_sorsa_model_gradients_match_finite_differences():
    model = perturb(_sorsa(targets=("k", "up"), layers=(0,)), seed=3)
    tokens = batch(7, B=1, T=3)

    def forward(**_):
        return model_forward(model, tokens, train=False)[0]

    def backward(G, **_):
        return model_backward(model, G, model_forward(model, tokens)[1])

    check_grad(forward, backward, trainable_parameters(model))


@pytest.mark.parametrize("shape", [(3, 5), (4, 2)], ids=["wide-like-A", "tall-like-B-transposed"])
def test_orthonormality_gradient_matches_finite_differences(shape):
    X = np.random.default_rng(0).standard_normal(shape)
    check_grad(lambda X: orthonormality_forward(X)[0],
               lambda G, X: {"X": orthonormality_backward(G, orthonormality_forward(X)[1])}, {"X": X})


def test_regularizer_gradient_over_the_model_matches_finite_differences():
    model = perturb(_sorsa(targets=("q", "down")), seed=4)
    params = {k: v for k, v in trainable_parameters(model).items() if not k.endswith(".S")}
    check_grad(lambda **_: orthonormal_regularizer(model)[0],
               lambda G, **_: {k: G * g for k, g in orthonormal_regularizer(model)[1].items()}, params)


# ----------------------------------------------------------------------------------------------------
# invariants


@given(n=st.integers(1, 6), extra=st.integers(0, 4), seed=st.integers(0, 2**16))
@example(n=3, extra=2, seed=0)
def test_regularizer_is_zero_for_orthonormal_rows_and_positive_otherwise(n, extra, seed):
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((n + extra, n)))[0].T  # (n, n + extra), orthonormal rows
    value, cache = orthonormality_forward(Q)
    assert value < 1e-12
    D = rng.standard_normal(Q.shape)
    assume(np.linalg.norm(D) > 1e-3)
    assert orthonormality_forward(Q + 0.1 * D)[0] > 0
    if value == 0.0:
        assert not orthonormality_backward(1.0, cache).any()


def test_regularizer_of_identity_like_factors_is_exactly_zero_with_zero_gradient():
    X = np.eye(3, 5)  # [I | 0]
    value, cache = orthonormality_forward(X)
    assert value == 0.0
    assert not orthonormality_backward(1.0, cache).any()  # guarded: no 0/0


def test_regularizer_at_init_is_zero_to_rounding():
    value, _ = orthonormal_regularizer(_sorsa())
    assert value < 1e-13


# ----------------------------------------------------------------------------------------------------
# the hook and the update


@pytest.mark.parametrize(("mode", "expected"), [("faithful", 4e-4 / 3e-5 / 8), ("plain", 4e-4 / 3e-5)])
def test_hook_adds_gamma_over_lr_max_times_the_gradient_over_accumulation_if_faithful(mode, expected):
    model = perturb(_sorsa(targets=("q",)), seed=5)
    task = {k: np.full_like(v, 0.5) for k, v in trainable_parameters(model).items()}
    before = {k: v.copy() for k, v in task.items()}
    hook = gradient_hook(SORSAConfig(r=2, gamma=4e-4, mode=mode))
    assert hook.coefficient(3e-5, 8) == pytest.approx(expected, rel=1e-12)
    value, reg = orthonormal_regularizer(model)
    assert hook(model, task, lr_max=3e-5, accum_steps=8) == value
    for k in task:
        added = expected * reg[k] if k in reg else 0.0
        assert_close(task[k], before[k] + added, rtol=1e-12, what=k)


def test_hook_creates_missing_gradient_entries_and_ignores_models_without_sorsa():
    model = perturb(_sorsa(targets=("o",)), seed=6)
    grads: dict = {}
    SORSARegularizer(SORSAConfig(gamma=1.0))(model, grads, lr_max=1.0)
    assert sorted(grads) == ["blocks.0.o.A", "blocks.0.o.B", "blocks.1.o.A", "blocks.1.o.B"]
    grads = {}
    assert SORSARegularizer(SORSAConfig(gamma=1.0))(base_model(), grads, lr_max=1.0) == 0.0
    assert grads == {}


@pytest.mark.parametrize(("kw", "message"), [({"mode": "squared"}, "mode"), ({"gamma": -1.0}, "gamma")])
def test_bad_regularizer_settings_raise_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        SORSAConfig(**kw)


def test_the_regularizer_reads_gamma_from_the_config_and_refuses_a_bare_number():
    config = SORSAConfig(gamma=2e-3, mode="plain")
    assert SORSARegularizer(config).coefficient(1e-2, 4) == pytest.approx(2e-3 / 1e-2, rel=1e-12)
    with pytest.raises(ConfigError, match="SORSAConfig"):
        SORSARegularizer(4e-4)


# ----------------------------------------------------------------------------------------------------
# merge / unmerge


def test_sorsa_merge_then_unmerge_is_the_identity_and_merged_equals_adapted():
    model = perturb(_sorsa(alpha=1.0, targets=("v", "gate")), seed=7)
    tokens = batch(8)
    adapted = logits(model, tokens)
    residuals = [s.weight.copy() for _, s in low_rank_slots(model)]
    assert_close(logits(merge(model), tokens), adapted, rtol=1e-10, atol=1e-12, what="merged")
    assert orthonormal_regularizer(model) == (0.0, {})  # merged slots train nothing
    for (p, s), w in zip(low_rank_slots(unmerge(model)), residuals, strict=True):
        assert_close(s.weight, w, rtol=1e-12, atol=1e-13, what=p)
