"""Qwen3's per-head q/k norms and enforced sliding-window attention (Mistral, Qwen2/Qwen3 layers).

Properties: the window mask lets query i see key j iff i − W < j ≤ i (and j is not padding), so no
position sees beyond the window, and it equals the plain causal mask when W covers the sequence; the
decoder with q/k norms and a per-layer window equals a plain float64 reference written here; the loss
gradient of every parameter (q/k norm weights included) matches finite differences; the KV-cache
forward equals the full forward on sequences longer than the window; bad window settings are refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minift.config import ModelConfig
from minift.errors import ConfigError
from minift.layers.attention import causal_mask
from minift.layers.cross_entropy import cross_entropy_forward
from minift.layers.rope import rope_tables
from minift.model import (
    KVCache,
    init_model,
    loss_and_grads,
    model_forward,
    set_trainable,
    trainable_parameters,
)
from minift.testing import assert_close, check_grad

V = 7
_BASE = dict(vocab_size=V, hidden_size=8, intermediate_size=6, n_layers=3, n_heads=4, n_kv_heads=2,
             head_dim=4)
CONFIGS = {
    "qwen3-window-on-upper-layers": ModelConfig(
        **_BASE, arch="qwen3", qk_norm=True, sliding_window=2,
        layer_types=("full_attention", "sliding_attention", "sliding_attention")),
    "mistral-window-everywhere": ModelConfig(**_BASE, arch="mistral", sliding_window=3),
}


def _model(config: ModelConfig, seed: int = 0):
    """A trainable float64 model with O(1) weights and norm weights away from 1."""
    model = set_trainable(init_model(config, np.random.default_rng(seed), dtype=np.float64, std=0.5))
    rng = np.random.default_rng(seed + 1)
    for name, p in trainable_parameters(model).items():
        if "norm" in name:
            p += 0.3 * rng.standard_normal(p.shape)
    return model


def _batch(T: int = 6):
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, V, (2, T)), rng.integers(0, V, (2, T))
    mask = np.ones((2, T), dtype=np.int64)
    mask[1, :2] = 0  # left padding
    targets[1, :2] = -100
    return tokens, targets, mask


# ----------------------------------------------------------------------------------------------------
# the window mask


@given(T=st.integers(1, 8), past=st.integers(0, 4), window=st.integers(1, 10))
def test_query_i_sees_key_j_iff_it_lies_in_the_window_ending_at_i(T, past, window):
    S = past + T
    allowed = causal_mask(T, S, window=window)[0, 0, 0]
    for t in range(T):
        i = past + t  # the query's slot among the S keys
        for j in range(S):
            assert bool(allowed[t, j]) == (i - window < j <= i)
        assert int(allowed[t].sum()) == min(window, i + 1)  # never more than W keys


@given(T=st.integers(1, 8), past=st.integers(0, 4), extra=st.integers(0, 3))
def test_a_window_that_covers_the_sequence_is_the_plain_causal_mask(T, past, extra):
    S = past + T
    key_mask = np.ones((1, S), dtype=np.int64)
    key_mask[0, 0] = 0
    np.testing.assert_array_equal(causal_mask(T, S, key_mask, window=S + extra), causal_mask(T, S, key_mask))


# ----------------------------------------------------------------------------------------------------
# the decoder


def _rmsnorm(x, w, eps):
    return w * x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def _reference_forward(model, tokens, mask):
    """The decoder written plainly from the raw weights, one loop per query, in float64."""
    c = model.config
    B, T = tokens.shape
    H, K, D = c.n_heads, c.n_kv_heads, c.head_dim
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cos, sin = (t.astype(np.float64)[:, 0] for t in rope_tables(positions, D, c.rope_theta, c.rope_scaling))
    x = model.embed.weight[tokens]  # (B, T, C)
    for layer, blk in enumerate(model.blocks):
        h = _rmsnorm(x, blk.attn_norm.weight, c.norm_eps)
        q = (h @ blk.q.weight.T).reshape(B, T, H, D)
        k = (h @ blk.k.weight.T).reshape(B, T, K, D)
        v = (h @ blk.v.weight.T).reshape(B, T, K, D)
        if c.qk_norm:
            q, k = _rmsnorm(q, blk.q_norm.weight, c.norm_eps), _rmsnorm(k, blk.k_norm.weight, c.norm_eps)
        q, k = _rope(q, cos[:, :, None], sin[:, :, None]), _rope(k, cos[:, :, None], sin[:, :, None])
        W = c.window(layer)
        a = np.zeros((B, T, H, D))
        for b in range(B):
            for i in range(T):
                seen = [j for j in range(i + 1) if mask[b, j] and (W is None or j > i - W)]
                if not seen:
                    continue
                for hd in range(H):
                    s = np.array([q[b, i, hd] @ k[b, j, hd // (H // K)] for j in seen]) / np.sqrt(D)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    a[b, i, hd] = sum(pj * v[b, j, hd // (H // K)] for pj, j in zip(p, seen, strict=True))
        x = x + a.reshape(B, T, H * D) @ blk.o.weight.T
        h = _rmsnorm(x, blk.mlp_norm.weight, c.norm_eps)
        g = h @ blk.gate.weight.T
        x = x + (g / (1 + np.exp(-g)) * (h @ blk.up.weight.T)) @ blk.down.weight.T
    x = _rmsnorm(x, model.final_norm.weight, c.norm_eps)
    return x @ model.lm_head.weight.T


@pytest.mark.parametrize("name", CONFIGS)
def test_the_forward_equals_the_plain_reference_on_a_sequence_longer_than_the_window(name):
    model, (tokens, _, mask) = _model(CONFIGS[name]), _batch()
    logits, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    real = mask == 1
    assert_close(logits[real], _reference_forward(model, tokens, mask)[real], rtol=1e-6, atol=1e-6,
                 what="logits")


def test_the_window_changes_the_logits_past_it_and_not_before():
    config = CONFIGS["mistral-window-everywhere"]
    model, (tokens, _, _) = _model(config), _batch()
    windowed, _ = model_forward(model, tokens, train=False)
    model.config = config.replace(sliding_window=None)
    full, _ = model_forward(model, tokens, train=False)
    np.testing.assert_allclose(windowed[:, :3], full[:, :3], rtol=1e-12, atol=1e-12)
    assert np.abs(windowed[:, 3:] - full[:, 3:]).max() > 1e-6


def check_every_gradient(model, batch, expected=frozenset()):
    """Finite differences of the masked loss against ``loss_and_grads`` for every trainable array of a
    float64 model; ``expected`` names parameters that must be among them."""
    tokens, targets, mask = batch

    def loss(**_params):
        logits, _ = model_forward(model, tokens, attention_mask=mask, train=False)
        return cross_entropy_forward(logits.reshape(-1, V), targets.reshape(-1))[0]

    def grads(G, **_params):
        return loss_and_grads(model, tokens, targets, attention_mask=mask, loss_scale=G)[1]

    params = trainable_parameters(model)
    assert expected <= set(params)
    assert set(grads(1.0)) == set(params)
    check_grad(loss, grads, params, rng=np.random.default_rng(0), tol=1e-6, zero_floor=1e-3)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_loss_gradient_of_every_parameter_matches_finite_differences(name):
    norms = {"blocks.0.q_norm.weight", "blocks.2.k_norm.weight"} if CONFIGS[name].qk_norm else set()
    check_every_gradient(_model(CONFIGS[name]), _batch(T=5), norms)


@pytest.mark.parametrize("name", CONFIGS)
def test_activation_checkpointing_reruns_each_block_with_its_own_window(name):
    model, (tokens, targets, mask) = _model(CONFIGS[name]), _batch(T=6)
    kept = loss_and_grads(model, tokens, targets, attention_mask=mask)
    rerun = loss_and_grads(model, tokens, targets, attention_mask=mask, checkpoint=True)
    assert rerun[0] == pytest.approx(kept[0], rel=1e-12)
    for k, g in kept[1].items():
        np.testing.assert_allclose(rerun[1][k], g, rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_kv_cache_forward_equals_the_full_forward_past_the_window(name):
    model, (tokens, _, mask) = _model(CONFIGS[name]), _batch()
    full, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    cache = KVCache.empty(len(model.blocks))
    parts = [model_forward(model, tokens[:, :3], attention_mask=mask[:, :3], kv_cache=cache, train=False)[0]]
    for t in range(3, tokens.shape[1]):  # one token at a time, as generation runs
        parts.append(model_forward(model, tokens[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache,
                                   train=False)[0])
    real = mask == 1
    assert_close(np.concatenate(parts, axis=1)[real], full[real], rtol=1e-10, atol=1e-12, what="logits")


@pytest.mark.parametrize(("changes", "message"), [
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
    (dict(layer_types=("full_attention",)), "layer_types has 1 entries for 3 layers"),
    (dict(sliding_window=None, layer_types=("sliding_attention",) * 3), "sliding_window is null"),
    (dict(layer_types=("full_attention", "chunked_attention", "full_attention")), "unsupported layer_types"),
])
def test_bad_window_settings_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        CONFIGS["qwen3-window-on-upper-layers"].replace(**changes)


# ----------------------------------------------------------------------------------------------------
# the methods on these families


def test_s2ft_co_permutation_leaves_the_logits_unchanged_with_q_k_norms_shared_by_all_heads():
    from minift.methods.s2ft import co_permute
    from tests.test_s2ft_permute import _random_layouts

    config = CONFIGS["qwen3-window-on-upper-layers"]
    model, (tokens, _, mask) = _model(config), _batch()
    before, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    co_permute(model, _random_layouts(config, np.random.default_rng(1)))
    after, _ = model_forward(model, tokens, attention_mask=mask, train=False)
    assert_close(after, before, rtol=1e-10, atol=1e-12, what="logits")


def finetune_a_saved_model(config, tmp_path, methods):
    """Save a tiny random model of ``config`` as a Hugging Face folder, check it loads back as the same
    config, and run ``minift finetune`` on it with each method (``finetune_the_folder``)."""
    from minift.data.tasks import save_tokenizer
    from minift.io.hub import load_pretrained, save_pretrained

    folder = save_pretrained(init_model(config, np.random.default_rng(0), std=0.1), tmp_path / "model",
                             tokenizer_path=save_tokenizer(tmp_path / "tok"))
    assert load_pretrained(folder).config == config
    finetune_the_folder(folder, tmp_path, methods)


def finetune_the_folder(folder, tmp_path, methods):
    """``minift finetune`` on a model folder for two steps with each method: each leaves an adapter."""
    from minift.data.tasks import task_splits
    from minift.tools.cli import main

    data = tmp_path / "train.jsonl"
    records = task_splits("shift", 0, n_train=8, n_eval=2, n_retention=1).train
    data.write_text("".join(json.dumps(ex.record) + "\n" for ex in records))
    for method in methods:
        code = main([str(a) for a in ["finetune", "--model", folder, "--data", data, "--method", method,
                                      "--out", tmp_path / method, "--steps", 2, "--batch-size", 2,
                                      "--rank", 2, "--no-progress"]])
        assert code == 0
        assert (tmp_path / method / "adapter").is_dir()


@pytest.mark.parametrize("method", ["lora", "s2ft"])
def test_minift_finetune_runs_on_a_qwen3_folder_with_windows_and_saves_it_back(method, tmp_path):
    from tests.toy import task_world_config

    base = task_world_config(16)
    config = base.replace(arch="qwen3", qk_norm=True, sliding_window=3,
                          layer_types=("sliding_attention",) * base.n_layers)
    finetune_a_saved_model(config, tmp_path, [method])


@pytest.mark.parametrize("name", CONFIGS)
def test_the_config_json_written_reads_back_as_the_same_config(name):
    from minift.io.hub import config_from_hf, config_to_hf

    config = CONFIGS[name]
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


def test_a_mistral_config_json_cannot_express_windows_on_some_layers_only():
    from minift.io.hub import config_to_hf

    config = CONFIGS["qwen3-window-on-upper-layers"].replace(arch="mistral", qk_norm=False)
    with pytest.raises(ConfigError, match="every layer or none"):
        config_to_hf(config)
