"""Embedding lookup y = E[ids]; backward dE[v] = Σ_{n: ids[n] = v} dy[n].

Properties: matches the naive reference; the table gradient matches finite differences; repeated
ids accumulate (no overwrite); rows of ids that never occur get zero; float32 is preserved.
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minift.layers.embedding import embedding_backward, embedding_forward
from minift.testing import assert_close, check_grad
from tests import reference as ref
from tests.strategies import activations

V, C = 5, 3


def test_embedding_forward_matches_the_naive_reference(xp, rng):
    ids, table = rng.integers(0, V, (2, 4)), rng.standard_normal((V, C))
    assert_close(embedding_forward(xp.asarray(ids), xp.asarray(table)), ref.embedding(ids, table),
                 rtol=0, atol=0, what="y")


def test_embedding_backward_gives_the_finite_difference_gradient_of_the_table(rng):
    ids = np.array([[0, 3, 3], [1, 3, 0]])  # repeats, and rows 2 and 4 unused
    check_grad(lambda table: embedding_forward(ids, table),
               lambda G, table: {"table": embedding_backward(G, ids, V)},
               {"table": rng.standard_normal((V, C))}, rng=rng)


@given(ids=arrays(np.int64, (6,), elements=st.integers(0, V - 1)), dy=activations((6, C)))
@example(ids=np.zeros(6, dtype=np.int64), dy=np.ones((6, C)))
def test_repeated_ids_accumulate_their_gradients(ids, dy):
    dtable = embedding_backward(dy, ids, V)
    for v in range(V):
        expected = dy[ids == v].sum(axis=0)  # zero for an id that never occurs
        assert_close(dtable[v], expected, rtol=1e-12, atol=1e-12, what=f"dE[{v}]")


def test_embedding_keeps_float32(xp, rng):
    ids = xp.asarray(rng.integers(0, V, (2, 3)))
    table = xp.asarray(rng.standard_normal((V, C)).astype(np.float32))
    assert embedding_forward(ids, table).dtype == np.float32
    assert embedding_backward(xp.ones((2, 3, C), dtype=np.float32), ids, V).dtype == np.float32
