"""S2FT selection (paper Sec. 3.2, App. D, Table 4) and parameter budgets (Sec. 5.4).

Properties: each layer gets exactly the configured number of distinct heads and channels (uniform
across layers); random selection is deterministic under a seed; the weight, activation, product and
gradient scores pick the top (``large``) or bottom (``small``) units of naive references computed
from the raw weights, from a full-FT forward's kept activations and from full-FT gradients; scoring
leaves the model unchanged; the LoRA-matched budget is within one unit of LoRA's parameter count and
equals what ``apply_s2ft`` makes trainable; bad configurations are ConfigErrors.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minift.config import ModelConfig
from minift.errors import ConfigError
from minift.methods.s2ft import (
    S2FTConfig,
    apply_s2ft,
    lora_parameter_count,
    match_lora_budget,
    s2ft_parameter_count,
    select_units,
)
from minift.methods.s2ft.budget import channel_cost, head_cost
from minift.model import init_model, loss_and_grads, model_forward, set_trainable, trainable_parameters

CFG = ModelConfig(
    vocab_size=11, hidden_size=8, intermediate_size=10, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=2
)


def _model(seed: int = 0):
    return init_model(CFG, np.random.default_rng(seed), dtype=np.float64, std=0.5)


def _batches(seed: int = 1, n: int = 2):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))) for _ in range(n)]


def _norms_by_unit(sq_cols: np.ndarray, width: int) -> np.ndarray:
    """sqrt of per-unit sums of per-column squares (a unit = ``width`` consecutive columns)."""
    return np.sqrt(sq_cols.reshape(-1, width).sum(axis=1))


def _expected(scores: np.ndarray, n: int, variant: str) -> tuple[int, ...]:
    ranked = sorted(range(len(scores)), key=lambda u: (-scores[u] if variant == "large" else scores[u], u))
    return tuple(sorted(ranked[:n]))


def _reference_scores(model, strategy, batches):
    """Per layer (head scores, channel scores), written from the raw weights, from the inputs a
    full-FT forward keeps for O and Down, and from full-FT gradients."""
    D = CFG.head_dim
    if strategy == "weight":
        return [
            (_norms_by_unit((b.o.weight**2).sum(0), D), np.sqrt((b.down.weight**2).sum(0)))
            for b in model.blocks
        ]
    full = set_trainable(_model())  # the same weights, every one trainable (full fine-tuning)
    if strategy == "activation":
        sq = [(np.zeros(CFG.n_heads * D), np.zeros(CFG.intermediate_size)) for _ in model.blocks]
        for tokens, _ in batches:
            _, cache = model_forward(full, tokens)
            for (so, sd), bc in zip(sq, cache.blocks, strict=True):
                so += (bc.o**2).sum(0)  # a trainable dense slot keeps its input x
                sd += (bc.down**2).sum(0)
        return [(_norms_by_unit(so, D), np.sqrt(sd)) for so, sd in sq]
    grads = [loss_and_grads(full, t, y)[1] for t, y in batches]
    out = []
    for i in range(CFG.n_layers):
        go = sum(g[f"blocks.{i}.o.weight"] for g in grads) / len(grads)
        gd = sum(g[f"blocks.{i}.down.weight"] for g in grads) / len(grads)
        out.append((_norms_by_unit((go**2).sum(0), D), np.sqrt((gd**2).sum(0))))
    return out


@pytest.mark.parametrize("variant", ["large", "small"])
@pytest.mark.parametrize("strategy", ["weight", "activation", "product", "gradient"])
def test_scored_strategies_pick_the_extreme_units_of_a_naive_reference(strategy, variant):
    model, batches = _model(), _batches()
    if strategy == "product":
        w, a = _reference_scores(model, "weight", None), _reference_scores(model, "activation", batches)
        ref = [(wh * ah, wc * ac) for (wh, wc), (ah, ac) in zip(w, a, strict=True)]
    else:
        ref = _reference_scores(model, strategy, batches)
    cfg = S2FTConfig(heads=2, channels=3, strategy=strategy, variant=variant)
    got = select_units(model, cfg, batches)
    assert got == {i: (_expected(h, 2, variant), _expected(c, 3, variant)) for i, (h, c) in enumerate(ref)}


def test_scoring_leaves_the_model_unchanged():
    model = _model()
    before = {n: s.weight.copy() for n, s in model.blocks[0].slots()}
    select_units(model, S2FTConfig(heads=1, channels=1, strategy="gradient"), _batches())
    assert not trainable_parameters(model)
    for n, s in model.blocks[0].slots():
        np.testing.assert_array_equal(s.weight, before[n])


@given(st.integers(0, CFG.n_heads), st.integers(0, CFG.intermediate_size), st.integers(0, 2**16))
@example(CFG.n_heads, CFG.intermediate_size, 0)
def test_random_selection_gives_every_layer_the_same_counts_and_repeats_under_a_seed(heads, channels, seed):
    cfg = S2FTConfig(heads=heads, channels=channels)
    sel = select_units(_model(), cfg, rng=np.random.default_rng(seed))
    assert sel == select_units(_model(), cfg, rng=np.random.default_rng(seed))
    assert sorted(sel) == list(range(CFG.n_layers))
    for h, c in sel.values():
        assert len(set(h)) == heads
        assert len(set(c)) == channels
        assert all(0 <= u < CFG.n_heads for u in h)
        assert all(0 <= u < CFG.intermediate_size for u in c)


@settings(max_examples=20)
@given(
    st.integers(1, 8),
    st.sampled_from([("o",), ("q", "o"), ("v", "o"), ()]),
    st.sampled_from([("down",), ("up", "down"), ("gate", "up", "down")]),
)
@example(2, ("o",), ("down",))
def test_the_lora_matched_budget_is_within_one_unit_of_lora(rank, head_targets, channel_targets):
    big = ModelConfig(
        vocab_size=11, hidden_size=64, intermediate_size=512, n_layers=2, n_heads=8, n_kv_heads=8
    )
    s2 = match_lora_budget(big, rank, head_targets=head_targets, channel_targets=channel_targets)
    slack = big.n_layers * max(channel_cost(big, channel_targets), head_cost(big, head_targets) / 2)
    assert abs(s2ft_parameter_count(big, s2) - lora_parameter_count(big, rank)) <= slack


def test_a_budget_for_some_layers_spends_loras_whole_count_on_those_layers():
    big = ModelConfig(
        vocab_size=11, hidden_size=64, intermediate_size=512, n_layers=4, n_heads=8, n_kv_heads=8
    )
    s2 = match_lora_budget(big, 4, layers=(1, 2))
    slack = 2 * max(channel_cost(big, ("down",)), head_cost(big, ("o",)) / 2)
    assert abs(s2ft_parameter_count(big, s2) - lora_parameter_count(big, 4)) <= slack


def test_the_counted_budget_is_what_apply_s2ft_makes_trainable():
    s2 = S2FTConfig(heads=2, channels=3, head_targets=("q", "o"), channel_targets=("up", "down"))
    model = apply_s2ft(_model(), s2, rng=np.random.default_rng(0))
    assert sum(p.size for p in trainable_parameters(model).values()) == s2ft_parameter_count(CFG, s2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(heads=5), "exceeds the model's n_heads"),
        (dict(channels=11), "intermediate_size"),
        (dict(heads=1, strategy="activation"), "needs calibration batches"),
        (dict(heads=1, layers=(2,)), "layers"),
        (dict(heads=1), "explicit rng"),
    ],
)
def test_a_selection_that_does_not_fit_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        select_units(_model(), S2FTConfig(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(head_targets=("x",)), "unknown S2FT targets"),
        (dict(strategy="magic"), "unknown S2FT strategy"),
        (dict(variant="medium"), "variant"),
        (dict(heads=-1), "≥ 0"),
    ],
)
def test_a_malformed_configuration_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        S2FTConfig(**kwargs)
