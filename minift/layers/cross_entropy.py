"""Fused softmax + cross-entropy over the vocabulary, mean over counted tokens (as in llm.c).

Targets equal to ``IGNORE_INDEX`` (-100, the PyTorch/Hugging Face convention) are not counted: they
contribute neither to the loss nor to the mean's denominator.
"""

from __future__ import annotations

from typing import NamedTuple

from minift.backend import Array, get_xp

IGNORE_INDEX = -100


class CrossEntropyCache(NamedTuple):
    probs: Array  # (N, V) softmax(logits); dlogits = (probs − onehot) / count needs nothing else
    targets: Array  # (N,) integer, IGNORE_INDEX where not counted
    count: int  # number of counted targets (the mean's denominator)


def cross_entropy_forward(logits: Array, targets: Array) -> tuple[float, CrossEntropyCache]:
    """loss = mean over counted n of (logsumexp(logits[n]) − logits[n, targets[n]]).

    A batch with no counted target has loss 0 and zero gradient (not NaN).

    Shapes:
        logits: (N, V)   targets: (N,) integer   returns: scalar loss
    """
    xp = get_xp(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # NOTE: row max keeps exp from overflowing
    counted = targets != IGNORE_INDEX
    safe_targets = xp.where(counted, targets, 0)
    picked = xp.take_along_axis(shifted, safe_targets[:, None], axis=-1)[:, 0]  # (N,)
    # exp and the normalisation in place: (N, V) is the largest array of the step
    probs = xp.exp(shifted, out=shifted)
    sum_e = probs.sum(axis=-1, keepdims=True)  # (N, 1)
    probs /= sum_e
    nll = (xp.log(sum_e[:, 0]) - picked) * counted
    count = int(counted.sum())
    loss = float(nll.sum()) / max(count, 1)
    return loss, CrossEntropyCache(probs, targets, count)


def cross_entropy_backward(cache: CrossEntropyCache, dloss: float = 1.0) -> Array:
    """dlogits[n] = dloss · (probs[n] − onehot(targets[n])) / count, zero for ignored rows.

    Shapes:
        returns: (N, V)
    """
    xp = get_xp(cache.probs)
    probs, targets, count = cache
    counted = targets != IGNORE_INDEX
    dlogits = probs * counted[:, None]
    rows = xp.nonzero(counted)[0]
    dlogits[rows, targets[rows]] -= 1.0
    dlogits *= dloss / max(count, 1)
    return dlogits
