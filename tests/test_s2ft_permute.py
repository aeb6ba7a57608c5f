"""S2FT co-permutation (paper Sec. 3.1–3.3): heads move as whole blocks (Q rows, K/V rows
of their group, O columns) and FFN channels as (Gate rows, Up rows, Down columns).

Properties: the planned permutation is valid for grouped-query attention (every query head keeps its
key/value group), puts exactly the selected heads and channels into the recorded segments, and needs
one segment unless more than two groups are partially selected (then ⌈p/2⌉, the minimum); the
co-permuted model computes the same logits (MHA, GQA, GPT-2, biases, RoPE variants); un-permuting
restores every weight bitwise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minift.config import ModelConfig
from minift.errors import ConfigError
from minift.methods import method_record
from minift.methods.s2ft import co_permute, plan_layout, unpermute
from minift.methods.s2ft.permute import expand
from minift.model import init_model, model_forward, named_modules
from minift.testing import assert_close
from tests.strategies import configs

GQA = ModelConfig(
    vocab_size=9, hidden_size=8, intermediate_size=6, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=2
)


@st.composite
def head_selections(draw):
    """(H, K, selected query heads) with K | H."""
    K = draw(st.integers(1, 4))
    H = K * draw(st.integers(1, 4))
    return H, K, tuple(draw(st.sets(st.integers(0, H - 1))))


def test_the_layout_of_a_simple_mha_selection_puts_the_heads_first_in_index_order():
    lay = plan_layout((3, 1), (4, 0), 4, 4, 5)
    assert lay.head_order == (1, 3, 0, 2)
    assert lay.kv_order == lay.head_order  # MHA: every head is its own group
    assert lay.channel_order == (0, 4, 1, 2, 3)
    assert (lay.head_segments, lay.channel_segments) == (((0, 2),), ((0, 2),))


def test_three_partially_selected_groups_need_two_segments_and_keep_every_head_in_its_group():
    lay = plan_layout((0, 2, 4), (), 6, 3, 1)  # one head of each of the three groups of two
    assert lay.head_order == (1, 0, 2, 3, 5, 4)
    assert lay.head_segments == ((1, 3), (5, 6))
    assert lay.kv_segments == ((0, 3),)


@given(head_selections())
@example((8, 4, (0, 2, 5, 7)))  # four half-selected groups pair up into two segments
@example((4, 2, ()))
def test_any_head_selection_gets_a_valid_gqa_permutation_with_the_fewest_segments(case):
    H, K, heads = case
    G = H // K
    lay = plan_layout(heads, (), H, K, 3)
    assert sorted(lay.head_order) == list(range(H))
    assert sorted(lay.kv_order) == list(range(K))
    for i, h in enumerate(lay.head_order):  # new head i reads new kv head i // G: the same group
        assert h // G == lay.kv_order[i // G]
    covered = [lay.head_order[p] for a, b in lay.head_segments for p in range(a, b)]
    assert sorted(covered) == sorted(set(heads))
    partial = sum(0 < len({h for h in heads if h // G == g}) < G for g in range(K))
    assert len(lay.head_segments) == (0 if not heads else max(1, math.ceil(partial / 2)))
    touched = sorted({h // G for h in heads})
    assert sorted(lay.kv_order[p] for a, b in lay.kv_segments for p in range(a, b)) == touched
    assert len(lay.kv_segments) <= 1


def _random_layouts(config: ModelConfig, rng: np.random.Generator) -> dict:
    H, F = config.n_heads, config.intermediate_size
    return {
        i: plan_layout(
            tuple(rng.choice(H, rng.integers(0, H + 1), replace=False).tolist()),
            tuple(rng.choice(F, rng.integers(0, F + 1), replace=False).tolist()),
            H,
            config.n_kv_heads,
            F,
        )
        for i in range(config.n_layers)
    }


def _weights(model) -> dict[str, np.ndarray]:
    return {
        f"{path}.{f}": np.array(getattr(h, f))
        for path, h in named_modules(model)
        for f in ("weight", "bias")
        if getattr(h, f, None) is not None
    }


@settings(max_examples=25)
@given(configs(), st.integers(0, 2**16))
@example(GQA, 0)
def test_co_permuting_heads_and_channels_leaves_the_logits_unchanged(config, seed):
    rng = np.random.default_rng(seed)
    model = init_model(config, rng, dtype=np.float64, std=0.5)
    tokens = rng.integers(0, config.vocab_size, size=(2, 4))
    before, _ = model_forward(model, tokens, train=False)
    co_permute(model, _random_layouts(config, rng))
    after, _ = model_forward(model, tokens, train=False)
    # Permuting reorders the sums over heads and channels, so agreement is to rounding, not bitwise.
    assert_close(after, before, rtol=1e-10, atol=1e-12, what="logits")


@settings(max_examples=25)
@given(configs(), st.integers(0, 2**16))
def test_unpermute_after_co_permute_restores_every_weight_bitwise(config, seed):
    rng = np.random.default_rng(seed)
    model = init_model(config, rng, dtype=np.float64, std=0.5)
    original = _weights(model)
    unpermute(co_permute(model, _random_layouts(config, rng)))
    restored = _weights(model)
    assert restored.keys() == original.keys()
    assert method_record(model) is None
    for k in original:
        np.testing.assert_array_equal(restored[k], original[k], err_msg=k)


def test_the_permutation_is_recorded_and_moves_whole_heads():
    model = init_model(GQA, np.random.default_rng(0), dtype=np.float64)
    o_before = np.array(model.blocks[0].o.weight)
    lay = plan_layout((0, 2, 4), (5,), 6, 3, 6)
    co_permute(model, {0: lay})
    assert method_record(model).state["layers"]["0"]["head_order"] == list(lay.head_order)
    cols = expand(lay.head_order, GQA.head_dim)  # O column j of the permuted model is original cols[j]
    np.testing.assert_array_equal(model.blocks[0].o.weight, o_before[:, cols])


def test_a_layout_that_moves_a_head_out_of_its_group_is_a_config_error():
    model = init_model(GQA, np.random.default_rng(0))
    lay = plan_layout((1,), (), 6, 3, 6)
    swapped = dataclasses.replace(
        lay, head_order=(lay.head_order[2], *lay.head_order[1:2], lay.head_order[0], *lay.head_order[3:])
    )
    with pytest.raises(ConfigError, match="keeping each head in its group"):
        co_permute(model, {0: swapped})
    assert method_record(model) is None


def test_permuting_twice_or_unpermuting_an_unpermuted_model_is_a_config_error():
    model = init_model(GQA, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="not co-permuted"):
        unpermute(model)
    co_permute(model, {0: plan_layout((1,), (), 6, 3, 6)})
    with pytest.raises(ConfigError, match="already co-permuted"):
        co_permute(model, {0: plan_layout((1,), (), 6, 3, 6)})


def test_the_merged_model_of_an_s2ft_model_is_a_copy_that_leaves_the_model_co_permuted():
    from minift.methods.s2ft import S2FTConfig, apply_s2ft
    from minift.tools.finetune import merged_model

    rng = np.random.default_rng(0)
    model = apply_s2ft(init_model(GQA, rng), S2FTConfig(heads=2, channels=4), rng=rng)
    for _, slot in model.blocks[0].slots():  # stand-in for training: move every weight
        slot.weight += 0.01
    before = {name: m.weight.copy() for name, m in named_modules(model) if hasattr(m, "weight")}
    tokens = rng.integers(0, GQA.vocab_size, (2, 5))
    merged = merged_model(model)
    assert method_record(model).name == "s2ft"  # still co-permuted, still trainable
    for name, m in named_modules(model):
        if hasattr(m, "weight"):
            np.testing.assert_array_equal(m.weight, before[name], err_msg=name)
    assert method_record(merged) is None
    assert_close(model_forward(merged, tokens)[0], model_forward(model, tokens)[0], rtol=1e-5, atol=1e-6)
    assert_close(
        model_forward(merged, tokens)[0], model_forward(unpermute(model), tokens)[0], rtol=0, atol=0
    )
