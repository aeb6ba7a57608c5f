"""The spec (minift.spec) holds for minift, fails readably for broken implementations, runs from the
pytest command line against any module, and exports language-agnostic vectors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minift.spec.export import export_vectors, outputs_of
from minift.spec.minift_impl import MiniftImplementation, implementation
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
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "HYPOTHESIS_PROFILE": "spec"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["--pyargs", "minift.spec", "--impl", "squared_impl", "-k", "regularizer"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    # a squared norm has the wrong value and the wrong gradient; zero at orthonormal factors still holds
    assert "2 failed, 1 passed" in run.stdout, run.stdout
    assert names_a_counterexample(run.stdout)


def test_exported_vectors_are_self_contained_and_cover_every_family(tmp_path):
    folders = export_vectors(tmp_path)
    names = {f.name for f in folders}
    assert names >= {"decoder_mha", "decoder_gqa", "decoder_gpt2", "decoder_qwen3_window", "decoder_gemma3",
                     "decoder_causality", "s2ft_copermute_mha",
                     "s2ft_copermute_gqa", "s2ft_block_grads_gqa", "lora", "pissa_init", "sorsa_split",
                     "sorsa_forward_merge", "sorsa_regularizer"}
    readme = (tmp_path / "README.md").read_text()
    for folder in folders:
        case = json.loads((folder / "case.json").read_text())
        assert case["property"] in readme
        arrays = load_file(str(folder / "arrays.safetensors"))
        names = {f"input/{k}" for k in case["inputs"]} | {f"expected/{k}" for k in case["expected"]}
        assert names == set(arrays)
        assert set(case["tolerance"]) == set(case["expected"])
        assert all(a.dtype in (np.float64, np.int64) for a in arrays.values())
        if case["scalars"].get("config", {}).get("model_type", "gpt2") != "gpt2":
            c = case["scalars"]["config"]
            assert c["head_dim"] != c["hidden_size"] // c["num_attention_heads"]  # head_dim ≠ C/H everywhere
    # a consumer of the vectors recomputes a case from its inputs alone
    lora = load_file(str(tmp_path / "lora" / "arrays.safetensors"))
    x, W, A, B = (lora[f"input/{k}"] for k in ["x", "W", "A", "B"])
    np.testing.assert_allclose(x @ W.T + 2.5 * (x @ A.T) @ B.T, lora["expected/y"], rtol=1e-12)


def test_the_standalone_checker_passes_minift_and_names_what_differs(tmp_path):
    export_vectors(tmp_path)
    checker = (tmp_path / "check.py").read_text()
    assert "import minift" not in checker  # NumPy and safetensors only
    assert "from minift." not in checker
    for folder in sorted(p.parent for p in tmp_path.glob("*/case.json")):
        case = json.loads((folder / "case.json").read_text())
        arrays = load_file(str(folder / "arrays.safetensors"))
        inputs = {k.removeprefix("input/"): v for k, v in arrays.items() if k.startswith("input/")}
        actual = outputs_of(implementation, case, inputs)
        if case["name"] == "lora":
            actual["merged"] = actual["merged"] + 1e-6
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in actual.items()},
                  str(folder / "actual.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.splitlines()[0].startswith("lora: merged["), run.stdout
    assert "1 failing outputs" in run.stdout


def test_minift_spec_export_writes_the_vectors_from_the_command_line(tmp_path, capsys):
    from minift.tools.cli import main

    assert main(["spec", "export", str(tmp_path / "vectors")]) == 0
    assert "wrote 15 cases" in capsys.readouterr().out
    assert (tmp_path / "vectors" / "sorsa_regularizer" / "case.json").is_file()
    assert (tmp_path / "vectors" / "check.py").is_file()


class WritesIntoItsInputs(MiniftImplementation):
    """Correct, but merges in place and scribbles over the weights it was given after using them."""

    def lora_merge(self, W, A, B, scaling):
        W += scaling * B @ A
        return W

    def decoder_loss_and_grads(self, config, weights, tokens, targets):
        loss, grads = super().decoder_loss_and_grads(config, weights, tokens, targets)
        for w in weights.values():
            w[...] = np.nan
        return loss, grads


@pytest.mark.parametrize("name", ["lora_merged_forward_equals_adapted_forward", "lora_unmerge_inverts_merge",
                                  "decoder_gradient_matches_finite_differences",
                                  "s2ft_block_gradients_equal_the_full_gradient_restricted_to_the_block"])
def test_an_implementation_may_write_into_its_inputs(name):
    PROPERTIES[name](WritesIntoItsInputs())


class LlamaOnly(MiniftImplementation):
    """A port of one family: it declares Llama, and refuses every other config outright."""

    name = "llama-only"

    def supports(self, config):
        return config["model_type"] == "llama"

    def decoder_logits(self, config, weights, tokens):
        assert self.supports(config), f"asked for a {config['model_type']} config it did not claim"
        return super().decoder_logits(config, weights, tokens)


@pytest.mark.parametrize("prop", ["decoder_logits_and_loss_equal_the_reference",
                                  "copermuting_heads_and_channels_leaves_the_logits_unchanged"])
def test_a_port_of_one_family_is_checked_on_the_configs_it_says_it_computes(prop):
    PROPERTIES[prop](LlamaOnly())


def test_a_port_that_claims_a_family_it_gets_wrong_still_fails():
    class ClaimsGemma(LlamaOnly):
        def supports(self, config):  # claims Gemma 3 but computes it as Llama
            return config["model_type"] in ("llama", "gemma3_text")

        def decoder_logits(self, config, weights, tokens):
            if config["model_type"] == "gemma3_text":
                raise AssertionError("computes Gemma 3 as Llama")
            return super().decoder_logits(config, weights, tokens)

    with pytest.raises(AssertionError):
        PROPERTIES["decoder_logits_and_loss_equal_the_reference"](ClaimsGemma())
