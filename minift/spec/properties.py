"""The invariants of the methods as Hypothesis properties over any ``Implementation``.

Each property is a function ``prop(impl)``; Hypothesis draws the rest, and a failing property
raises with the shrunk counterexample ("Falsifying example: …") in its message. The reference
formulas the properties compare against (SVD, Frobenius norms) are written here in plain NumPy,
so the spec states the mathematics, not minift's code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from minift.spec.cases import llama_config, random_selection, random_tokens, random_weights
from minift.spec.interface import Implementation

seeds = st.integers(0, 2**16)


@st.composite
def llama_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Tiny Llama configs: MHA and GQA, head_dim equal to or different from C / H."""
    H = draw(st.sampled_from([2, 4]))
    K = draw(st.sampled_from([k for k in (1, 2, 4) if H % k == 0]))
    D = draw(st.sampled_from([4, 6]))
    C = draw(st.sampled_from([8, 12]))
    F = draw(st.sampled_from([6, 10]))
    return llama_config(C=C, H=H, K=K, D=D, F=F, L=2, V=13)


MHA = llama_config(C=8, H=2, K=2, D=4, F=6, L=2, V=13)
GQA = llama_config(C=8, H=4, K=2, D=4, F=6, L=2, V=13)


def _matrix(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _close(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float, atol: float) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    err = float(np.max(np.abs(actual - expected) - rtol * np.abs(expected), initial=0.0))
    assert err <= atol, f"{what}: differs by {err:.3e} beyond rtol={rtol:g}, atol={atol:g}"


# --- the decoder ------------------------------------------------------------------------------------


@given(config=llama_configs(), seed=seeds, t=st.integers(0, 4))
@example(config=GQA, seed=0, t=2)
def decoder_is_causal(impl: Implementation, config: dict[str, Any], seed: int, t: int) -> None:
    """Logits at positions ≤ t do not depend on tokens after t."""
    weights = random_weights(config, seed)
    tokens, _ = random_tokens(config, seed)
    changed = tokens.copy()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % config["vocab_size"]
    a = impl.decoder_logits(config, weights, tokens)[:, : t + 1]
    b = impl.decoder_logits(config, weights, changed)[:, : t + 1]
    _close(b, a, "logits up to t after changing later tokens", rtol=1e-12, atol=1e-12)


@given(config=llama_configs(), seed=seeds)
@example(config=GQA, seed=0)
def decoder_gradient_matches_finite_differences(
    impl: Implementation, config: dict[str, Any], seed: int
) -> None:
    """⟨∇L, v⟩ = (L(w + εv) − L(w − εv)) / 2ε along a random direction v over every weight (float64)."""
    weights = random_weights(config, seed)
    tokens, targets = random_tokens(config, seed)
    _, grads = impl.decoder_loss_and_grads(config, weights, tokens, targets)
    assert set(grads) == set(weights), f"gradient keys differ from weight keys: {set(grads) ^ set(weights)}"
    rng = np.random.default_rng(seed + 1)
    v = {k: rng.standard_normal(w.shape) for k, w in weights.items()}
    norm = np.sqrt(sum(float((d * d).sum()) for d in v.values()))
    v = {k: d / norm for k, d in v.items()}  # a unit direction keeps the O(ε²) truncation error small
    eps = 1e-5
    plus = impl.decoder_loss_and_grads(
        config, {k: w + eps * v[k] for k, w in weights.items()}, tokens, targets
    )[0]
    minus = impl.decoder_loss_and_grads(
        config, {k: w - eps * v[k] for k, w in weights.items()}, tokens, targets
    )[0]
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(float((grads[k] * v[k]).sum()) for k in weights)
    assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1e-3), (
        f"directional derivative: analytic {analytic:.10g}, finite differences {numeric:.10g}"
    )


# --- S2FT -------------------------------------------------------------------------------------------


@given(config=llama_configs(), seed=seeds, n_heads=st.integers(1, 2), n_channels=st.integers(1, 3))
@example(config=GQA, seed=0, n_heads=1, n_channels=2)
def copermuting_heads_and_channels_leaves_the_logits_unchanged(
    impl: Implementation, config: dict[str, Any], seed: int, n_heads: int, n_channels: int
) -> None:
    """S2FT's co-permutation is a change of coordinates: the model computes the same function."""
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


@given(config=llama_configs(), seed=seeds, n_heads=st.integers(1, 2), n_channels=st.integers(1, 3))
@example(config=GQA, seed=0, n_heads=1, n_channels=2)
def unpermute_inverts_copermute_exactly(
    impl: Implementation, config: dict[str, Any], seed: int, n_heads: int, n_channels: int
) -> None:
    """unpermute ∘ copermute is the identity, bit for bit (a permutation moves numbers, never rounds)."""
    weights = random_weights(config, seed)
    heads, channels = random_selection(config, seed, n_heads, n_channels)
    permuted, state = impl.copermute(config, weights, heads, channels)
    restored = impl.unpermute(config, permuted, state)
    for key, w in weights.items():
        assert np.array_equal(restored[key], w), f"{key} is not restored exactly"


@given(seed=seeds, n_heads=st.integers(1, 2), n_channels=st.integers(1, 5))
@example(seed=0, n_heads=1, n_channels=2)
def copermute_brings_the_selection_to_the_front(
    impl: Implementation, seed: int, n_heads: int, n_channels: int
) -> None:
    """After co-permuting, the selected channels are the leading Down columns (and Gate/Up rows), and
    with multi-head attention the selected heads are the leading O column blocks (and Q/K/V row blocks):
    the trainable part of each matrix is one dense block."""
    config = MHA
    D = config["head_dim"]
    weights = random_weights(config, seed)
    heads, channels = random_selection(config, seed, n_heads, n_channels)
    permuted, _ = impl.copermute(config, weights, heads, channels)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        down, down_p = weights[f"{p}.mlp.down_proj.weight"], permuted[f"{p}.mlp.down_proj.weight"]
        front = {tuple(col) for col in down_p[:, : len(channels[i])].T}
        assert front == {tuple(down[:, c]) for c in channels[i]}, f"layer {i}: Down's leading columns"
        for name in ("gate_proj", "up_proj"):
            w, w_p = weights[f"{p}.mlp.{name}.weight"], permuted[f"{p}.mlp.{name}.weight"]
            assert {tuple(r) for r in w_p[: len(channels[i])]} == {tuple(w[c]) for c in channels[i]}, name
        o, o_p = weights[f"{p}.self_attn.o_proj.weight"], permuted[f"{p}.self_attn.o_proj.weight"]
        lead = {o_p[:, j * D : (j + 1) * D].tobytes() for j in range(len(heads[i]))}
        assert lead == {o[:, h * D : (h + 1) * D].tobytes() for h in heads[i]}, (
            f"layer {i}: O's leading heads"
        )


@given(config=llama_configs(), seed=seeds, n_heads=st.integers(1, 2), n_channels=st.integers(1, 3))
@example(config=GQA, seed=0, n_heads=1, n_channels=2)
def s2ft_block_gradients_equal_the_full_gradient_restricted_to_the_block(
    impl: Implementation, config: dict[str, Any], seed: int, n_heads: int, n_channels: int
) -> None:
    """Partial backpropagation computes exactly the trained block's slice of the full gradient."""
    weights = random_weights(config, seed)
    tokens, targets = random_tokens(config, seed)
    heads, channels = random_selection(config, seed, n_heads, n_channels)
    _, full = impl.decoder_loss_and_grads(config, weights, tokens, targets)
    blocks = impl.s2ft_block_grads(config, weights, tokens, targets, heads, channels)
    D = config["head_dim"]
    for i in range(config["num_hidden_layers"]):
        o_key = f"model.layers.{i}.self_attn.o_proj.weight"
        cols = [c for h in heads[i] for c in range(h * D, (h + 1) * D)]
        _close(blocks[o_key], full[o_key][:, cols], f"{o_key} block", rtol=1e-10, atol=1e-13)
        d_key = f"model.layers.{i}.mlp.down_proj.weight"
        _close(blocks[d_key], full[d_key][:, channels[i]], f"{d_key} block", rtol=1e-10, atol=1e-13)


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
    """unmerge(merge(W)) = W up to float64 rounding."""
    _, O, I, R = shape
    W, A, B = _matrix(seed + 1, (O, I)), _matrix(seed + 2, (R, I)), _matrix(seed + 3, (O, R))
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
    """x (W_res + B diag(S) A)ᵀ = x W_resᵀ + ((x Aᵀ) ⊙ S) Bᵀ."""
    O, I, r = shape
    W_res, B, A = _matrix(seed, (O, I)), _matrix(seed + 1, (O, r)), _matrix(seed + 2, (r, I))
    S, x = _matrix(seed + 3, (1, r))[0], _matrix(seed + 4, (3, I))
    merged = impl.sorsa_merge(W_res, B, S, A)
    _close(x @ merged.T, impl.sorsa_forward(x, W_res, B, S, A), "merged vs adapted", rtol=1e-12, atol=1e-12)


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
    _, grads = impl.sorsa_regularizer(factors)
    eps = 1e-6
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
            _close(G, numeric, f"d/d{which} of matrix {m}", rtol=1e-6, atol=1e-8)


PROPERTIES: dict[str, Callable[[Implementation], None]] = {
    f.__name__: f
    for f in (
        decoder_is_causal,
        decoder_gradient_matches_finite_differences,
        copermuting_heads_and_channels_leaves_the_logits_unchanged,
        unpermute_inverts_copermute_exactly,
        copermute_brings_the_selection_to_the_front,
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
"""Every property by name, in the order the spec states them."""
