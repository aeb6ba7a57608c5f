"""Shared fixtures and Hypothesis profiles.

Profiles (select with HYPOTHESIS_PROFILE): ``dev`` (default, fast), ``ci`` (more examples,
derandomized, no deadline), ``nightly`` (many examples).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minift.backend import gpu_available

settings.register_profile("dev", max_examples=15, deadline=None)
settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("nightly", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

_BACKENDS = ["numpy"] + (["cupy"] if gpu_available() else [])


@pytest.fixture(params=_BACKENDS)
def xp(request):
    """The array module under test: numpy always, cupy as well where a GPU is present."""
    if request.param == "cupy":
        import cupy

        return cupy
    return np


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
