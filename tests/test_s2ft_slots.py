"""S2FT partial-backpropagation slots (paper Sec. 3.3): a frozen W with trainable
input-column blocks (``ColumnBlock``, O and Down) or output-row blocks (``RowBlock``, Q/K/V/Gate/Up).

Properties: the forward is y = x Wᵀ + b; the trainable arrays are views of W; a column block keeps
only x[:, S] (N·S values, not a view of x); the gradients match finite differences for the input and
every block (float64, random upstream gradient) and equal the full dW restricted to the blocks; the
FLOP count is the table of ``minift.methods.s2ft.slots``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.layers.linear import linear_backward_weight
from minift.methods.s2ft.slots import ColumnBlock, RowBlock, block_slot
from minift.testing import assert_close, check_grad
from tests import reference as ref

SEGMENTS = ((0, 2), (3, 4))  # two blocks, as a grouped-query head selection may need


def _slot(kind, weight, bias=None, segments=SEGMENTS):
    return block_slot(kind, weight, segments, bias)


@pytest.mark.parametrize("kind", ["columns", "rows"])
def test_the_forward_is_the_dense_linear_map(kind, rng):
    x, w, b = rng.standard_normal((5, 6)), rng.standard_normal((6, 6)), rng.standard_normal(6)
    y, _ = _slot(kind, w, b).forward(x, keep=False)
    assert_close(y, ref.linear(x, w, b), rtol=1e-12, atol=1e-12, what="y")


@pytest.mark.parametrize(("kind", "cls"), [("columns", ColumnBlock), ("rows", RowBlock)])
def test_the_trainable_arrays_are_views_of_the_weight(kind, cls, rng):
    w = rng.standard_normal((6, 6))
    slot = _slot(kind, w)
    assert isinstance(slot, cls)
    params = slot.parameters()
    assert list(params) == ["weight_0", "weight_1"]
    for p in params.values():
        assert np.shares_memory(p, w)
    before = w.copy()
    params["weight_1"] += 1.0  # an in-place optimizer update lands in W, in the block only
    block = (slice(None), slice(3, 4)) if kind == "columns" else (slice(3, 4), slice(None))
    expected = before.copy()
    expected[block] += 1.0
    np.testing.assert_array_equal(w, expected)


def test_one_segment_is_named_weight(rng):
    assert list(_slot("columns", rng.standard_normal((3, 4)), segments=((1, 3),)).parameters()) == ["weight"]


def test_a_column_block_keeps_only_the_selected_input_columns_as_a_copy(rng):
    x = rng.standard_normal((5, 6))
    _, cache = _slot("columns", rng.standard_normal((4, 6))).forward(x, keep=True)
    assert [c.shape for c in cache] == [(5, 2), (5, 1)]
    assert not any(np.shares_memory(c, x) for c in cache)  # a view would keep all of x alive


def _check(kind, rng, *, bias):
    """check_grad over x and each block: the blocks are separate arrays written into a frozen W."""
    w0 = rng.standard_normal((6, 5))
    b = rng.standard_normal(6) if bias else None
    take = (lambda a, s: a[:, s[0] : s[1]]) if kind == "columns" else (lambda a, s: a[s[0] : s[1]])

    def build(blk0, blk1):
        w = w0.copy()
        for s, blk in zip(SEGMENTS, (blk0, blk1), strict=True):
            take(w, s)[...] = blk
        return _slot(kind, w, b)

    def forward(x, blk0, blk1):
        return build(blk0, blk1).forward(x, keep=False)[0]

    def backward(g, x, blk0, blk1):
        slot = build(blk0, blk1)
        _, cache = slot.forward(x, keep=True)
        dx, grads = slot.backward(g, cache)
        return {"x": dx, "blk0": grads["weight_0"], "blk1": grads["weight_1"]}

    args = {
        "x": rng.standard_normal((4, 5)),
        "blk0": take(w0, SEGMENTS[0]).copy(),
        "blk1": take(w0, SEGMENTS[1]).copy(),
    }
    check_grad(forward, backward, args, rng=rng)


@pytest.mark.parametrize("bias", [False, True])
def test_the_column_block_gradients_match_finite_differences(bias, rng):
    _check("columns", rng, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_the_row_block_gradients_match_finite_differences(bias, rng):
    _check("rows", rng, bias=bias)


@st.composite
def _cases(draw):
    N, O, I = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["columns", "rows"]))
    extent = I if kind == "columns" else O
    cuts = sorted(draw(st.sets(st.integers(0, extent), min_size=2, max_size=4)))
    segments = tuple((a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False))
    return kind, N, O, I, segments, draw(st.integers(0, 2**16))


@given(_cases())
@example(("columns", 3, 2, 5, ((0, 1), (2, 5)), 0))
def test_block_gradients_equal_the_full_weight_gradient_restricted_to_the_blocks(case):
    kind, N, O, I, segments, seed = case
    rng = np.random.default_rng(seed)
    x, w, dy = rng.standard_normal((N, I)), rng.standard_normal((O, I)), rng.standard_normal((N, O))
    slot = _slot(kind, w, segments=segments)
    _, cache = slot.forward(x, keep=True)
    dx, grads = slot.backward(dy, cache)
    full = linear_backward_weight(dy, x)
    for (a, b), g in zip(segments, grads.values(), strict=True):
        assert_close(g, full[:, a:b] if kind == "columns" else full[a:b], rtol=1e-12, atol=1e-13)
    assert_close(dx, dy @ w, rtol=1e-12, atol=1e-13, what="dx")
    _, no_dx = slot.backward(dy, cache, need_dx=False)
    assert slot.backward(dy, cache, need_dx=False)[0] is None
    assert no_dx.keys() == grads.keys()


def test_the_flop_count_charges_the_weight_gradient_for_the_blocks_only(rng):
    w = rng.standard_normal((6, 5))  # O = 6, I = 5, S = 3
    assert _slot("columns", w).flops(10) == (2 * 10 * 5 * 6, 2 * 10 * 5 * 6 + 2 * 10 * 3 * 6)
    assert _slot("rows", w).flops(10, need_dx=False) == (2 * 10 * 5 * 6, 2 * 10 * 3 * 5)
