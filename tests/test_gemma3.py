"""Gemma 3 (text): (1 + w) RMSNorms, √C-scaled embeddings, GeGLU, post-attention and post-MLP norms,
q/k norms, the attention scale query_pre_attn_scalar^(−1/2), and sliding and global layers each with
their own RoPE base.

Properties: minift's decoder equals the spec's float64 reference decoder (``minift.spec.reference``,
read through the config.json ``config_to_hf`` writes); a (1 + w) norm is RMSNorm with scale 1 + w and
its gradient matches finite differences; the loss gradient of every parameter matches finite
differences; the KV-cache forward and activation checkpointing equal the plain forward and backward
past the window; LoRA, PiSSA and SORSA on all seven projections start from the base model's logits
(Gemma 3 and Qwen3); S2FT's co-permutation leaves the logits unchanged; config.json in the transformers
4 and 5 spellings reads as the same config, missing keys take transformers' defaults, and what minift
does not compute is refused naming the key; ``minift finetune`` runs on a Gemma 3 folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minift.config import ModelConfig, RopeScaling
from minift.errors import ConfigError
from minift.io.hub import config_from_hf, config_to_hf, model_state, to_hf_tensors
from minift.layers.rmsnorm import rmsnorm_forward
from minift.methods.lora import LoRAConfig, apply_lora
from minift.methods.pissa import PiSSAConfig, apply_pissa
from minift.methods.s2ft import co_permute
from minift.methods.sorsa import SORSAConfig, apply_sorsa
from minift.model import (
    SLOT_NAMES,
    KVCache,
    loss_and_grads,
    model_forward,
    trainable_parameters,
)
from minift.slots import Norm
from minift.spec import reference
from minift.testing import assert_close, check_grad
from tests.test_families import CONFIGS, V, _batch, _model, check_every_gradient, finetune_a_saved_model
from tests.test_s2ft_permute import _random_layouts

GEMMA = ModelConfig(vocab_size=V, hidden_size=8, intermediate_size=6, n_layers=3, n_heads=4, n_kv_heads=2,
                    head_dim=6, arch="gemma3", qk_norm=True, tie_word_embeddings=True, norm_eps=1e-3,
                    query_pre_attn_scalar=3.0, rope_theta=500.0, rope_scaling=RopeScaling("linear", 2.0),
                    rope_local_theta=20.0, sliding_window=2,
                    layer_types=("sliding_attention", "full_attention", "sliding_attention"))


def test_the_forward_equals_the_spec_reference_decoder_on_a_sequence_longer_than_the_window():
    model, (tokens, _, _) = _model(GEMMA), _batch()
    ours, _ = model_forward(model, tokens, train=False)
    hf_config = json.loads(json.dumps(config_to_hf(GEMMA)))
    expected = reference.logits(hf_config, to_hf_tensors(GEMMA, model_state(model)), tokens)
    assert_close(ours, expected, rtol=1e-6, atol=1e-6, what="logits")  # float32 RoPE tables: ~1e-7
    model.config = GEMMA.replace(sliding_window=None, layer_types=())
    assert np.abs(model_forward(model, tokens, train=False)[0] - ours).max() > 1e-6  # the window matters


def test_a_unit_offset_norm_is_rmsnorm_scaled_by_one_plus_w_and_its_gradient_matches(rng):
    w, x = 0.3 * rng.standard_normal(5), rng.standard_normal((4, 5))
    norm = Norm(w, eps=1e-4, requires_grad=True, unit_offset=True)
    np.testing.assert_array_equal(norm.forward(x, keep=False)[0], rmsnorm_forward(x, 1.0 + w, 1e-4)[0])

    def forward(x, w):
        return Norm(w, eps=1e-4, unit_offset=True).forward(x, keep=False)[0]

    def backward(G, x, w):
        held = Norm(w, eps=1e-4, requires_grad=True, unit_offset=True)
        dx, grads = held.backward(G, held.forward(x, keep=True)[1])
        return {"x": dx, "w": grads["weight"]}

    check_grad(forward, backward, {"x": x, "w": w}, rng=rng)


def test_the_loss_gradient_of_every_parameter_matches_finite_differences():
    small = GEMMA.replace(n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4,
                          layer_types=("sliding_attention", "full_attention"))  # fewer entries to perturb
    check_every_gradient(_model(small), _batch(T=5), {
        "blocks.0.post_attn_norm.weight", "blocks.1.post_mlp_norm.weight", "blocks.1.q_norm.weight",
        "embed.weight"})


def test_the_kv_cache_forward_and_activation_checkpointing_equal_the_plain_ones_past_the_window():
    model, (tokens, targets, mask) = _model(GEMMA), _batch()
    full, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    cache = KVCache.empty(len(model.blocks))
    parts = [model_forward(model, tokens[:, :3], attention_mask=mask[:, :3], kv_cache=cache, train=False)[0]]
    for t in range(3, tokens.shape[1]):
        parts.append(model_forward(model, tokens[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache,
                                   train=False)[0])
    real = mask == 1
    assert_close(np.concatenate(parts, axis=1)[real], full[real], rtol=1e-10, atol=1e-12, what="logits")
    kept = loss_and_grads(model, tokens, targets, attention_mask=mask)
    rerun = loss_and_grads(model, tokens, targets, attention_mask=mask, checkpoint=True)
    for k, g in kept[1].items():
        np.testing.assert_allclose(rerun[1][k], g, rtol=1e-12, atol=1e-14, err_msg=k)


# ----------------------------------------------------------------------------------------------------
# the methods


METHODS = {
    "lora": lambda m: apply_lora(m, LoRAConfig(r=2, alpha=4.0, targets=SLOT_NAMES), np.random.default_rng(0)),
    "pissa": lambda m: apply_pissa(m, PiSSAConfig(r=2, alpha=4.0, targets=SLOT_NAMES)),
    "sorsa": lambda m: apply_sorsa(m, SORSAConfig(r=2, targets=SLOT_NAMES)),
}


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
@pytest.mark.parametrize("method", list(METHODS))
def test_low_rank_methods_on_all_seven_projections_start_from_the_base_logits(method, family):
    config = GEMMA if family == "gemma3" else CONFIGS["qwen3-window-on-upper-layers"]
    model, (tokens, targets, mask) = _model(config), _batch()
    before, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    METHODS[method](model)
    after, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    real = mask == 1
    assert_close(after[real], before[real], rtol=1e-9, atol=1e-10, what=f"{method} logits at init")
    params = trainable_parameters(model)
    assert {k.split(".")[2] for k in params} == set(SLOT_NAMES)  # every projection carries an adapter
    assert set(loss_and_grads(model, tokens, targets, attention_mask=mask)[1]) == set(params)


@given(seed=st.integers(0, 2**16))
def test_s2ft_co_permutation_leaves_the_logits_unchanged_with_q_k_norms_and_post_norms(seed):
    model, (tokens, _, mask) = _model(GEMMA, seed=seed % 7), _batch()
    before, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    co_permute(model, _random_layouts(GEMMA, np.random.default_rng(seed)))
    after, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    assert_close(after, before, rtol=1e-10, atol=1e-12, what="logits")


# ----------------------------------------------------------------------------------------------------
# config.json


V5 = {"model_type": "gemma3_text", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 6,
      "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6,
      "query_pre_attn_scalar": 5, "sliding_window": 3, "rms_norm_eps": 1e-6,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
      "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
V4 = {k: v for k, v in V5.items() if k not in ("layer_types", "rope_parameters")} | {
    "sliding_window_pattern": 2, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
    "rope_scaling": {"rope_type": "linear", "factor": 4.0}}


def test_the_transformers_4_and_5_spellings_read_as_the_same_config():
    config = config_from_hf(V5)
    assert config_from_hf(V4) == config
    assert (config.window(0), config.window(1)) == (3, None)
    assert (config.rope(0), config.rope(1)) == ((1e4, RopeScaling()), (1e6, RopeScaling("linear", 4.0)))
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config
    assert config_from_hf(json.loads(json.dumps(config_to_hf(GEMMA)))) == GEMMA


def test_a_multimodal_gemma3_config_reads_as_its_text_config():
    assert config_from_hf({"model_type": "gemma3", "text_config": V5, "tie_word_embeddings": False}) == (
        config_from_hf(V5 | {"tie_word_embeddings": False}))


def test_missing_keys_take_the_defaults_of_transformers_gemma3_text_config():
    kept = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    config = config_from_hf({k: V5[k] for k in kept} | {"num_attention_heads": 8})
    assert (config.n_kv_heads, config.head_dim, config.query_pre_attn_scalar, config.sliding_window) == (
        4, 256, 256, 4096)
    assert config.layer_types == ("sliding_attention",) * 4  # pattern 6: layer 6 would be the first global
    assert (config.rope_theta, config.rope_local_theta, config.norm_eps) == (1e6, 1e4, 1e-6)
    assert (config.tie_word_embeddings, config.bos_token_id, config.eos_token_id) == (True, 2, (1,))


@pytest.mark.parametrize(("changes", "key"), [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}}, "rope_type"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}}, "sliding_attention"),
    ({"rope_parameters": {"rope_type": "default"}}, "rope_parameters"),
    ({"model_type": "gemma3", "text_config": None}, "text_config"),
    ({"sliding_window_pattern": "6", "layer_types": None}, "sliding_window_pattern"),
])
def test_what_minift_does_not_compute_is_refused_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        config_from_hf(V5 | changes)


def test_minift_finetune_runs_on_a_gemma3_folder_and_saves_it_back(tmp_path):
    from tests.toy import task_world_config

    config = task_world_config(16).replace(arch="gemma3", qk_norm=True, sliding_window=3, head_dim=12,
                                           query_pre_attn_scalar=7.0, rope_local_theta=100.0,
                                           layer_types=("sliding_attention", "full_attention"))
    finetune_a_saved_model(config, tmp_path, ["lora", "s2ft"])
