"""LoRA and the low-rank slot shared with PiSSA and SORSA (lora.py, lowrank.py), and target selection
(targets.py).

Properties: the factored forward equals x Wᵀ + b + s·x_d Aᵀ diag(S) Bᵀ in float64; its backward matches
finite differences for x, A, B and S, with and without dropout; PEFT's conventions (A ~ U(±1/√in),
B = 0, scaling alpha/r or alpha/√r, dropout on the adapter input only and only while training); a
LoRA model at init reproduces the base model; merged output equals adapted output and merge then
unmerge is the identity; targets select projections by name and layer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.errors import ConfigError
from minift.methods import method_record
from minift.methods.full import to_dense
from minift.methods.lora import (
    LoRAConfig,
    LowRankLinear,
    apply_lora,
    low_rank_slots,
    lowrank_forward,
    merge,
    unmerge,
)
from minift.methods.registry import get_method, method_names
from minift.methods.targets import select_targets, slot_names
from minift.model import model_backward, model_forward, trainable_parameters
from minift.slots import Dense
from minift.testing import assert_close, check_grad
from tests.adapters import base_model, batch, check_slot_grad, logits, perturb


def _factors(seed: int, N=5, I=6, O=4, R=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, I)), rng.standard_normal((O, I)), rng.standard_normal((R, I)),
            rng.standard_normal((O, R)), rng.standard_normal(R), rng.standard_normal(O))


# ----------------------------------------------------------------------------------------------------
# definition


@pytest.mark.parametrize("with_s", [False, True], ids=["lora", "sorsa-S"])
def test_lowrank_forward_is_base_plus_scaled_dropped_low_rank_product(with_s):
    x, w, A, B, S, b = _factors(0)
    S = S if with_s else None
    mask = np.random.default_rng(1).random(x.shape) >= 0.3
    y, _ = lowrank_forward(x, w, A, B, scaling=0.7, S=S, b=b, mask=mask, p=0.3)
    x_d = np.where(mask, x / 0.7, 0.0)
    s_diag = np.diag(S if with_s else np.ones(3))
    expected = x @ w.T + b + 0.7 * (x_d @ A.T @ s_diag @ B.T)
    assert_close(y, expected, rtol=1e-12, atol=1e-12, what="y")


def test_slot_dense_weight_is_weight_plus_scaled_B_S_A():
    _, w, A, B, S, b = _factors(2)
    slot = LowRankLinear(w, A, B, 1.5, S=S, bias=b)
    assert_close(slot.dense_weight(), w + 1.5 * B @ np.diag(S) @ A, rtol=1e-12, what="W + s B diag(S) A")


# ----------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("with_s", [False, True], ids=["lora", "sorsa-S"])
def test_slot_gradients_of_x_A_B_and_S_match_finite_differences(with_s, dropout):
    x, w, A, B, S, b = _factors(3)
    slot = LowRankLinear(w, A, B, 0.8, S=S if with_s else None, bias=b, dropout=dropout)
    report = check_slot_grad(slot, x, dropout_seed=7 if dropout else None)
    assert {c.name for c in report.checks} == {"x", "A", "B"} | ({"S"} if with_s else set())


def test_lora_model_gradients_match_finite_differences():
    model = perturb(apply_lora(base_model(), LoRAConfig(r=2, alpha=3.0, targets=("q", "v", "down"),
                                                        layers=(1,)), np.random.default_rng(0)))
    tokens = batch(1, B=1, T=3)
    params = trainable_parameters(model)
    assert sorted(params) == sorted(f"blocks.1.{n}.{f}" for n in ("q", "v", "down") for f in "AB")

    def forward(**_):
        return model_forward(model, tokens, train=False)[0]

    def backward(G, **_):
        _, cache = model_forward(model, tokens)
        return model_backward(model, G, cache)

    check_grad(forward, backward, params)


# ----------------------------------------------------------------------------------------------------
# PEFT conventions


def test_lora_init_has_A_uniform_within_one_over_sqrt_in_and_B_zero():
    model = apply_lora(base_model(), LoRAConfig(r=64, targets=("up", "down")), np.random.default_rng(0))
    for path, slot in low_rank_slots(model):
        bound = 1 / math.sqrt(slot.in_features)
        assert np.abs(slot.A).max() <= bound, path
        assert np.abs(slot.A).max() > 0.95 * bound, path  # uniform fills the interval
        assert abs(slot.A.std() - bound / math.sqrt(3)) < 0.1 * bound, path  # U(±a) has std a/√3
        assert not slot.B.any(), path


@pytest.mark.parametrize(("use_rslora", "expected"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_is_alpha_over_r_or_alpha_over_sqrt_r_with_rslora(use_rslora, expected):
    config = LoRAConfig(r=4, alpha=16, use_rslora=use_rslora)
    assert config.scaling == expected
    model = apply_lora(base_model(), config, np.random.default_rng(0))
    assert all(slot.scaling == expected for _, slot in low_rank_slots(model))


def test_dropout_acts_on_the_adapter_input_only_and_only_while_training():
    x, w, A, B, _, b = _factors(4)
    slot = LowRankLinear(w, A, B, 2.0, bias=b, dropout=0.5)
    clean = slot.forward(x, keep=True, rng=None)[0]
    assert_close(slot.forward(x, keep=False, rng=np.random.default_rng(0))[0], clean, rtol=0, what="eval")
    y, cache = slot.forward(x, keep=True, rng=np.random.default_rng(9))
    mask = np.random.default_rng(9).random(x.shape) >= 0.5
    expected = x @ w.T + b + 2.0 * (np.where(mask, 2 * x, 0) @ A.T @ B.T)  # base path sees all of x
    assert_close(y, expected, rtol=1e-12, atol=1e-12, what="dropped")
    assert cache.mask.dtype == bool  # one byte per entry, not a float copy


def test_lora_at_init_reproduces_the_base_model_on_every_projection():
    tokens = batch(2)
    expected = logits(base_model(), tokens)
    model = apply_lora(base_model(), LoRAConfig(r=3, alpha=5, targets="all"), np.random.default_rng(0))
    assert len(low_rank_slots(model)) == 2 * 7
    assert_close(logits(model, tokens), expected, rtol=1e-10, atol=1e-12, what="logits at init")


def test_only_the_adapter_factors_are_trainable():
    model = apply_lora(base_model(), LoRAConfig(r=2), np.random.default_rng(0))
    assert sorted(trainable_parameters(model)) == sorted(
        f"blocks.{i}.{n}.{f}" for i in range(2) for n in ("q", "v") for f in "AB"
    )


# ----------------------------------------------------------------------------------------------------
# merge / unmerge


@given(r=st.integers(1, 4), alpha=st.floats(0.5, 32), rslora=st.booleans(), seed=st.integers(0, 2**16))
@example(r=1, alpha=1.0, rslora=False, seed=0)
def test_merged_output_equals_adapted_output_and_unmerge_restores_the_weights(r, alpha, rslora, seed):
    config = LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, targets=("k", "o", "gate"))
    model = perturb(apply_lora(base_model(seed % 3), config, np.random.default_rng(seed)), seed)
    tokens = batch(seed)
    adapted = logits(model, tokens)
    weights = {p: s.weight.copy() for p, s in low_rank_slots(model)}
    merge(model)
    assert all(s.merged and not s.parameters() for _, s in low_rank_slots(model))
    assert_close(logits(model, tokens), adapted, rtol=1e-10, atol=1e-12, what="merged logits")
    unmerge(model)
    for p, s in low_rank_slots(model):
        assert_close(s.weight, weights[p], rtol=1e-12, atol=1e-13, what=f"{p} after merge+unmerge")
    assert_close(logits(model, tokens), adapted, rtol=1e-10, atol=1e-12, what="unmerged logits")


def test_to_dense_gives_a_plain_model_with_the_adapted_output():
    model = perturb(apply_lora(base_model(), LoRAConfig(r=2, targets="all"), np.random.default_rng(0)))
    tokens = batch(3)
    dense = to_dense(model)
    assert not trainable_parameters(dense)
    assert "adapter" not in dense.meta
    assert_close(logits(dense, tokens), logits(model, tokens), rtol=1e-10, atol=1e-12, what="dense")


# ----------------------------------------------------------------------------------------------------
# targets and the method registry


def test_targets_accept_hf_names_and_select_by_layer():
    assert slot_names(["v_proj", "q", "down_proj"]) == ("q", "v", "down")
    assert slot_names("all-linear") == ("q", "k", "v", "o", "gate", "up", "down")
    picked = select_targets(base_model(), ("o",), layers=[-1])
    assert [(i, n) for i, n, _ in picked] == [(1, "o")]


@pytest.mark.parametrize(
    ("targets", "layers", "message"),
    [(("qq",), None, "'qq'"), ((), None, "empty"), (("q",), (2,), "index 2"), (("q",), (-3,), "index -3")],
)
def test_bad_targets_raise_a_config_error_naming_them(targets, layers, message):
    with pytest.raises(ConfigError, match=message):
        apply_lora(base_model(), LoRAConfig(targets=targets, layers=layers))


def test_adapting_an_adapted_projection_is_refused():
    model = apply_lora(base_model(), LoRAConfig(), np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"blocks\.0\.q is a LowRankLinear"):
        apply_lora(model, LoRAConfig())


def test_every_registered_method_has_the_uniform_api():
    for name in method_names():
        method = get_method(name)
        if name == "full":
            config = method.Config()
        elif name == "s2ft":
            config = method.Config(heads=1, channels=2)
        else:
            config = method.Config(r=2)
        model = method.apply(base_model(), config, np.random.default_rng(0))
        assert method_record(model).name == name
        assert trainable_parameters(model), name
        assert method.unmerge(method.merge(model)) is model
    with pytest.raises(ConfigError, match="unknown fine-tuning method 'dora'"):
        get_method("dora")


def test_adapter_flops_are_the_frozen_base_plus_the_low_rank_products():
    _, w, A, B, _, _ = _factors(5)  # O 4, I 6, R 3
    slot, frozen = LowRankLinear(w, A, B, 1.0), Dense(w)
    n = 10
    forward, backward = slot.flops(n)
    base_forward, base_backward = frozen.flops(n)
    assert forward == base_forward + 2 * n * 3 * (6 + 4)  # x Aᵀ, then g Bᵀ
    assert backward == base_backward + 2 * n * 3 * (2 * 4 + 2 * 6)  # dB, dg, dA, dx through A
    assert slot.flops(n, need_dx=False)[1] == 2 * n * 3 * (2 * 4 + 6)
    slot.merge()
    assert slot.flops(n) == frozen.flops(n)
