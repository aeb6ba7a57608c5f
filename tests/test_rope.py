"""Rotary position embedding, ``rotate_half`` convention of transformers' Llama: dimension i of
a head pairs with i + D/2, not with its neighbour.

x'_i = x_i cos φ_i − x_{i+D/2} sin φ_i,  x'_{i+D/2} = x_{i+D/2} cos φ_i + x_i sin φ_i,  φ_i = p · inv_freq[i].

Properties: matches the naive pairwise rotation; dx matches finite differences; q·k after RoPE
depends only on the position offset; norms are preserved; the backward is the rotation by −φ;
default, linear and llama3 inv_freq match a float64 transcription of Hugging Face's formula to float32
precision; the tables are float32 and float32 is preserved.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.config import RopeScaling
from minift.layers.rope import rope_backward, rope_forward, rope_inv_freq, rope_tables
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations, rope_scalings

DEFAULT = RopeScaling()
LLAMA3 = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)  # θ = 100, D = 8: wavelengths 6, 20, 63, 199 fall in
# the kept (< 64/4), interpolated and divided (> 64) bands


def _tables(positions, D, theta=100.0, scaling=DEFAULT):
    cos, sin = rope_tables(np.asarray(positions), D, theta, scaling)
    return cos.astype(np.float64), sin.astype(np.float64)


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("linear", 4.0), LLAMA3], ids=lambda s: s.kind)
def test_rope_forward_matches_the_naive_pairwise_rotation(xp, rng, scaling):
    x, positions = rng.standard_normal((2, 3, 4, 8)), np.array([[0, 1, 2, 3], [5, 9, 2, 0]])
    cos, sin = rope_tables(xp.asarray(positions), 8, 100.0, scaling)
    y = rope_forward(xp.asarray(x), cos.astype(np.float64), sin.astype(np.float64))
    # The tables are float32 (as in Hugging Face), the reference's angles float64.
    expected = ref.rope(x, positions, ref.rope_inv_freq(8, 100.0, scaling))
    assert_close(y, expected, rtol=1e-6, atol=1e-6, what="y")


@given(D=st.sampled_from([2, 4, 8, 64, 128]), theta=st.sampled_from([10.0, 1e4, 5e5, 1e6]),
       scaling=rope_scalings())
@example(D=128, theta=5e5, scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))  # Llama 3.1
@example(D=64, theta=5e5, scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))  # Llama 3.2
def test_inv_freq_matches_a_float64_transcription_of_hugging_face_to_float32_precision(D, theta, scaling):
    inv = rope_inv_freq(D, theta, scaling)
    assert inv.dtype == np.float32
    assert inv.shape == (D // 2,)
    # θ^(2j/D) in float32 is exp(e·ln θ) with e rounded to float32: ~ulp·ln θ ≈ 1e-6 relative.
    assert_close(inv, ref.rope_inv_freq(D, theta, scaling), rtol=1e-5, atol=0, what="inv_freq")


def test_rope_tables_are_float32_cos_and_sin_of_position_times_inv_freq_duplicated():
    positions = np.array([[0, 1, 7]])
    cos, sin = rope_tables(positions, 6, 100.0, LLAMA3)
    assert cos.dtype == sin.dtype == np.float32
    assert cos.shape == (1, 1, 3, 6)
    phi = positions[0, :, None] * ref.rope_inv_freq(6, 100.0, LLAMA3)  # (T, D/2)
    phi = np.concatenate([phi, phi], axis=-1)
    assert_close(cos[0, 0], np.cos(phi), rtol=0, atol=1e-6, what="cos")
    assert_close(sin[0, 0], np.sin(phi), rtol=0, atol=1e-6, what="sin")


def test_rope_backward_gives_the_finite_difference_gradient_of_x(rng):
    cos, sin = _tables([[0, 1, 2], [4, 2, 7]], 6)
    check_grad(lambda x: rope_forward(x, cos, sin), lambda G, x: {"x": rope_backward(G, cos, sin)},
               {"x": rng.standard_normal((2, 2, 3, 6))}, rng=rng)


@given(q=activations((1, 1, 1, 8)), k=activations((1, 1, 1, 8)), m=st.integers(0, 50), n=st.integers(0, 50),
       shift=st.integers(0, 50))
@example(q=np.ones((1, 1, 1, 8)), k=np.arange(8.0).reshape(1, 1, 1, 8), m=3, n=1, shift=10)
def test_rope_scores_depend_only_on_the_position_offset(q, k, m, n, shift):
    def score(pq, pk):
        qr = rope_forward(q, *_tables([[pq]], 8))
        kr = rope_forward(k, *_tables([[pk]], 8))
        return float((qr * kr).sum())

    # The angles φ = p · inv_freq ≤ 150 are float32 (as in Hugging Face): each is off by up to
    # ulp(128)/2 ≈ 8e-6 rad, so the two scores agree to a few 1e-5 of |q||k|, not to float64 precision.
    scale = np.linalg.norm(q) * np.linalg.norm(k) + 1e-12
    assert abs(score(m + shift, n + shift) - score(m, n)) <= 5e-5 * scale


@given(x=activations((2, 2, 3, 4)), p=st.lists(st.integers(0, 1000), min_size=3, max_size=3))
@example(x=np.ones((2, 2, 3, 4)), p=[0, 1, 1000])
def test_rope_preserves_the_norm_of_every_head_vector(x, p):
    y = rope_forward(x, *_tables([p, p], 4))
    # cos² + sin² = 1 only to float32 precision: the tables are float32, as in Hugging Face.
    assert_close(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=3e-7, atol=1e-12, what="‖y‖")


@given(dy=activations((1, 2, 3, 4)), p=st.lists(st.integers(0, 1000), min_size=3, max_size=3))
@example(dy=np.ones((1, 2, 3, 4)), p=[0, 1, 2])
def test_rope_backward_is_the_rotation_by_minus_phi(dy, p):
    cos, sin = _tables([p], 4)
    assert_close(rope_backward(dy, cos, sin), rope_forward(dy, cos, -sin), rtol=1e-12, atol=1e-12, what="dx")
    assert_close(rope_backward(rope_forward(dy, cos, sin), cos, sin), dy, rtol=3e-7, atol=1e-12,
                 what="R(−φ) R(φ) dy")  # the identity to float32 precision of cos² + sin²


def test_rope_keeps_float32(xp, rng):
    cos, sin = rope_tables(xp.asarray([[0, 3]]), 4, 1e4, RopeScaling())
    x = xp.asarray(rng.standard_normal((1, 2, 2, 4)).astype(np.float32))
    assert rope_forward(x, cos, sin).dtype == rope_backward(x, cos, sin).dtype == np.float32
