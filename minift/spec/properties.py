"""The methods' definitions and invariants as Hypothesis properties over any ``Implementation``.

Each property is a function ``prop(impl)``; Hypothesis draws the rest, and a failing property
raises with the shrunk counterexample ("Falsifying example: …") in its message. The decoder is
compared with its definition (``minift.spec.reference``), each merge with its formula, and the
reference formulas (SVD, Frobenius norms) are written here in plain NumPy, so the spec states the
mathematics, not minift's code. Every call gets fresh copies of its inputs (``Guarded``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from minift.spec import reference
from minift.spec.cases import (
    LLAMA3,
    gemma3_config,
    gpt2_config,
    llama_config,
    random_selection,
    random_tokens,
    random_weights,
)
from minift.spec.interface import Guarded, Implementation

seeds = st.integers(0, 2**16)

rope_scalings = st.sampled_from([None, {"rope_type": "linear", "factor": 3.0}, LLAMA3])


@st.composite
def llama_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Tiny Llama/Mistral/Qwen2/Qwen3 configs: MHA and GQA (1, 2 or 4 heads per group), head_dim equal
    to or different from C / H, and the constants an implementation might hard-code drawn far from
    their usual values (rms_norm_eps up to 0.3, rope_theta from 50), with or without RoPE scaling,
    biases, a tied head and (Mistral, Qwen) a sliding window shorter than the 6 tokens, on some
    layers."""
    H = draw(st.sampled_from([2, 4]))
    K = draw(st.sampled_from([k for k in (1, 2, 4) if H % k == 0]))
    model_type = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
    window = None if model_type == "llama" else draw(st.sampled_from([None, 2, 3]))
    return llama_config(
        C=draw(st.sampled_from([8, 12])), H=H, K=K, D=draw(st.sampled_from([4, 6])),
        F=draw(st.sampled_from([6, 10])), L=2, V=13, model_type=model_type,
        eps=draw(st.sampled_from([1e-6, 1e-2, 0.3])), theta=draw(st.sampled_from([50.0, 10000.0, 1e6])),
        rope_scaling=draw(rope_scalings), bias=draw(st.booleans()), tie=draw(st.booleans()),
        window=window, sliding=draw(st.tuples(st.booleans(), st.booleans())),
    )


@st.composite
def gemma3_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Tiny Gemma 3 configs: sliding and global layers in either order, each kind with its own RoPE base
    (the global one possibly scaled), a window of 2 or 3 under 6 tokens, query_pre_attn_scalar ≠ D,
    head_dim ≠ C / H, MHA and GQA, biases and tying drawn."""
    H = draw(st.sampled_from([2, 4]))
    return gemma3_config(
        C=draw(st.sampled_from([8, 12])), H=H, K=draw(st.sampled_from([k for k in (1, 2) if H % k == 0])),
        D=draw(st.sampled_from([4, 6])), F=draw(st.sampled_from([6, 10])), V=13,
        eps=draw(st.sampled_from([1e-6, 0.3])), theta=draw(st.sampled_from([50.0, 1e6])),
        local_theta=draw(st.sampled_from([20.0, 10000.0])), scalar=draw(st.sampled_from([3.0, 10.0])),
        window=draw(st.sampled_from([2, 3])), sliding=draw(st.sampled_from([(True, False), (False, True)])),
        rope_scaling=draw(st.sampled_from([None, {"rope_type": "linear", "factor": 3.0}])),
        bias=draw(st.booleans()), tie=draw(st.booleans()),
    )


transformer_configs = st.one_of(llama_configs(), gemma3_configs())
"""Every rotary family: what S2FT's properties are drawn from (q/k norms and Gemma's post-norms too)."""

decoder_configs = st.one_of(
    transformer_configs, st.builds(lambda eps: gpt2_config(eps=eps), st.sampled_from([1e-5, 0.1]))
)

MHA = llama_config(C=8, H=2, K=2, D=6, F=6, L=2, V=13, eps=1e-2, theta=50.0,
                  rope_scaling={"rope_type": "linear", "factor": 3.0})
GQA = llama_config(C=8, H=4, K=2, D=6, F=6, L=2, V=13, eps=1e-2, theta=50.0, bias=True)
GQA4 = llama_config(C=8, H=4, K=1, D=4, F=6, L=2, V=13, model_type="qwen2", eps=0.3, theta=50.0,
                    rope_scaling=LLAMA3, tie=True)
GPT2 = gpt2_config(eps=0.1)
QWEN3 = llama_config(C=8, H=4, K=2, D=6, F=6, L=2, V=13, model_type="qwen3", eps=1e-2, theta=50.0,
                     bias=True, window=2, sliding=(False, True))
GEMMA3 = gemma3_config(C=8, H=4, K=2, D=6, F=6, V=13, eps=1e-2, theta=50.0, local_theta=20.0, scalar=3.0,
                       rope_scaling={"rope_type": "linear", "factor": 3.0}, tie=True)


def _matrix(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _close(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float, atol: float) -> None:
    """Elementwise: |actual − expected| ≤ atol + rtol·|expected|."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    err = float(np.max(np.abs(actual - expected) - rtol * np.abs(expected), initial=0.0))
    assert err <= atol, f"{what}: differs by {err:.3e} beyond rtol={rtol:g}, atol={atol:g}"


def _normwise(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float) -> None:
    """Normwise: ‖actual − expected‖_F ≤ rtol · ‖expected‖_F."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    err, scale = float(np.linalg.norm(actual - expected)), float(np.linalg.norm(expected))
    assert err <= rtol * scale, (
        f"{what}: ‖difference‖ = {err:.3e}, more than {rtol:g} · ‖expected‖ = {scale:.3e}"
    )


REFERENCE_RTOL = 1e-6
"""Normwise tolerance of logits and loss against the float64 reference (float32 RoPE tables: ~1e-8)."""


def computes(impl: Implementation, config: dict[str, Any]) -> None:
    """Skip a config the implementation says it does not compute (its optional ``supports(config)``):
    a port of one family is checked on that family, not failed on the others."""
    supports = getattr(impl, "supports", None)
    assume(supports is None or supports(config))


for_some_families = settings(suppress_health_check=[HealthCheck.filter_too_much])
"""The decoder and S2FT properties: a port of one family rejects most drawn configs, by design."""


# --- the decoder ------------------------------------------------------------------------------------


@for_some_families
@given(config=decoder_configs, seed=seeds)
@example(config=MHA, seed=0)
@example(config=GQA, seed=0)
@example(config=GQA4, seed=0)
@example(config=GPT2, seed=0)
@example(config=QWEN3, seed=0)
@example(config=GEMMA3, seed=0)
def decoder_logits_and_loss_equal_the_reference(
    impl: Implementation, config: dict[str, Any], seed: int
) -> None:
    """Logits and the mean cross-entropy (−100 targets ignored) are those of ``minift.spec.reference``,
    normwise within 1e-6, over families, GQA ratios, head_dim ≠ C/H, rms_norm_eps, rope_theta, RoPE
    scaling, biases, tying, q/k norms, sliding windows shorter than the sequence, and Gemma 3's
    (1 + w) norms, post-norms, √C embedding, GeGLU, attention scale and per-layer-type RoPE."""
    computes(impl, config)
    weights = random_weights(config, seed)
    tokens, targets = random_tokens(config, seed)
    _normwise(impl.decoder_logits(config, weights, tokens), reference.logits(config, weights, tokens),
              "logits vs the reference decoder", REFERENCE_RTOL)
    value, _ = impl.decoder_loss_and_grads(config, weights, tokens, targets)
    expected = reference.loss(config, weights, tokens, targets)
    assert abs(value - expected) <= REFERENCE_RTOL * max(1.0, abs(expected)), (
        f"loss {value!r}, the reference's mean over non-ignored targets {expected!r}"
    )


@for_some_families
@given(config=decoder_configs, seed=seeds, t=st.integers(0, 4))
@example(config=GQA, seed=0, t=2)
def decoder_is_causal(impl: Implementation, config: dict[str, Any], seed: int, t: int) -> None:
    """Logits at positions ≤ t do not depend on tokens after t."""
    computes(impl, config)
    weights = random_weights(config, seed)
    tokens, _ = random_tokens(config, seed)
    changed = tokens.copy()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % config["vocab_size"]
    a = impl.decoder_logits(config, weights, tokens)[:, : t + 1]
    b = impl.decoder_logits(config, weights, changed)[:, : t + 1]
    _close(b, a, "logits up to t after changing later tokens", rtol=1e-10, atol=1e-10)


def richardson_derivative(f: Callable[[float], float], h: float) -> float:
    """f'(0) from central differences at h and h/2, Richardson-extrapolated: (4 D(h/2) − D(h)) / 3
    cancels the h² term, leaving O(h⁴) truncation and O(ε_mach/h) rounding error."""
    def central(step: float) -> float:
        return (f(step) - f(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


GRAD_RTOL = 1e-6
"""Directional derivatives agree within 1e-6 · ‖∇L‖ (the gradient's norm, not the derivative's)."""


@for_some_families
@given(config=decoder_configs, seed=seeds)
@example(config=GQA, seed=0)
@example(config=GPT2, seed=0)
@example(config=GEMMA3, seed=0)
def decoder_gradient_matches_finite_differences(
    impl: Implementation, config: dict[str, Any], seed: int
) -> None:
    """⟨∇L, v⟩ equals the Richardson-extrapolated central difference of L along a random unit direction
    v over every weight, within 1e-6 · ‖∇L‖ (robust: the error scales with the gradient, not with a
    derivative that may happen to be tiny)."""
    computes(impl, config)
    weights = random_weights(config, seed)
    tokens, targets = random_tokens(config, seed)
    _, grads = impl.decoder_loss_and_grads(config, weights, tokens, targets)
    assert set(grads) == set(weights), f"gradient keys differ from weight keys: {set(grads) ^ set(weights)}"
    rng = np.random.default_rng(seed + 1)
    v = {k: rng.standard_normal(w.shape) for k, w in weights.items()}
    norm = np.sqrt(sum(float((d * d).sum()) for d in v.values()))
    v = {k: d / norm for k, d in v.items()}

    def along(step: float) -> float:
        moved = {k: w + step * v[k] for k, w in weights.items()}
        return impl.decoder_loss_and_grads(config, moved, tokens, targets)[0]

    numeric = richardson_derivative(along, 1e-3)
    analytic = sum(float((grads[k] * v[k]).sum()) for k in weights)
    scale = np.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    assert abs(analytic - numeric) <= GRAD_RTOL * scale + 1e-10, (
        f"directional derivative: analytic {analytic:.10g}, finite differences {numeric:.10g}, "
        f"‖∇L‖ = {scale:.4g}"
    )


# --- S2FT -------------------------------------------------------------------------------------------


@for_some_families
@given(config=transformer_configs, seed=seeds, n_heads=st.integers(1, 2), n_channels=st.integers(1, 3))
@example(config=GQA, seed=0, n_heads=1, n_channels=2)
@example(config=GQA, seed=3, n_heads=2, n_channels=2)
@example(config=QWEN3, seed=0, n_heads=2, n_channels=2)
@example(config=GEMMA3, seed=0, n_heads=2, n_channels=2)
def copermuting_heads_and_channels_leaves_the_logits_unchanged(
    impl: Implementation, config: dict[str, Any], seed: int, n_heads: int, n_channels: int
) -> None:
    """S2FT's co-permutation is a change of coordinates: the model computes the same function (q/k norms
    are shared by all heads and Gemma's post-norms act on the model width, so neither moves)."""
    computes(impl, config)
    weights = random_weights(config, seed)
    tokens, _ = random_tokens(config, seed)
    heads, channels = random_selection(config, seed, n_heads, n_channels)
    permuted, _ = impl.copermute(config, weights, heads, channels)
    _close(
        impl.decoder_logits(config, permuted, tokens),
        impl.decoder_logits(config, weights, tokens),
        "logits of the co-permuted model",
        rtol=1e-10,
        atol=1e-10,
    )


@for_some_families
@given(config=transformer_configs, seed=seeds, n_heads=st.integers(1, 2), n_channels=st.integers(1, 3))
@example(config=GQA, seed=0, n_heads=1, n_channels=2)
def unpermute_inverts_copermute_exactly(
    impl: Implementation, config: dict[str, Any], seed: int, n_heads: int, n_channels: int
) -> None:
    """unpermute ∘ copermute is the identity, bit for bit (a permutation moves numbers, never rounds)."""
    computes(impl, config)
    weights = random_weights(config, seed)
    heads, channels = random_selection(config, seed, n_heads, n_channels)
    permuted, state = impl.copermute(config, weights, heads, channels)
    restored = impl.unpermute(config, permuted, state)
    for key, w in weights.items():
        assert np.array_equal(restored[key], w), f"{key} is not restored exactly"


def _origin(blocks: np.ndarray, original: np.ndarray, width: int, what: str) -> list[int]:
    """Which original unit (a block of ``width`` rows) each block of the permuted matrix holds."""
    where = {original[u * width : (u + 1) * width].tobytes(): u for u in range(len(original) // width)}
    out = []
    for j in range(len(blocks) // width):
        block = blocks[j * width : (j + 1) * width].tobytes()
        assert block in where, f"{what}: permuted block {j} is not any original block (rows must move whole)"
        out.append(where[block])
    return out


def _runs(flags: list[bool]) -> int:
    return sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))


@given(config=llama_configs(), seed=seeds, selected=st.lists(st.integers(0, 3), min_size=1, max_size=4,
       unique=True), n_channels=st.integers(1, 5))
@example(config=GQA, seed=0, selected=[1, 2], n_channels=2)  # splits both kv groups
@example(config=GQA, seed=0, selected=[3, 2], n_channels=1)  # one whole group
@example(config=llama_config(C=8, H=4, K=4, D=6, F=6, V=13), seed=0, selected=[3, 0], n_channels=2)
def copermute_lays_the_selection_out_in_the_documented_minimal_segments(
    impl: Implementation, config: dict[str, Any], seed: int, selected: list[int], n_channels: int
) -> None:
    """Under MHA and GQA: heads move whole and only within their key/value group (Q, K, V rows, O
    columns and biases together), the touched kv groups come first, the selected query heads form the
    minimal ⌈p/2⌉ segments for p partially selected groups, whole-group selections occupy exactly the
    leading heads, and the selected channels lead Gate/Up rows and Down columns (``interface``)."""
    H, K, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    G = H // K
    selected = list(dict.fromkeys(h % H for h in selected))  # distinct heads, in drawn order
    weights = random_weights(config, seed)
    _, channels = random_selection(config, seed, 1, n_channels)
    heads = {i: list(selected) for i in range(config["num_hidden_layers"])}
    permuted, _ = impl.copermute(config, weights, heads, channels)
    count = [sum(h // G == g for h in selected) for g in range(K)]
    partial = sum(0 < c < G for c in count)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w = {k[len(p) + 1 :]: v for k, v in weights.items() if k.startswith(p + ".")}
        w_p = {k[len(p) + 1 :]: v for k, v in permuted.items() if k.startswith(p + ".")}
        q = _origin(w_p["self_attn.q_proj.weight"], w["self_attn.q_proj.weight"], D, f"layer {i} Q")
        kv = _origin(w_p["self_attn.k_proj.weight"], w["self_attn.k_proj.weight"], D, f"layer {i} K")
        assert sorted(q) == list(range(H)), f"layer {i}: Q blocks {q} are not a permutation of the heads"
        assert sorted(kv) == list(range(K)), f"layer {i}: K blocks {kv} are not a permutation of the groups"
        assert all(q[j] // G == kv[j // G] for j in range(H)), (
            f"layer {i}: query heads {q} no longer read their own kv heads {kv} (G = {G})"
        )
        assert _origin(w_p["self_attn.v_proj.weight"], w["self_attn.v_proj.weight"], D, "V") == kv, (
            f"layer {i}: V rows do not follow K rows"
        )
        o_cols = _origin(w_p["self_attn.o_proj.weight"].T, w["self_attn.o_proj.weight"].T, D, "O")
        assert o_cols == q, f"layer {i}: O's input columns {o_cols} do not follow Q's rows {q}"
        for name, order in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            if f"self_attn.{name}.bias" in w:
                moved = w["self_attn." + name + ".bias"].reshape(-1, D)[order].ravel()
                assert np.array_equal(w_p[f"self_attn.{name}.bias"], moved), f"layer {i}: {name} bias"
        touched = [count[g] > 0 for g in kv]
        assert touched == sorted(touched, reverse=True), f"layer {i}: kv groups {kv}: touched ones not first"
        flags = [h in selected for h in q]
        assert _runs(flags) == max(1, -(-partial // 2)), (
            f"layer {i}: selected heads {selected} laid out as {q} in {_runs(flags)} segments; "
            f"{partial} partial groups need only {max(1, -(-partial // 2))}"
        )
        if partial == 0:
            assert sorted(q[: len(selected)]) == sorted(selected), f"layer {i}: whole groups not leading: {q}"
        n = len(channels[i])
        down, down_p = w["mlp.down_proj.weight"], w_p["mlp.down_proj.weight"]
        front = {tuple(col) for col in down_p[:, :n].T}
        assert front == {tuple(down[:, c]) for c in channels[i]}, f"layer {i}: Down's leading columns"
        for name in ("gate_proj", "up_proj"):
            m, m_p = w[f"mlp.{name}.weight"], w_p[f"mlp.{name}.weight"]
            assert {tuple(r) for r in m_p[:n]} == {tuple(m[c]) for c in channels[i]}, f"layer {i}: {name}"


@for_some_families
@given(config=transformer_configs, seed=seeds, n_heads=st.integers(1, 2), n_channels=st.integers(1, 3))
@example(config=GQA, seed=0, n_heads=1, n_channels=2)
@example(config=GEMMA3, seed=0, n_heads=1, n_channels=2)
def s2ft_block_gradients_equal_the_full_gradient_restricted_to_the_block(
    impl: Implementation, config: dict[str, Any], seed: int, n_heads: int, n_channels: int
) -> None:
    """Partial backpropagation computes exactly the trained block's slice of the full gradient."""
    computes(impl, config)
    weights = random_weights(config, seed)
    tokens, targets = random_tokens(config, seed)
    heads, channels = random_selection(config, seed, n_heads, n_channels)
    _, full = impl.decoder_loss_and_grads(config, weights, tokens, targets)
    blocks = impl.s2ft_block_grads(config, weights, tokens, targets, heads, channels)
    D = config["head_dim"]
    for i in range(config["num_hidden_layers"]):
        o_key = f"model.layers.{i}.self_attn.o_proj.weight"
        cols = [c for h in heads[i] for c in range(h * D, (h + 1) * D)]
        # atol relative to the gradient's scale: another summation order may round near-zero entries
        atol = 1e-10 * float(np.abs(full[o_key]).max())
        _close(blocks[o_key], full[o_key][:, cols], f"{o_key} block", rtol=1e-10, atol=atol)
        d_key = f"model.layers.{i}.mlp.down_proj.weight"
        atol = 1e-10 * float(np.abs(full[d_key]).max())
        _close(blocks[d_key], full[d_key][:, channels[i]], f"{d_key} block", rtol=1e-10, atol=atol)


# --- LoRA and PiSSA ---------------------------------------------------------------------------------

lora_shapes = st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 7), st.integers(1, 4))


@given(shape=lora_shapes, seed=seeds, scaling=st.floats(0.1, 4.0))
@example(shape=(3, 5, 4, 2), seed=0, scaling=2.0)
def lora_merged_forward_equals_adapted_forward(
    impl: Implementation, shape: tuple[int, int, int, int], seed: int, scaling: float
) -> None:
    """x (W + s·BA)ᵀ = x Wᵀ + s·(x Aᵀ) Bᵀ: merging removes the adapter's latency, not its effect."""
    N, O, I, R = shape
    x, W, A, B = (
        _matrix(seed, (N, I)),
        _matrix(seed + 1, (O, I)),
        _matrix(seed + 2, (R, I)),
        _matrix(seed + 3, (O, R)),
    )
    merged = impl.lora_merge(W, A, B, scaling)
    _close(
        x @ merged.T,
        impl.lora_forward(x, W, A, B, scaling),
        "merged vs adapted output",
        rtol=1e-12,
        atol=1e-12,
    )
    _close(merged, W + scaling * B @ A, "merged weight W + s·BA", rtol=1e-12, atol=1e-12)


@given(shape=lora_shapes, seed=seeds, scaling=st.floats(0.1, 4.0))
@example(shape=(3, 5, 4, 2), seed=0, scaling=2.0)
def lora_unmerge_inverts_merge(
    impl: Implementation, shape: tuple[int, int, int, int], seed: int, scaling: float
) -> None:
    """unmerge(W) = W − s·BA, so unmerge(merge(W)) = W up to float64 rounding."""
    _, O, I, R = shape
    W, A, B = _matrix(seed + 1, (O, I)), _matrix(seed + 2, (R, I)), _matrix(seed + 3, (O, R))
    _close(impl.lora_unmerge(W, A, B, scaling), W - scaling * B @ A, "unmerged weight W − s·BA",
           rtol=1e-12, atol=1e-12)
    restored = impl.lora_unmerge(impl.lora_merge(W, A, B, scaling), A, B, scaling)
    _close(restored, W, "unmerge(merge(W))", rtol=1e-12, atol=1e-12)


svd_shapes = st.tuples(st.integers(2, 8), st.integers(2, 8)).flatmap(
    lambda oi: st.tuples(st.just(oi[0]), st.just(oi[1]), st.integers(1, min(oi) - 1))
)


@given(shape=svd_shapes, seed=seeds, alpha=st.sampled_from([1.0, 4.0, 16.0]))
@example(shape=(6, 5, 2), seed=0, alpha=4.0)
def pissa_init_keeps_the_weight_and_adapts_its_principal_part(
    impl: Implementation, shape: tuple[int, int, int], seed: int, alpha: float
) -> None:
    """W_res + s·BA = W, and s·BA is the best rank-r approximation U_r Σ_r V_rᵀ (PiSSA §3)."""
    O, I, r = shape
    W = _matrix(seed, (O, I))
    s = alpha / r
    W_res, A, B = impl.pissa_init(W, r, alpha)
    assert A.shape == (r, I), f"A has shape {A.shape}, expected {(r, I)}"
    assert B.shape == (O, r), f"B has shape {B.shape}, expected {(O, r)}"
    _close(W_res + s * B @ A, W, "W_res + s·BA", rtol=1e-10, atol=1e-10)
    U, sigma, Vt = np.linalg.svd(W, full_matrices=False)
    _close(
        s * B @ A, (U[:, :r] * sigma[:r]) @ Vt[:r], "s·BA vs the rank-r truncated SVD", rtol=1e-8, atol=1e-8
    )
    # A = diag(√(σ/s)) Vᵀ and B = U diag(√(σ/s)): both Gram matrices are diag(σ/s).
    _close(A @ A.T, np.diag(sigma[:r] / s), "A Aᵀ", rtol=1e-8, atol=1e-8)
    _close(B.T @ B, np.diag(sigma[:r] / s), "Bᵀ B", rtol=1e-8, atol=1e-8)


# --- SORSA ------------------------------------------------------------------------------------------


@given(shape=svd_shapes, seed=seeds)
@example(shape=(6, 5, 2), seed=0)
def sorsa_split_is_exact_with_orthonormal_singular_vectors(
    impl: Implementation, shape: tuple[int, int, int], seed: int
) -> None:
    """W = W_res + B diag(S) A with S the top-r singular values, B = U_r, A = V_rᵀ orthonormal, and a
    residual holding exactly the remaining singular values."""
    O, I, r = shape
    W = _matrix(seed, (O, I))
    W_res, B, S, A = impl.sorsa_split(W, r)
    _close(W_res + (B * S) @ A, W, "W_res + B diag(S) A", rtol=1e-10, atol=1e-10)
    sigma = np.linalg.svd(W, compute_uv=False)
    _close(S, sigma[:r], "S vs the top-r singular values", rtol=1e-10, atol=1e-10)
    _close(B.T @ B, np.eye(r), "Bᵀ B", rtol=0, atol=1e-10)
    _close(A @ A.T, np.eye(r), "A Aᵀ", rtol=0, atol=1e-10)
    rest = np.linalg.svd(W_res, compute_uv=False)[: min(O, I) - r]
    _close(rest, sigma[r:], "singular values of the residual", rtol=1e-8, atol=1e-8)


@given(shape=svd_shapes, seed=seeds)
@example(shape=(6, 5, 2), seed=0)
def sorsa_merged_forward_equals_adapted_forward(
    impl: Implementation, shape: tuple[int, int, int], seed: int
) -> None:
    """The merge is W_res + B diag(S) A, the forward x W_resᵀ + ((x Aᵀ) ⊙ S) Bᵀ, and they agree: each is
    checked against its formula, not only against the other (a consistent bug would pass that)."""
    O, I, r = shape
    W_res, B, A = _matrix(seed, (O, I)), _matrix(seed + 1, (O, r)), _matrix(seed + 2, (r, I))
    S, x = 0.5 + np.abs(_matrix(seed + 3, (1, r))[0]), _matrix(seed + 4, (3, I))
    merged = impl.sorsa_merge(W_res, B, S, A)
    _close(merged, W_res + B @ np.diag(S) @ A, "merged weight W_res + B diag(S) A", rtol=1e-12, atol=1e-12)
    y = impl.sorsa_forward(x, W_res, B, S, A)
    expected = x @ W_res.T + ((x @ A.T) * S) @ B.T
    _close(y, expected, "forward x W_resᵀ + ((x Aᵀ) ⊙ S) Bᵀ", rtol=1e-12, atol=1e-12)
    _close(x @ merged.T, y, "merged vs adapted", rtol=1e-12, atol=1e-12)


def _reference_regularizer(factors: list[tuple[np.ndarray, np.ndarray]]) -> float:
    terms = [np.linalg.norm(A @ A.T - np.eye(len(A))) for A, _ in factors]
    terms += [np.linalg.norm(B.T @ B - np.eye(B.shape[1])) for _, B in factors]
    return float(np.mean(terms))


factor_lists = st.lists(
    st.tuples(st.integers(1, 3), st.integers(3, 6), st.integers(3, 6), seeds), min_size=1, max_size=3
)


def _factors(spec: list[tuple[int, int, int, int]], orthonormal: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for r, O, I, seed in spec:
        A, B = _matrix(seed, (r, I)), _matrix(seed + 1, (O, r))
        if orthonormal:
            A, B = np.linalg.qr(A.T)[0].T, np.linalg.qr(B)[0]
        out.append((A, B))
    return out


@given(spec=factor_lists)
@example(spec=[(2, 4, 5, 0)])
def sorsa_regularizer_is_the_mean_of_unsquared_frobenius_norms(impl: Implementation, spec: list) -> None:
    """L = mean over matrices of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F, not squared (SORSA §3, calc_ortho)."""
    factors = _factors(spec, orthonormal=False)
    value, _ = impl.sorsa_regularizer(factors)
    expected = _reference_regularizer(factors)
    assert abs(value - expected) <= 1e-10 * max(1.0, expected), (
        f"regularizer {value!r}, definition {expected!r}"
    )


@given(spec=factor_lists)
@example(spec=[(2, 4, 5, 0)])
def sorsa_regularizer_is_zero_exactly_for_orthonormal_factors(impl: Implementation, spec: list) -> None:
    """Orthonormal factors give L = 0 (to rounding); perturbing them makes it positive."""
    factors = _factors(spec, orthonormal=True)
    value, grads = impl.sorsa_regularizer(factors)
    assert abs(value) <= 1e-12, f"regularizer of orthonormal factors is {value!r}"
    assert all(np.all(np.isfinite(g)) for pair in grads for g in pair), "gradient at zero is not finite"
    A, B = factors[0]
    assert impl.sorsa_regularizer([(1.5 * A, B), *factors[1:]])[0] > 1e-6, "scaled A must be penalised"


@given(spec=factor_lists)
@example(spec=[(2, 4, 5, 0)])
def sorsa_regularizer_gradient_matches_finite_differences(impl: Implementation, spec: list) -> None:
    """The hand-derived gradient 2 M A / ‖M‖_F (and 2 B N / ‖N‖_F), averaged, matches central differences."""
    factors = _factors(spec, orthonormal=False)
    # ‖M‖_F has a kink where M = 0 (a rank-1 factor of unit norm): differentiate away from it
    assume(all(min(np.linalg.norm(A @ A.T - np.eye(len(A))), np.linalg.norm(B.T @ B - np.eye(B.shape[1])))
               > 1e-3 for A, B in factors))
    _, grads = impl.sorsa_regularizer(factors)
    eps = 1e-5
    for m, (A, B) in enumerate(factors):
        for which, X, G in (("A", A, grads[m][0]), ("B", B, grads[m][1])):
            numeric = np.zeros_like(X)
            for idx in np.ndindex(X.shape):
                old = X[idx]
                X[idx] = old + eps
                plus = _reference_regularizer(factors)
                X[idx] = old - eps
                minus = _reference_regularizer(factors)
                X[idx] = old
                numeric[idx] = (plus - minus) / (2 * eps)
            err, scale = float(np.linalg.norm(G - numeric)), float(np.linalg.norm(numeric))
            assert err <= 1e-6 * scale + 1e-9, f"d/d{which} of matrix {m}: ‖analytic − numeric‖ = {err:.3e}"


def _guarding(prop: Callable[[Implementation], None]) -> Callable[[Implementation], None]:
    @functools.wraps(prop)
    def run(impl: Implementation) -> None:
        prop(impl if isinstance(impl, Guarded) else Guarded(impl))

    return run


PROPERTIES: dict[str, Callable[[Implementation], None]] = {
    f.__name__: _guarding(f)
    for f in (
        decoder_logits_and_loss_equal_the_reference,
        decoder_is_causal,
        decoder_gradient_matches_finite_differences,
        copermuting_heads_and_channels_leaves_the_logits_unchanged,
        unpermute_inverts_copermute_exactly,
        copermute_lays_the_selection_out_in_the_documented_minimal_segments,
        s2ft_block_gradients_equal_the_full_gradient_restricted_to_the_block,
        lora_merged_forward_equals_adapted_forward,
        lora_unmerge_inverts_merge,
        pissa_init_keeps_the_weight_and_adapts_its_principal_part,
        sorsa_split_is_exact_with_orthonormal_singular_vectors,
        sorsa_merged_forward_equals_adapted_forward,
        sorsa_regularizer_is_the_mean_of_unsquared_frobenius_norms,
        sorsa_regularizer_is_zero_exactly_for_orthonormal_factors,
        sorsa_regularizer_gradient_matches_finite_differences,
    )
}
"""Every property by name, in the order the spec states them; each runs its implementation ``Guarded``."""
