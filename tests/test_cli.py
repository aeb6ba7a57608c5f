"""Spec of the command line: every subcommand's happy path on a tiny model, resuming an interrupted
fine-tuning run, and user errors that exit non-zero with one line and no traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

import minift.train
from minift.data.tasks import save_tokenizer, task_splits
from minift.io.hub import load_pretrained, save_pretrained
from minift.io.safetensors_io import read_safetensors
from minift.model import init_model, model_forward
from minift.testing import assert_close
from minift.tools.cli import COMMANDS, main
from minift.tools.finetune import attach_adapter
from tests.toy import task_world_config


def _model_folder(path, hidden: int):
    config = task_world_config(hidden)
    tok = save_tokenizer(path.parent / f"tok-{path.name}")
    return save_pretrained(init_model(config, np.random.default_rng(0), std=0.1), path, tokenizer_path=tok)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    records = task_splits("shift", 0, n_train=24, n_eval=4, n_retention=1).train
    data.write_text("".join(json.dumps(ex.record) + "\n" for ex in records))
    return {"root": root, "model": _model_folder(root / "tiny", 16), "data": data}


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``minift <argv>``, run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help and usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def finetune(files, out, method, *extra):
    return [
        "finetune",
        "--model",
        files["model"],
        "--data",
        files["data"],
        "--method",
        method,
        "--out",
        out,
        "--steps",
        4,
        "--batch-size",
        4,
        "--rank",
        2,
        "--checkpoint-every",
        2,
        "--no-progress",
        *extra,
    ]


def assert_one_line_error(code, err, *words):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("minift")
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


# ----------------------------------------------------------------------------------------------------
# happy paths


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    assert "usage: minift" in out


def test_help_of_the_main_commands_teaches_with_examples(capsys):
    for command in ("demo", "finetune", "eval", "generate", "export", "pretrain"):
        _, out, _ = run([command, "--help"], capsys)
        assert f"examples:\n  minift {command}" in out


@pytest.mark.parametrize("method", ["full", "lora", "pissa", "sorsa", "s2ft"])
def test_finetune_writes_the_adapter_or_merged_model_of_each_method(method, files, tmp_path, capsys):
    code, _, err = run(finetune(files, tmp_path / "run", method), capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert record["steps"] == 4
    assert record["method"]["method"] == method
    if method == "full":
        load_pretrained(tmp_path / "run" / "merged")
    else:
        assert (tmp_path / "run" / "adapter").is_dir()


def test_an_interrupted_finetune_resumes_to_the_same_adapter_as_an_uninterrupted_one(
    files, tmp_path, capsys, monkeypatch
):
    assert run(finetune(files, tmp_path / "a", "lora"), capsys)[0] == 0
    real, calls = minift.train.train_step, []

    def interrupted(*args, **kwargs):  # Ctrl-C before the third step: two steps done and saved
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(minift.train, "train_step", interrupted)
    code, _, err = run(finetune(files, tmp_path / "b", "lora"), capsys)
    assert code == 130
    assert "interrupted after step 2" in err
    monkeypatch.setattr(minift.train, "train_step", real)
    assert run(finetune(files, tmp_path / "b", "lora", "--resume"), capsys)[0] == 0
    a, _ = read_safetensors(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b, _ = read_safetensors(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_finetune_with_activation_checkpointing_trains_the_same_adapter(files, tmp_path, capsys):
    assert run(finetune(files, tmp_path / "a", "s2ft"), capsys)[0] == 0
    assert run(finetune(files, tmp_path / "b", "s2ft", "--activation-checkpointing"), capsys)[0] == 0
    assert json.loads((tmp_path / "b" / "finetune.json").read_text())["run"]["activation_checkpointing"]
    a, _ = read_safetensors(tmp_path / "a" / "adapter" / "adapter.safetensors")
    b, _ = read_safetensors(tmp_path / "b" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # the same gradients, so the same float32 adapter, bit for bit
        np.testing.assert_array_equal(a[key], b[key])


def test_generate_and_eval_use_the_adapter(files, tmp_path, capsys):
    run(finetune(files, tmp_path / "run", "s2ft"), capsys)
    adapter = tmp_path / "run" / "adapter"
    code, out, _ = run(
        [
            "generate",
            "--model",
            files["model"],
            "--adapter",
            adapter,
            "--question",
            "shift abc",
            "--max-new-tokens",
            3,
        ],
        capsys,
    )
    assert code == 0
    assert out.startswith("Q: shift abc\nA: ")
    code, out, _ = run(
        ["eval", "--model", files["model"], "--adapter", adapter, "--task", "shift", "--limit", 3], capsys
    )
    assert code == 0
    assert "exact match  all" in out
    assert "perplexity" in out


def test_export_writes_a_peft_adapter_and_a_merged_model_that_computes_the_adapted_logits(
    files, tmp_path, capsys
):
    run(finetune(files, tmp_path / "run", "pissa"), capsys)
    adapter = tmp_path / "run" / "adapter"
    code, _, err = run(
        [
            "export",
            "--model",
            files["model"],
            "--adapter",
            adapter,
            "--peft",
            tmp_path / "peft",
            "--merged",
            tmp_path / "merged",
        ],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    tokens = np.array([[1, 54, 31, 5, 70, 71]])
    adapted = attach_adapter(load_pretrained(files["model"]), adapter)
    merged = load_pretrained(tmp_path / "merged")
    assert_close(
        model_forward(merged, tokens, train=False)[0],
        model_forward(adapted, tokens, train=False)[0],
        rtol=1e-4,
        atol=1e-5,
        what="merged vs adapted logits",
    )


def test_pretrain_writes_a_model_folder_with_its_recipe_and_the_same_weights_each_time(tmp_path, capsys):
    for name in ("a", "b"):
        code, _, err = run(
            ["pretrain", "--out", tmp_path / name, "--steps", 2, "--batch-size", 4, "--no-progress"], capsys
        )
        assert code == 0, err
    recipe = json.loads((tmp_path / "a" / "pretrain_recipe.json").read_text())
    assert recipe["recipe"]["steps"] == 2
    assert load_pretrained(tmp_path / "a").config.n_kv_heads == 2
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------------
# user errors: non-zero exit, one line, no traceback


def test_a_missing_data_file_is_one_line(files, tmp_path, capsys):
    code, _, err = run(finetune({**files, "data": tmp_path / "nope.jsonl"}, tmp_path / "r", "lora"), capsys)
    assert_one_line_error(code, err, "nope.jsonl")


def test_a_bad_jsonl_line_is_one_line_naming_the_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    code, _, err = run(finetune({**files, "data": bad}, tmp_path / "r", "lora"), capsys)
    assert_one_line_error(code, err, "bad.jsonl:2")


def test_an_unknown_method_is_one_line_naming_the_known_ones(files, tmp_path, capsys):
    code, _, err = run(finetune(files, tmp_path / "r", "adapterx"), capsys)
    assert_one_line_error(code, err, "adapterx", "s2ft")


def test_an_adapter_of_another_model_is_one_line(files, tmp_path, capsys):
    other = _model_folder(tmp_path / "wide", 32)
    run(finetune({**files, "model": other}, tmp_path / "run", "lora"), capsys)
    code, _, err = run(
        ["generate", "--model", files["model"], "--adapter", tmp_path / "run" / "adapter", "--question", "x"],
        capsys,
    )
    assert_one_line_error(code, err)


def test_a_missing_model_folder_and_a_missing_argument_are_one_line(tmp_path, capsys):
    code, _, err = run(["eval", "--model", tmp_path / "absent"], capsys)
    assert_one_line_error(code, err, "absent")
    code, _, err = run(["finetune", "--data", "x.jsonl"], capsys)
    assert_one_line_error(code, err, "--method")


def test_exporting_to_peft_without_an_adapter_is_one_line(files, tmp_path, capsys):
    code, _, err = run(["export", "--model", files["model"], "--peft", tmp_path / "p"], capsys)
    assert_one_line_error(code, err, "--adapter")


def test_the_quick_demo_prints_one_row_per_method_and_writes_its_results(tmp_path, capsys):
    code, out, err = run(["demo", "--quick", "--out", tmp_path, "--jobs", 1], capsys)
    assert code == 0, err
    table = out[out.index("method ") :]
    for method in ("base", "full", "lora", "pissa", "sorsa", "s2ft"):
        assert f"\n{method} " in table
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["lora"]["trainable_parameters"] == rows["pissa"]["trainable_parameters"]
    assert abs(rows["s2ft"]["trainable_parameters"] / rows["lora"]["trainable_parameters"] - 1) < 0.05
    assert len(rows["full"]["losses"]) == report["config"]["steps"]


def test_eval_on_a_data_file_prints_exact_match_once(files, capsys):
    code, out, err = run(["eval", "--model", files["model"], "--data", files["data"], "--limit", 2], capsys)
    assert code == 0, err
    assert [line.split()[2] for line in out.splitlines() if line.startswith("exact match")] == ["all"]


def test_text_the_vocabulary_lacks_is_one_warning_line_and_the_command_still_runs(capsys):
    assert main(["generate", "--prompt", "Q: é", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("minift: warning: 1 token(s) of the text map to the unknown token")
    assert err.count("\n") == 1
