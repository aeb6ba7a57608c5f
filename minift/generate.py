"""Text generation with a KV cache: greedy, temperature, top-k and top-p (nucleus) sampling.

A batch of prompts is LEFT-padded, so every row's next token sits in the last column; the attention
mask covers the cached positions and the new ones, and positions are counted over real tokens only
(``default_positions``), so a padded row generates exactly what it would alone. The prompt is run once
(prefill), then one token per step against the cache (``model_forward(..., kv_cache=)``).

Sampling runs on the host: each step brings the (B, V) last-position logits over with ``to_numpy``
and draws with an explicit ``numpy.random.Generator``, so a seed fixes the tokens on NumPy and CuPy alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from minift.backend import Array, get_xp, to_numpy
from minift.errors import ConfigError, ShapeError
from minift.model import KVCache, Model, model_forward


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax); otherwise the logits are
    divided by the temperature, then filtered by top-k, then by top-p (Hugging Face's warper order),
    and a token is drawn from what is left."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self.temperature}, "
                f"{self.top_k}, {self.top_p}"
            )


def top_k_filter(logits: Array, k: int) -> Array:
    """Keep each row's k largest logits (ties with the k-th are kept), set the rest to −inf.

    Shapes:
        logits: (B, V)   returns: (B, V)
    """
    xp = get_xp(logits)
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = xp.sort(logits, axis=-1)[:, -k][:, None]  # (B, 1)
    return xp.where(logits < kth, -xp.inf, logits)


def top_p_filter(logits: Array, p: float) -> Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one token),
    as Hugging Face's ``TopPLogitsWarper``: a token is dropped when the tokens less likely than it
    hold at most 1 − p of the mass.

    Shapes:
        logits: (B, V)   returns: (B, V)
    """
    xp = get_xp(logits)
    if p >= 1.0:
        return logits
    order = xp.argsort(logits, axis=-1)  # ascending
    sorted_logits = xp.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    drop_sorted = xp.cumsum(probs, axis=-1) <= 1.0 - p
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = xp.zeros_like(drop_sorted)
    xp.put_along_axis(drop, order, drop_sorted, axis=-1)
    return xp.where(drop, -xp.inf, logits)


def softmax(logits: Array) -> Array:
    """Row softmax, −inf entries getting probability 0."""
    xp = get_xp(logits)
    e = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample_next(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator | None) -> np.ndarray:
    """The next token of each row, on the host.

    Shapes:
        logits: (B, V) host array   returns: (B,) int64
    """
    xp = get_xp(logits)
    if config.temperature == 0.0:
        return logits.argmax(axis=-1).astype(np.int64)
    if rng is None:
        raise ConfigError("sampling with temperature > 0 needs an explicit numpy.random.Generator (rng=)")
    scaled = logits.astype(np.float64) / config.temperature
    probs = softmax(top_p_filter(top_k_filter(scaled, config.top_k), config.top_p))
    u = rng.random(probs.shape[0])  # inverse-CDF draw: one uniform per row
    cdf = xp.cumsum(probs, axis=-1)
    # index i with cdf[i − 1] ≤ u·total < cdf[i]: never a token of probability 0
    picks = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=-1)
    return xp.minimum(picks, probs.shape[-1] - 1).astype(np.int64)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, *, xp: ModuleType = np) -> tuple[Array, Array]:
    """Left-pad token lists into (tokens, attention_mask).

    Shapes:
        returns tokens, attention_mask: (B, T) int64, T the longest prompt
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ShapeError("generation needs at least one prompt, and every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    tokens = [[pad_id] * (T - len(p)) + [int(t) for t in p] for p in prompts]
    mask = [[0] * (T - len(p)) + [1] * len(p) for p in prompts]
    return xp.asarray(tokens, dtype=np.int64), xp.asarray(mask, dtype=np.int64)


def generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens, stopping a row at any EOS id.

    Returns each row's new tokens, the EOS included when one was produced. Rows that finish early are
    fed padding (masked out), so they do not change the others.

    Args:
        eos_ids: ids that end a row; default ``model.config.eos_token_id`` (may be several).
        pad_id: the id used for left padding; default the config's pad id, else 0 (it is masked anyway).
        rng: the host Generator for sampling (needed when ``sampling.temperature > 0``).
    """
    sampling = sampling or SamplingConfig()
    c = model.config
    eos = set(c.eos_token_id if eos_ids is None else eos_ids)
    pad = pad_id if pad_id is not None else (c.pad_token_id if c.pad_token_id is not None else 0)
    xp = get_xp(model.embed.weight)
    tokens, mask = left_pad(prompts, pad, xp=xp)
    B, T = tokens.shape
    if not c.uses_rope and T + max_new_tokens > c.max_position_embeddings:
        raise ConfigError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{c.max_position_embeddings} learned positions"
        )
    cache = KVCache.empty(c.n_layers)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    step_tokens = tokens
    for _ in range(max_new_tokens):
        logits, _ = model_forward(model, step_tokens, attention_mask=mask, kv_cache=cache, train=False)
        nxt = sample_next(to_numpy(logits[:, -1]), sampling, rng)  # (B,)
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = int(nxt[b]) in eos
        if all(done):
            break
        fed = [pad if d else int(t) for d, t in zip(done, nxt, strict=True)]
        step_tokens = xp.asarray(fed, dtype=np.int64)[:, None]  # (B, 1)
        # A finished row's new position is padding: masked out, so it never changes a live row.
        alive = xp.asarray([0 if d else 1 for d in done], dtype=np.int64)[:, None]
        mask = xp.concatenate([mask, alive], axis=1)
    return out
