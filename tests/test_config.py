"""ModelConfig: every invalid architecture is refused with a ConfigError that says what is wrong, and
the config survives to_dict → JSON → from_dict unchanged.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given

from minift.config import ModelConfig, RopeScaling
from minift.errors import ConfigError
from tests.strategies import configs

BASE = dict(vocab_size=11, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=4)
GPT2 = BASE | dict(arch="gpt2", qkv_bias=True, o_bias=True, mlp_bias=True)


def _rope(**scaling):
    """A config whose rope_scaling is given as a dict, as it comes from JSON."""
    return BASE | dict(rope_scaling=scaling)


INVALID = {
    "K does not divide H": (BASE | dict(n_kv_heads=3), "n_kv_heads (K=3) must be a positive divisor"),
    "zero kv heads": (BASE | dict(n_kv_heads=0), "n_kv_heads (K=0)"),
    "odd head_dim with RoPE": (BASE | dict(head_dim=3), "head_dim must be even, got 3"),
    "zero head_dim": (BASE | dict(head_dim=0), "head_dim must be a positive integer"),
    "unknown arch": (BASE | dict(arch="bert"), "unsupported architecture 'bert'"),
    "zero vocab": (BASE | dict(vocab_size=0), "vocab_size must be a positive integer"),
    "non-integer width": (BASE | dict(hidden_size=8.0), "hidden_size must be a positive integer"),
    "no layers": (BASE | dict(n_layers=0), "n_layers must be a positive integer"),
    "no positions": (BASE | dict(max_position_embeddings=0), "max_position_embeddings must be a positive"),
    "negative eps": (BASE | dict(norm_eps=-1e-6), "norm_eps must be >= 0"),
    "zero rope theta": (BASE | dict(rope_theta=0.0), "rope_theta must be positive"),
    "unknown rope type": (_rope(kind="yarn"), "unsupported RoPE type 'yarn'"),
    "zero linear factor": (_rope(kind="linear", factor=0.0), "factor must be positive"),
    "llama3 high <= low": (_rope(kind="llama3", low_freq_factor=4.0, high_freq_factor=1.0),
                           "high_freq_factor > low_freq_factor"),
    "llama3 zero low factor": (_rope(kind="llama3", low_freq_factor=0.0), "low_freq_factor > 0"),
    "llama3 zero context": (_rope(kind="llama3", original_max_position_embeddings=0),
                            "original_max_position_embeddings > 0"),
    "unknown rope key": (_rope(kind="linear", fator=2.0), "unknown rope_scaling fields ['fator']"),
    "GPT-2 with GQA": (GPT2 | dict(n_kv_heads=2), "GPT-2 has no grouped-query attention"),
    "GPT-2 with H·D ≠ C": (GPT2 | dict(head_dim=4), "GPT-2 needs n_heads * head_dim == hidden_size"),
    "GPT-2 without biases": (GPT2 | dict(o_bias=False), "GPT-2 has biases on every projection"),
    "bos outside vocab": (BASE | dict(bos_token_id=11), "bos_token_id=11 is outside the vocabulary [0, 11)"),
    "pad below zero": (BASE | dict(pad_token_id=-1), "pad_token_id=-1 is outside the vocabulary"),
    "an eos outside vocab": (BASE | dict(eos_token_id=(2, 11)), "eos_token_id=11 is outside the vocabulary"),
}


@pytest.mark.parametrize(("kwargs", "message"), INVALID.values(), ids=INVALID.keys())
def test_an_invalid_config_raises_a_config_error_that_says_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)
    assert message in str(info.value)


def test_defaults_resolve_to_multi_head_attention_with_head_dim_c_over_h():
    c = ModelConfig(**BASE)
    assert (c.n_kv_heads, c.head_dim, c.n_rep) == (4, 2, 1)


def test_gpt2_has_no_rope_so_an_odd_head_dim_is_allowed():
    c = ModelConfig(**GPT2 | dict(hidden_size=12, head_dim=3))
    assert not c.uses_rope


@given(config=configs())
@example(config=ModelConfig(**BASE, n_kv_heads=2, eos_token_id=(1, 2), bos_token_id=1,
                            rope_scaling=RopeScaling("llama3", 8.0)))
def test_to_dict_then_json_then_from_dict_gives_back_the_same_config(config):
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_rejects_unknown_keys_and_names_them():
    with pytest.raises(ConfigError, match=r"unknown ModelConfig fields \['n_head', 'vocab'\]"):
        ModelConfig.from_dict(ModelConfig(**BASE).to_dict() | {"n_head": 4, "vocab": 3})


def test_from_dict_reports_a_missing_field_as_a_config_error():
    d = ModelConfig(**BASE).to_dict()
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig.from_dict(d)
