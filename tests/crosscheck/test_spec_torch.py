"""The spec holds for a second, independent implementation: PyTorch autograd and PEFT
(``torch_impl.py``). Every property minift satisfies, it satisfies too."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from minift.spec.properties import PROPERTIES
from tests.crosscheck.torch_impl import implementation


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_the_pytorch_implementation_satisfies_the_spec(name):
    PROPERTIES[name](implementation)
