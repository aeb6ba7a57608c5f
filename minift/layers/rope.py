"""Rotary position embedding (RoPE), ``rotate_half`` convention: dimension i pairs with i + D/2.

Tutorial: tutorials/02_rmsnorm_and_rope.py.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np

from minift.backend import Array, get_xp, to_numpy, to_xp
from minift.config import RopeScaling


def rope_inv_freq(D: int, theta: float, scaling: RopeScaling, *, xp: ModuleType = np) -> Array:
    """inv_freq[j] = 1 / θ^(2j/D), then rescaled (linear or llama3), in float32 as Hugging Face does.

    NOTE: float32 is on purpose: tables built in float64 are more accurate but differ from the
    checkpoints' own implementation by ~5e-4 at long positions.

    Shapes:
        returns: (D/2,) float32
    """
    f32 = xp.float32
    inv = (1.0 / (f32(theta) ** (xp.arange(0, D, 2, dtype=f32) / f32(D)))).astype(f32)
    if scaling.kind == "linear":
        return (inv / f32(scaling.factor)).astype(f32)
    if scaling.kind == "llama3":
        orig = f32(scaling.original_max_position_embeddings)
        wavelen = f32(2 * math.pi) / inv
        low_wl = orig / f32(scaling.low_freq_factor)
        high_wl = orig / f32(scaling.high_freq_factor)
        inv_l = xp.where(wavelen > low_wl, inv / f32(scaling.factor), inv)
        smooth = (orig / wavelen - f32(scaling.low_freq_factor)) / f32(
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_l / f32(scaling.factor) + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return xp.where(medium, smoothed, inv_l).astype(f32)
    return inv


def rope_tables(positions: Array, D: int, theta: float, scaling: RopeScaling) -> tuple[Array, Array]:
    """cos and sin of φ[b, t, j] = positions[b, t] · inv_freq[j], duplicated to D columns (float32).

    The tables are computed on the host in NumPy and copied to the positions' device: CuPy's float32
    cos and sin can differ from NumPy's in the last bit, and one definition of the angles keeps a model
    on a GPU equal to the same model on the host (to 1e-10 in float64, not float32's 1e-7).

    Shapes:
        positions: (B, T) integer   returns cos, sin: (B, 1, T, D), broadcast over heads
    """
    xp = get_xp(positions)
    inv = rope_inv_freq(D, theta, scaling)  # (D/2,)
    freqs = to_numpy(positions).astype(np.float32)[..., None] * inv  # (B, T, D/2)
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None]  # (B, 1, T, D)
    return to_xp(np.cos(emb), xp), to_xp(np.sin(emb), xp)


def rotate_half(x: Array) -> Array:
    """rotate_half(x) = concat(−x[..., D/2:], x[..., :D/2]): the pair (i, i + D/2) maps to (−x_{i+D/2}, x_i).

    Shapes:
        x: (..., D) with D even   returns: like x
    """
    xp = get_xp(x)
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_forward(x: Array, cos: Array, sin: Array) -> Array:
    """x' = x ⊙ cos + rotate_half(x) ⊙ sin: pair (i, i + D/2) rotated by φ_i.

    No cache: the backward needs only the tables, which the caller holds.

    Shapes:
        x: (B, H, T, D) (or K heads)   cos, sin: (B, 1, T, D)   returns: like x
    """
    return (x * cos + rotate_half(x) * sin).astype(x.dtype, copy=False)


def rope_backward(dy: Array, cos: Array, sin: Array) -> Array:
    """dx = dy ⊙ cos − rotate_half(dy ⊙ sin): the transpose of a rotation is the rotation by −φ.

    Shapes:
        dy: (B, H, T, D)   returns: like dy
    """
    # textbook: dy ⊙ cos − rotate_half(dy ⊙ sin); below, the rotation's two halves are subtracted
    # in place (x − (−y) is x + y exactly), one (B, H, T, D) temporary instead of three
    dx = (dy * cos).astype(dy.dtype, copy=False)
    t = dy * sin
    half = dy.shape[-1] // 2
    dx[..., :half] += t[..., half:]
    dx[..., half:] -= t[..., :half]
    return dx
