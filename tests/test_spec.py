"""The spec (minift.spec) holds for minift, fails readably for broken implementations, runs from the
pytest command line against any module, and exports language-agnostic vectors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from minift.spec.export import export_vectors
from minift.spec.minift_impl import implementation
from minift.spec.properties import PROPERTIES
from tests.spec_broken import ForgetsTheOColumns, KeepsTheWrongSlice, SquaredRegularizer

ROOT = Path(__file__).resolve().parents[1]


def names_a_counterexample(text: str) -> bool:
    """Hypothesis names the example that broke a property: an explicit @example when it already fails
    ("Failing explicit example" in older Hypothesis, "Falsifying explicit example" in newer), else the
    shrunk generated one ("Falsifying example")."""
    return any(s in text for s in ("Failing explicit example", "Falsifying explicit example",
                                   "Falsifying example"))


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_minift_satisfies_the_spec(name):
    PROPERTIES[name](implementation)


@pytest.mark.parametrize(
    ("broken", "prop"),
    [
        (ForgetsTheOColumns(), "copermuting_heads_and_channels_leaves_the_logits_unchanged"),
        (SquaredRegularizer(), "sorsa_regularizer_is_the_mean_of_unsquared_frobenius_norms"),
        (KeepsTheWrongSlice(), "s2ft_block_gradients_equal_the_full_gradient_restricted_to_the_block"),
    ],
    ids=["copermute-forgets-O", "squared-regularizer", "wrong-slice"],
)
def test_a_broken_implementation_fails_with_a_readable_counterexample(broken, prop):
    with pytest.raises(AssertionError) as info:
        PROPERTIES[prop](broken)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert names_a_counterexample(notes), notes
    assert str(info.value)  # and the assertion says what differed


def test_the_spec_runs_from_the_command_line_against_any_module(tmp_path):
    (tmp_path / "squared_impl.py").write_text(
        "from tests.spec_broken import SquaredRegularizer\nimplementation = SquaredRegularizer()\n"
    )
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["--pyargs", "minift.spec", "--impl", "squared_impl", "-k", "regularizer"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    # a squared norm has the wrong value and the wrong gradient; zero at orthonormal factors still holds
    assert "2 failed, 1 passed" in run.stdout, run.stdout
    assert names_a_counterexample(run.stdout)


def test_exported_vectors_state_their_property_and_reproduce(tmp_path):
    folders = export_vectors(tmp_path)
    assert {f.name for f in folders} >= {"decoder_gqa", "s2ft_block_grads", "sorsa_regularizer"}
    readme = (tmp_path / "README.md").read_text()
    for folder in folders:
        case = json.loads((folder / "case.json").read_text())
        assert case["property"] in readme
        arrays = load_file(str(folder / "arrays.safetensors"))
        names = {f"input/{k}" for k in case["inputs"]} | {f"expected/{k}" for k in case["expected"]}
        assert names == set(arrays)
    # a consumer of the vectors recomputes a case from its inputs alone
    lora = load_file(str(tmp_path / "lora" / "arrays.safetensors"))
    x, W, A, B = (lora[f"input/{k}"] for k in ["x", "W", "A", "B"])
    np.testing.assert_allclose(x @ W.T + 2.0 * (x @ A.T) @ B.T, lora["expected/y"], rtol=1e-12)


def test_minift_spec_export_writes_the_vectors_from_the_command_line(tmp_path, capsys):
    from minift.tools.cli import main

    assert main(["spec", "export", str(tmp_path / "vectors")]) == 0
    assert "wrote 7 cases" in capsys.readouterr().out
    assert (tmp_path / "vectors" / "sorsa_regularizer" / "case.json").is_file()
