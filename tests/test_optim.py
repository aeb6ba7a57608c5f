"""AdamW, schedules, clipping and gradient accumulation (minift.optim).

Definition (naive float64 references) → invariants (Hypothesis); the outside oracle (torch.optim.AdamW,
transformers' schedules) is tests/crosscheck/test_optim_against_torch.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minift.data import Example, collate
from minift.errors import ConfigError, DataError
from minift.model import set_trainable, trainable_parameters
from minift.optim import AdamW, Schedule, accumulate_gradients, clip_grad_norm, global_grad_norm
from minift.testing import assert_close
from tests.toy import tiny_model

finite = st.floats(-4, 4, allow_nan=False, width=64)


def naive_adamw(p, grads, lr, b1, b2, eps, wd):
    """Loshchilov & Hutter Algorithm 2 written element by element, bias corrections spelled out."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        for i in np.ndindex(p.shape):
            p[i] = p[i] - lr * wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


# ----------------------------------------------------------------------------------------------------
# AdamW: definition


def test_adamw_matches_the_papers_update_rule_with_bias_correction_and_decoupled_decay(rng):
    W = rng.standard_normal((3, 4))
    b = rng.standard_normal(3)
    gW = [rng.standard_normal((3, 4)) for _ in range(4)]
    gb = [rng.standard_normal(3) for _ in range(4)]
    params = {"w": W.copy(), "b": b.copy()}
    opt = AdamW(params, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for g1, g2 in zip(gW, gb, strict=True):
        opt.step({"w": g1, "b": g2}, lr=0.05)
    # minift (like PyTorch) divides by sqrt(v)/sqrt(1−β₂ᵗ) + ε, which is sqrt(v̂) + ε: the same rule
    assert_close(params["w"], naive_adamw(W, gW, 0.05, 0.8, 0.95, 1e-6, 0.1), rtol=1e-12, what="matrix")
    # vectors (biases, norm weights) are not decayed
    assert_close(params["b"], naive_adamw(b, gb, 0.05, 0.8, 0.95, 1e-6, 0.0), rtol=1e-12, what="bias")
    assert opt.t == 4


def test_adamw_state_exists_only_for_trainable_arrays_and_has_their_shapes():
    model = tiny_model(9, trainable=False)
    model.blocks[1].o.requires_grad = True
    model.final_norm.requires_grad = True
    params = trainable_parameters(model)
    opt = AdamW(params)
    assert set(opt.m) == set(opt.v) == {"blocks.1.o.weight", "final_norm.weight"}
    for k, p in params.items():
        assert opt.m[k].shape == opt.v[k].shape == p.shape
        assert opt.m[k].dtype == p.dtype
    assert opt.state_bytes() == 2 * sum(p.nbytes for p in params.values())


def test_adamw_updates_views_in_place_so_only_the_viewed_block_of_a_matrix_changes(rng):
    W = rng.standard_normal((4, 6))
    before = W.copy()
    params = {"block": W[:, :2]}  # S2FT's trainable block: a view into the frozen matrix
    opt = AdamW(params)
    opt.step({"block": rng.standard_normal((4, 2))}, lr=0.1)
    assert opt.m["block"].shape == (4, 2)
    assert np.array_equal(W[:, 2:], before[:, 2:])
    assert not np.array_equal(W[:, :2], before[:, :2])
    assert params["block"].base is W


def test_adamw_names_a_trainable_array_that_received_no_gradient():
    opt = AdamW({"a": np.zeros(2), "b": np.zeros(2)})
    with pytest.raises(KeyError, match="'b'"):
        opt.step({"a": np.ones(2)}, lr=0.1)


def test_adamw_rejects_betas_outside_zero_one():
    with pytest.raises(ConfigError, match="betas"):
        AdamW({}, betas=(1.0, 0.999))


# ----------------------------------------------------------------------------------------------------
# AdamW: invariants


@given(
    p=arrays(np.float64, (3, 2), elements=finite),
    g=arrays(np.float64, (3, 2), elements=finite),
    steps=st.integers(1, 3),
    wd=st.sampled_from([0.0, 0.1]),
)
@example(p=np.ones((3, 2)), g=np.ones((3, 2)), steps=1, wd=0.0)
def test_a_step_with_zero_learning_rate_changes_no_parameter_value(p, g, steps, wd):
    params = {"p": p.copy()}
    opt = AdamW(params, weight_decay=wd)
    for _ in range(steps):
        opt.step({"p": g}, lr=0.0)
    assert np.array_equal(params["p"], p)
    # −0 may become +0 (−0 − (−0) = +0 in IEEE arithmetic), but +0 never becomes −0
    assert not (np.signbit(params["p"]) & ~np.signbit(p)).any()


@given(
    g=arrays(np.float64, (2, 3), elements=finite.filter(lambda x: abs(x) > 1e-3)),
    lr=st.floats(1e-4, 1e-1),
)
@example(g=np.full((2, 3), 0.5), lr=0.01)
def test_the_first_adam_step_moves_each_entry_by_about_lr_against_its_gradient_sign(g, lr):
    # t = 1: m̂ = g, v̂ = g², so the step is lr · g / (|g| + ε) ≈ lr · sign(g) (the paper's sign-like start)
    params = {"p": np.zeros((2, 3))}
    AdamW(params, eps=1e-12).step({"p": g}, lr=lr)
    assert_close(params["p"], -lr * np.sign(g), rtol=1e-8, what="first step")


# ----------------------------------------------------------------------------------------------------
# schedules


def hf_lambda(kind, W, T, s):
    """transformers.optimization's lr_lambda functions, copied as formulas (float division)."""
    if s < W:
        return s / max(1, W)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (T - s) / max(1, T - W))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * (s - W) / max(1, T - W))))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedules_follow_the_hugging_face_formulas_at_every_step(kind):
    sched = Schedule(2e-3, total_steps=20, kind=kind, warmup_steps=5)
    for s in range(21):
        assert sched(s) == pytest.approx(2e-3 * hf_lambda(kind, 5, 20, s), rel=1e-15, abs=0)


def test_with_warmup_the_first_step_has_lr_zero_and_step_w_has_the_peak():
    sched = Schedule(1e-3, total_steps=10, kind="linear", warmup_steps=4)
    assert sched(0) == 0.0
    assert sched(4) == 1e-3
    assert Schedule(1e-3, 10, "cosine", 4)(0) == 0.0


def test_without_warmup_the_first_step_has_the_peak_and_the_last_linear_step_is_not_zero():
    sched = Schedule(1e-3, total_steps=10, kind="linear")
    assert sched(0) == 1e-3
    assert sched(9) == pytest.approx(1e-4)  # lr_max / (T − W): λ reaches 0 only at step T
    assert sched(10) == 0.0
    assert Schedule(1e-3, 10, "cosine")(5) == pytest.approx(5e-4)  # half-way down the cosine


@given(
    kind=st.sampled_from(["constant", "linear", "cosine"]),
    total=st.integers(1, 50),
    warmup_frac=st.floats(0, 1),
)
@example(kind="linear", total=10, warmup_frac=0.3)
@example(kind="linear", total=1, warmup_frac=1.0)
def test_a_schedule_rises_in_warmup_never_rises_after_and_stays_in_0_to_lr_max(kind, total, warmup_frac):
    W = int(warmup_frac * total)
    lrs = [Schedule(1.0, total, kind, W)(s) for s in range(total + 1)]
    assert all(0.0 <= lr <= 1.0 for lr in lrs)
    # rises through warm-up up to step W, if W is a step that is taken (s < T): at W = T the linear
    # schedule's λ(T) = 0 belongs to no step
    assert all(a < b for a, b in itertools.pairwise(lrs[: min(W, total - 1) + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[W:]))


def test_an_unknown_schedule_or_a_warmup_longer_than_training_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown schedule"):
        Schedule(1e-3, 10, "step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="warmup_steps"):
        Schedule(1e-3, 10, "linear", 11)


# ----------------------------------------------------------------------------------------------------
# clipping


@given(
    a=arrays(np.float64, (3, 2), elements=finite),
    b=arrays(np.float64, (4,), elements=finite),
    max_norm=st.floats(0.1, 10),
)
@example(a=np.full((3, 2), 3.0), b=np.zeros(4), max_norm=1.0)
def test_clipping_returns_the_norm_before_and_leaves_at_most_max_norm(a, b, max_norm):
    grads = {"a": a.copy(), "b": b.copy()}
    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(math.sqrt((a**2).sum() + (b**2).sum()), rel=1e-12)
    after = global_grad_norm(grads)
    if norm <= max_norm:
        assert np.array_equal(grads["a"], a)  # untouched, bitwise
        assert np.array_equal(grads["b"], b)
    else:
        assert after == pytest.approx(max_norm * norm / (norm + 1e-6), rel=1e-12)  # torch's coefficient
        assert_close(grads["a"] * norm, a * after, rtol=1e-10, atol=1e-12, what="direction kept")


def test_clipping_a_non_finite_gradient_reports_it_and_scales_nothing():
    grads = {"a": np.array([np.inf, 1.0])}
    assert math.isinf(clip_grad_norm(grads, 1.0))
    assert grads["a"][1] == 1.0


# ----------------------------------------------------------------------------------------------------
# gradient accumulation


def _examples(rng, n):
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 8))
        ids = [int(t) for t in rng.integers(3, 9, size=length)]
        prompt = int(rng.integers(1, length - 1))  # a varying number of counted tokens per example
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_accumulating_k_micro_batches_equals_one_batch_k_times_the_size(k, rng):
    model = set_trainable(tiny_model(9, dtype=np.float64))
    examples = _examples(rng, 2 * k)
    big = collate(examples, pad_id=0)
    micro = [collate(examples[2 * i : 2 * i + 2], pad_id=0) for i in range(k)]  # each padded on its own
    loss_big, grads_big, n_big = accumulate_gradients(model, [tuple(big)])
    loss_acc, grads_acc, n_acc = accumulate_gradients(model, [tuple(b) for b in micro])
    assert n_acc == n_big
    assert loss_acc == pytest.approx(loss_big, rel=1e-12)
    assert set(grads_acc) == set(trainable_parameters(model))
    for key, g in grads_big.items():
        assert_close(grads_acc[key], g, rtol=1e-9, atol=1e-13, what=key)


def test_micro_batches_without_any_counted_target_are_a_data_error():
    model = tiny_model(9)
    tokens = np.ones((1, 3), dtype=np.int64)
    with pytest.raises(DataError, match="no counted target"):
        accumulate_gradients(model, [(tokens, np.full((1, 3), -100), None)])
