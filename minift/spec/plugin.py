"""The pytest plugin behind ``pytest --pyargs minift.spec --impl mypackage.adapter``.

Registered through the ``pytest11`` entry point so that ``--impl`` exists before pytest resolves
``--pyargs``. It imports nothing heavy: environments that never run the spec pay nothing for it.
``--impl`` (or the environment variable MINIFT_SPEC_IMPL) names a module exposing ``implementation``;
the default is minift itself.
"""

from __future__ import annotations

import importlib
import os

import pytest

DEFAULT_IMPL = "minift.spec.minift_impl"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--impl",
        default=os.environ.get("MINIFT_SPEC_IMPL", DEFAULT_IMPL),
        help="minift spec: module whose `implementation` implements minift.spec.interface.Implementation",
    )


@pytest.fixture(scope="session")
def impl(request: pytest.FixtureRequest) -> object:
    """The implementation under test, loaded from the module named by --impl."""
    name = request.config.getoption("--impl")
    module = importlib.import_module(name)
    if not hasattr(module, "implementation"):
        raise pytest.UsageError(f"--impl {name}: the module has no `implementation` object")
    return module.implementation
