"""The array module comes from the arguments: numpy for numpy arrays, NumPy scalars, Python scalars and
None; a clear TypeError naming the type for anything else (a list, a torch tensor, a plain object);
scatter_add accumulates repeated indices instead of keeping the last write.
"""

from __future__ import annotations

import numpy as np
import pytest

from minift.backend import GPU_BLOCK, block_size, get_xp, gpu_available, scatter_add, to_numpy


@pytest.mark.parametrize("args", [(np.zeros(3),), (np.float32(1.0),), (None,), (2, 3.5, True), (),
                                  (None, np.ones((2, 2)), 1.0)],
                         ids=["array", "numpy-scalar", "none", "python-scalars", "nothing", "mixed"])
def test_get_xp_returns_numpy_for_numpy_arrays_scalars_and_none(args):
    assert get_xp(*args) is np


@pytest.mark.parametrize(("obj", "name"), [([1.0, 2.0], "builtins.list"), (object(), "builtins.object"),
                                           ((1, 2), "builtins.tuple")])
def test_get_xp_raises_a_type_error_that_names_any_other_type(obj, name):
    with pytest.raises(TypeError, match=name):
        get_xp(np.zeros(2), obj)


def test_get_xp_returns_cupy_when_any_argument_is_on_the_gpu(xp):
    assert get_xp(None, xp.zeros(2)) is xp


def test_scatter_add_accumulates_repeated_indices(xp):
    target = xp.zeros((4, 2))
    values = xp.asarray([[1.0, 2.0], [5.0, 5.0], [10.0, 20.0], [100.0, 0.0]])
    scatter_add(target, xp.asarray([1, 3, 1, 1]), values)
    np.testing.assert_array_equal(to_numpy(target), [[0, 0], [111, 22], [0, 0], [5, 5]])


def test_blocks_are_the_hosts_on_numpy_and_fill_the_gpu_block_on_cupy_never_smaller():
    assert block_size(np, 256, width=4096) == 256  # the host keeps its small blocks
    if gpu_available():
        import cupy

        assert block_size(cupy, 2**17) == GPU_BLOCK  # scores: one element each
        assert block_size(cupy, 256, width=1376) == GPU_BLOCK // 1376  # rows of a (rows, F) temporary
        assert block_size(cupy, 256, width=2**30) == 256  # never fewer than the host's
