"""S2FT's parameter count is the number of entries that train, and a chosen selection is accepted
wherever a drawn one is.

``s2ft_parameter_count(config, s2, selection)`` must equal both the size of the trainable arrays
``apply_s2ft(..., selection=...)`` creates and the number of weight entries one AdamW step changes
(in original coordinates), for every target combination, grouped-query attention included: a
key/value head trains whole as soon as one of its query heads is selected.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minift.config import ModelConfig
from minift.errors import ConfigError
from minift.methods import method_record
from minift.methods.s2ft import S2FTConfig, apply_s2ft, s2ft_parameter_count, select_units, unpermute
from minift.model import init_model, loss_and_grads, trainable_parameters
from minift.optim import AdamW
from tests.strategies import configs

GQA = ModelConfig(
    vocab_size=11, hidden_size=8, intermediate_size=10, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=2
)


@st.composite
def _cases(draw):
    config = draw(configs())
    channel_choices = ["up", "down"] + ([] if config.arch == "gpt2" else ["gate"])
    heads = draw(st.integers(0, config.n_heads))
    channels = draw(st.integers(0, config.intermediate_size))
    s2 = S2FTConfig(
        heads=heads,
        channels=channels,
        head_targets=tuple(sorted(draw(st.sets(st.sampled_from(["q", "k", "v", "o"]))))),
        channel_targets=tuple(sorted(draw(st.sets(st.sampled_from(channel_choices))))),
    )
    layers = draw(st.sets(st.integers(0, config.n_layers - 1), min_size=1))
    selection = {
        i: (
            draw(st.lists(st.integers(0, config.n_heads - 1), unique=True, max_size=heads)),
            draw(st.lists(st.integers(0, config.intermediate_size - 1), unique=True, max_size=channels)),
        )
        for i in sorted(layers)
    }
    return config, s2, selection, draw(st.integers(0, 2**16))


def _dense_weights(model) -> dict[str, np.ndarray]:
    return {f"{i}.{n}": np.array(s.weight) for i, b in enumerate(model.blocks) for n, s in b.slots()}


V_ONLY = S2FTConfig(heads=2, channels=0, head_targets=("v",), channel_targets=())


@settings(max_examples=25, deadline=None)
@given(_cases())
@example((GQA, V_ONLY, {0: ([0, 2], [])}, 0))  # two query heads in two groups: two whole KV heads
def test_the_parameter_count_is_the_number_of_entries_that_train_and_change(case):
    config, s2, selection, seed = case
    base = init_model(config, np.random.default_rng(seed), dtype=np.float64, std=0.5)
    model = apply_s2ft(copy.deepcopy(base), s2, selection=selection)
    params = trainable_parameters(model)
    count = s2ft_parameter_count(config, s2, selection)
    assert sum(p.size for p in params.values()) == count

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (2, 4))
    targets = rng.integers(0, config.vocab_size, (2, 4))
    AdamW(params, weight_decay=0.0).step(loss_and_grads(model, tokens, targets)[1], lr=1e-2)
    before, after = _dense_weights(base), _dense_weights(unpermute(model))
    assert sum(int((after[k] != before[k]).sum()) for k in before) == count


def test_v_under_grouped_query_attention_counts_every_kv_head_its_heads_read():
    s2 = S2FTConfig(heads=2, channels=0, head_targets=("v",), channel_targets=())
    D, C = GQA.head_dim, GQA.hidden_size
    assert s2ft_parameter_count(GQA, s2, {0: ([0, 2], []), 1: ([0, 1], [])}) == (2 + 1) * D * C
    # without a selection: the fewest KV heads two query heads can read (one whole group), per layer
    assert s2ft_parameter_count(GQA, s2) == GQA.n_layers * 1 * D * C


def test_a_chosen_selection_is_what_the_strategy_would_have_drawn():
    s2 = S2FTConfig(heads=2, channels=3, head_targets=("q", "v", "o"), channel_targets=("up", "down"))
    base = init_model(GQA, np.random.default_rng(0), dtype=np.float64)
    drawn = apply_s2ft(copy.deepcopy(base), s2, rng=np.random.default_rng(1))
    chosen = select_units(base, s2, rng=np.random.default_rng(1))
    given_ = apply_s2ft(copy.deepcopy(base), s2, selection=chosen)
    assert method_record(given_).state == method_record(drawn).state
    a, b = trainable_parameters(drawn), trainable_parameters(given_)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "selection",
    [{5: ([0], [])}, {0: ([6], [])}, {0: ([], [10])}, {0: ([1, 1], [])}, {-1: ([0], [])}],
    ids=["layer", "head", "channel", "repeated", "negative-layer"],
)
def test_a_selection_out_of_range_is_a_config_error_that_names_it(selection):
    model = init_model(GQA, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="selection"):
        apply_s2ft(model, S2FTConfig(heads=1, channels=1), selection=selection)
