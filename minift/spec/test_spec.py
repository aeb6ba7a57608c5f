"""Runs every property of the spec against the implementation chosen with ``--impl``."""

import pytest

from minift.spec.properties import PROPERTIES


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_property(impl: object, name: str) -> None:
    PROPERTIES[name](impl)
