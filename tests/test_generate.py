"""Generation (minift.generate): the KV cache, left-padded batches, sampling filters, stopping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from minift.errors import ConfigError, ShapeError
from minift.generate import SamplingConfig, generate, left_pad, sample_next, top_k_filter, top_p_filter
from minift.model import KVCache, model_forward
from minift.testing import assert_close
from tests.toy import tiny_model

V = 11
GPT2 = {"arch": "gpt2", "n_kv_heads": 4, "qkv_bias": True, "o_bias": True, "mlp_bias": True,
        "max_position_embeddings": 16}


def _model(arch: str = "llama", seed: int = 0):
    return tiny_model(V, seed=seed, dtype=np.float64, std=0.3, **(GPT2 if arch == "gpt2" else {}))


def naive_greedy(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence every step (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model_forward(model, np.array([seq]), train=False)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


# ----------------------------------------------------------------------------------------------------
# definition


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_equals_argmax_decoding_by_full_recomputation(arch):
    model = _model(arch)
    prompt = [1, 5, 7, 3]
    assert generate(model, [prompt], max_new_tokens=6, eos_ids=()) == [naive_greedy(model, prompt, 6)]


# ----------------------------------------------------------------------------------------------------
# the KV cache


@settings(max_examples=10)
@given(
    arch=st.sampled_from(["llama", "gpt2"]),
    lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    new=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@example(arch="llama", lengths=[3, 1], new=3, seed=0)
def test_logits_with_the_kv_cache_equal_full_recomputation_with_left_padding(arch, lengths, new, seed):
    model = _model(arch)
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(0, V, size=n)) for n in lengths]
    tokens, mask = left_pad(prompts, pad_id=0)
    steps = rng.integers(0, V, size=(len(prompts), new))
    cache = KVCache.empty(model.config.n_layers)
    model_forward(model, tokens, attention_mask=mask, kv_cache=cache, train=False)
    for i in range(new):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        tokens = np.concatenate([tokens, steps[:, i : i + 1]], axis=1)
        new_token = steps[:, i : i + 1]
        cached, _ = model_forward(model, new_token, attention_mask=mask, kv_cache=cache, train=False)
        full, _ = model_forward(model, tokens, attention_mask=mask, train=False)
        assert_close(cached[:, -1], full[:, -1], rtol=1e-10, atol=1e-12, what=f"logits at new token {i}")
    assert cache.length == tokens.shape[1]


@settings(max_examples=10)
@given(lengths=st.lists(st.integers(1, 6), min_size=2, max_size=4), seed=st.integers(0, 2**16))
@example(lengths=[1, 6], seed=0)
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(lengths, seed):
    model = _model("llama", seed=1)
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, V, size=n)] for n in lengths]
    batched = generate(model, prompts, max_new_tokens=5, eos_ids=(2,))
    alone = [generate(model, [p], max_new_tokens=5, eos_ids=(2,))[0] for p in prompts]
    assert batched == alone


# ----------------------------------------------------------------------------------------------------
# stopping and sampling


def test_generation_stops_at_any_eos_id_and_after_max_new_tokens():
    model = _model()
    free = generate(model, [[1, 4, 4]], max_new_tokens=6, eos_ids=())[0]
    assert len(free) == 6
    assert generate(model, [[1, 4, 4]], max_new_tokens=6, eos_ids=(99, free[0]))[0] == free[:1]
    first_stop = free.index(free[2]) + 1
    assert generate(model, [[1, 4, 4]], max_new_tokens=6, eos_ids=(free[2],))[0] == free[:first_stop]


def test_a_fixed_seed_gives_the_same_sampled_tokens_and_another_seed_other_tokens():
    model = _model()
    sampling = SamplingConfig(temperature=1.5, top_k=8, top_p=0.95)

    def run(seed):
        return generate(model, [[1, 4], [5]], max_new_tokens=8, sampling=sampling, eos_ids=(),
                        rng=np.random.default_rng(seed))

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampling_draws_tokens_with_their_softmax_probabilities():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    rows = np.repeat(logits, 20000, axis=0)
    draws = sample_next(rows, SamplingConfig(temperature=1.0), np.random.default_rng(0))
    freq = np.bincount(draws, minlength=4) / draws.size
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert_close(freq, p, atol=0.01, rtol=0, what="frequencies")


@given(
    logits=st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=8, unique=True),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
@example(logits=[0.0, 1.0, 2.0], k=1, seed=0)
def test_top_k_keeps_the_k_largest_and_sampling_never_picks_a_dropped_token(logits, k, seed):
    row = np.array([logits])
    kept = np.isfinite(top_k_filter(row, k))[0]
    assert kept.sum() == min(k, len(logits))
    assert row[0][kept].min() >= row[0][~kept].max(initial=-np.inf)
    picks = sample_next(np.repeat(row, 50, axis=0), SamplingConfig(1.0, top_k=k), np.random.default_rng(seed))
    assert kept[picks].all()
    if k == 1:
        assert (picks == row[0].argmax()).all()  # top-1 sampling is greedy


@given(
    logits=st.lists(st.floats(-4, 4, allow_nan=False), min_size=2, max_size=8, unique=True),
    p=st.floats(0.05, 0.999),
)
@example(logits=[3.0, 2.0, 0.0, -1.0], p=0.8)
def test_top_p_keeps_the_most_likely_tokens_until_their_mass_reaches_p(logits, p):
    row = np.array([logits])
    probs = np.exp(row[0] - row[0].max())
    probs /= probs.sum()
    assume(np.diff(np.sort(probs)).min() > 1e-12)  # distinct logits can tie in probability (1e-309 vs 0)
    order = np.argsort(-probs)
    before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])  # mass of the more likely tokens
    assume(np.abs(before - p).min() > 1e-9)  # away from the boundary, where rounding decides
    expected = np.zeros(len(logits), dtype=bool)
    expected[order] = before < p  # keep a token while the tokens above it hold less than p
    assert np.array_equal(np.isfinite(top_p_filter(row, p))[0], expected)


# ----------------------------------------------------------------------------------------------------
# errors


def test_bad_requests_are_project_errors_saying_what_is_wrong():
    model = _model()
    with pytest.raises(ConfigError, match=r"needs an explicit numpy\.random\.Generator"):
        generate(model, [[1]], max_new_tokens=2, sampling=SamplingConfig(temperature=1.0))
    with pytest.raises(ShapeError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ConfigError, match="0 < top_p <= 1"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="16 learned positions"):
        generate(_model("gpt2"), [[1] * 10], max_new_tokens=7)
