"""The spec holds for a second, independent implementation: PyTorch autograd and PEFT
(``torch_impl.py``, its own float64 RoPE tables). Every property minift satisfies and every exported
vector, it satisfies too."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from minift.spec.properties import PROPERTIES
from tests.crosscheck.torch_impl import implementation


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_the_pytorch_implementation_satisfies_the_spec(name):
    PROPERTIES[name](implementation)


def test_the_pytorch_implementation_passes_every_exported_vector(tmp_path):
    from minift.spec.export import export_vectors
    from tests.test_spec_mutants import failing_outputs

    export_vectors(tmp_path)
    assert failing_outputs(implementation, tmp_path, ("",)) == []
