"""Fused softmax cross-entropy, mean over counted targets (−100 = ignored, as in PyTorch).

loss = (1/M) Σ_{n counted} (logsumexp(z_n) − z_n[y_n]),  dz_n = (softmax(z_n) − onehot(y_n)) / M.

Properties: matches the naive reference; dlogits matches finite differences (with ignored rows);
loss and gradient are invariant to a per-row shift of the logits; dlogits rows sum to zero; ignored
rows get zero gradient and do not count in the mean; a batch with no target gives 0, not NaN; huge
logits do not overflow; float32 is preserved.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minift.layers.cross_entropy import IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations

N, V = 5, 4
targets_with_ignored = arrays(np.int64, (N,), elements=st.sampled_from([IGNORE_INDEX, *range(V)]))


def test_cross_entropy_forward_matches_the_naive_reference(xp, rng):
    logits, targets = 3 * rng.standard_normal((N, V)), np.array([0, IGNORE_INDEX, 3, 3, 1])
    loss, _ = cross_entropy_forward(xp.asarray(logits), xp.asarray(targets))
    assert abs(loss - ref.cross_entropy(logits, targets)) <= 1e-12


def test_cross_entropy_backward_gives_the_finite_difference_gradient_of_the_logits(rng):
    targets = np.array([0, IGNORE_INDEX, 3, 3, 1])
    def backward(G, logits):
        return {"logits": cross_entropy_backward(cross_entropy_forward(logits, targets)[1], G)}

    check_grad(lambda logits: cross_entropy_forward(logits, targets)[0], backward,
               {"logits": 2 * rng.standard_normal((N, V))}, rng=rng)


@given(logits=activations((N, V)), shift=activations((N, 1), bound=100.0), targets=targets_with_ignored)
@example(logits=np.zeros((N, V)), shift=50.0 * np.arange(N)[:, None], targets=np.arange(N) % V)
def test_cross_entropy_is_invariant_to_a_per_row_shift_of_the_logits(logits, shift, targets):
    loss, cache = cross_entropy_forward(logits, targets)
    loss_s, cache_s = cross_entropy_forward(logits + shift, targets)
    assert abs(loss_s - loss) <= 1e-10
    assert_close(cross_entropy_backward(cache_s), cross_entropy_backward(cache), rtol=1e-9, atol=1e-12,
                 what="dlogits")


@given(logits=activations((N, V)), targets=targets_with_ignored)
@example(logits=np.eye(N, V), targets=np.array([0, IGNORE_INDEX, 2, 3, 0]))
def test_dlogits_rows_sum_to_zero_and_ignored_rows_are_zero(logits, targets):
    dlogits = cross_entropy_backward(cross_entropy_forward(logits, targets)[1])
    assert_close(dlogits.sum(axis=-1), np.zeros(N), rtol=0, atol=1e-12, what="row sums")
    np.testing.assert_array_equal(dlogits[targets == IGNORE_INDEX], 0.0)


@given(logits=activations((N, V)), targets=targets_with_ignored)
@example(logits=np.eye(N, V), targets=np.array([IGNORE_INDEX, 1, IGNORE_INDEX, 3, 0]))
def test_ignored_rows_do_not_count_in_the_mean(logits, targets):
    counted = targets != IGNORE_INDEX
    assume(counted.any())
    loss, cache = cross_entropy_forward(logits, targets)
    loss_kept, cache_kept = cross_entropy_forward(logits[counted], targets[counted])
    assert abs(loss - loss_kept) <= 1e-12
    assert_close(cross_entropy_backward(cache)[counted], cross_entropy_backward(cache_kept), rtol=1e-12,
                 atol=1e-15, what="dlogits of counted rows")


def test_a_batch_with_no_target_gives_zero_loss_and_zero_gradient_not_nan(rng):
    loss, cache = cross_entropy_forward(rng.standard_normal((N, V)), np.full(N, IGNORE_INDEX))
    assert loss == 0.0
    np.testing.assert_array_equal(cross_entropy_backward(cache), 0.0)


def test_huge_logits_neither_overflow_nor_warn():
    logits = np.array([[1e4, -1e4, 0.0, 3e4]], dtype=np.float32)
    loss, cache = cross_entropy_forward(logits, np.array([0]))
    assert abs(loss - 2e4) <= 1.0
    assert np.isfinite(cross_entropy_backward(cache)).all()


def test_cross_entropy_keeps_float32(xp, rng):
    logits = xp.asarray(rng.standard_normal((N, V)).astype(np.float32))
    _, cache = cross_entropy_forward(logits, xp.asarray([0, 1, IGNORE_INDEX, 2, 3]))
    assert cross_entropy_backward(cache, 0.5).dtype == np.float32
