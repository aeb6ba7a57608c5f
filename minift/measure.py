"""Measurements used by ``minift info`` and ``minift bench``: BLAS throughput, memory, FLOPs, speed."""

from __future__ import annotations

import time

import numpy as np


def gemm_gflops(n: int = 1024, repeats: int = 5, dtype: type = np.float32) -> float:
    """Measured float32 GEMM throughput (GFLOP/s) of this machine's BLAS: best of ``repeats`` n×n×n
    products, 2n³ FLOPs each. The ceiling against which model-FLOPs utilisation is reported."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
