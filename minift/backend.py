"""The array module is inferred from the arguments: numpy, or cupy for arrays on a GPU.

There is no global switch. Every compute function starts with ``xp = get_xp(x)`` and uses only
``xp.*`` and array methods, so the same code runs on NumPy and CuPy. cupy is imported once, guarded:
minift works, and never imports it, where it is absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any, TypeAlias

import numpy as np

from minift.errors import ConfigError

Array: TypeAlias = np.ndarray
"""An n-dimensional array: a ``numpy.ndarray``, or a ``cupy.ndarray`` on a GPU."""

_cupy: ModuleType | None = None
if importlib.util.find_spec("cupy") is not None:  # never import a package that is not there
    try:
        import cupy as _cupy
    except Exception:  # a broken CUDA install must not break the CPU path
        _cupy = None


def get_xp(*arrays: Any) -> ModuleType:
    """Return ``cupy`` if any argument is a ``cupy.ndarray``, else ``numpy``.

    Non-array arguments (None, Python scalars) are ignored; any other array type is an error, so that
    a torch tensor passed by mistake fails here and not deep inside a matmul.
    """
    for a in arrays:
        if _cupy is not None and isinstance(a, _cupy.ndarray):
            return _cupy
        if a is None or isinstance(a, np.ndarray | np.generic | int | float | bool):
            continue
        raise TypeError(f"expected numpy or cupy arrays, got {type(a).__module__}.{type(a).__name__}")
    return np


GPU_BLOCK = 2**26  # elements of a blocked computation's largest temporary on a GPU: 256 MiB of float32


def block_size(xp: ModuleType, host: int, width: int = 1) -> int:
    """The unit of work of a blocked computation, in units of ``width`` elements (score entries of
    attention: width 1; rows of the LM head's logits: V; of a lean MLP's g and u: F).

    ``host`` on NumPy, where small blocks keep temporaries in cache and out of the memory peak. On
    CuPy a block costs mostly its kernel launches, and one block of a few thousand scores ran ten
    times slower per score than one of millions: there a block fills ``GPU_BLOCK`` elements (never
    less than ``host``).
    """
    return host if xp is np else max(host, GPU_BLOCK // max(width, 1))


def gpu_available() -> bool:
    """True only if cupy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return int(_cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


def xp_for(device: str) -> ModuleType:
    """The array module of a device name: ``"cpu"`` → numpy, ``"cuda"`` → cupy."""
    if device == "cpu":
        return np
    if device == "cuda":
        if not gpu_available():
            raise ConfigError("device 'cuda' needs CuPy and a CUDA GPU: pip install 'minift[cuda]'")
        assert _cupy is not None
        return _cupy
    raise ConfigError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def to_numpy(a: Any) -> np.ndarray:
    """Return ``a`` as a NumPy array (copying from the GPU when needed)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def to_xp(a: Any, xp: ModuleType) -> Array:
    """Return ``a`` on the array module ``xp`` (unchanged when it is already there)."""
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)


def scatter_add(target: Array, index: Array, values: Array) -> None:
    """``target[index] += values`` with repeated indices accumulated (``numpy.add.at``), in place."""
    xp = get_xp(target)
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def single_threaded_blas_children() -> Iterator[None]:
    """Processes started inside this block get one BLAS thread (the variables are read when a process
    loads its BLAS). On small matrices, jobs × 1 threads use the cores without the threads contending,
    and a run's floating-point sums do not depend on the machine or its load. This process is unchanged."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
