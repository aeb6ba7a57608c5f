"""Hostile input: every file format and command line minift reads, mutated at random (Hypothesis picks
the mutation seeds) and by hand-picked edge cases. The promise checked: only a MinIFTError escapes,
nothing hangs, an invalid value is never accepted, and a mutated artifact that loads either gives
exactly the original's numbers or reflects a well-typed change of setting. ``tests/fuzz_many.py`` runs
the same cases by the thousand.

A failed write must leave the previous good folder whole: each writer is interrupted after its weights
are written and the old folder is read back unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minift.errors import CheckpointError, ConfigError, DataError, MinIFTError
from minift.io.jsonio import loads
from minift.io.safetensors_io import read_safetensors, write_safetensors
from tests.fuzz_formats import FORMATS, build_templates, load_originals, run_case, run_cli_case, same


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    templates = build_templates(root / "templates")
    return templates, load_originals(templates), root


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1))
def test_a_mutated_file_fails_cleanly_or_loads_to_the_same_or_a_well_typed_change(world, fmt, seed):
    templates, originals, root = world
    out = run_case(templates, originals, fmt, seed, root / f"case-{fmt}")
    assert out.kind in ("error", "same", "changed"), f"{out.kind}: {out.what} -> {out.detail}"


# ----------------------------------------------------------------------------------------------------
# the strict JSON layer


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("9" * 5000, "a number of 5000 characters"),
        ("[" * 100_000 + "]" * 100_000, "nested more than"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": -Infinity}', "not a JSON number"),
        ('{"a": 1e999}', "overflows"),
        ('{"a": 1, "a": 2}', "'a' appears twice"),
        ('{"a": "\\ud800"}', "lone surrogate"),
        (b'{"a": "\xff"}', "not UTF-8"),
    ],
)
def test_strict_json_refuses_what_json_loads_lets_through(text, match):
    with pytest.raises(DataError, match=rf"^f\.json:.*{match}"):
        loads(text, "f.json", error=DataError)


# ----------------------------------------------------------------------------------------------------
# hand-picked cases, one per class of problem


def _copy(world, fmt):
    templates, _, root = world
    src = templates[fmt]
    dst = root / f"edit-{fmt}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src.parent if fmt == "checkpoint" else src, dst)
    return dst / src.name if fmt == "checkpoint" else dst


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _edit_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


CONFIG_CASES = [
    ("llama", {"model_type": ["llama"]}, "'model_type' must be a string"),
    ("gpt2", {"n_head": True}, "'n_head' must be an integer in \\[1, "),
    ("llama", {"num_hidden_layers": 10**12}, "'num_hidden_layers' must be an integer in \\[1, 1024\\]"),
    ("llama", {"num_attention_heads": "2"}, "'num_attention_heads' must be an integer in \\[1, "),
    ("llama", {"intermediate_size": 100.7}, "'intermediate_size' must be an integer in \\[1, "),
    ("llama", {"head_dim": 0}, "'head_dim' must be an integer in \\[1, "),
    ("llama", {"rms_norm_eps": True}, "'rms_norm_eps' must be a number"),
    ("llama", {"rope_theta": -1.0}, "'rope_theta' must be a positive number"),
    ("llama", {"rope_scaling": "linear"}, "'rope_scaling' must be a JSON object"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 1e-320}}, "factor must be .* float32 holds"),
    ("gpt2", {"layer_norm_epsilon": -1e-5}, "'layer_norm_epsilon' must be a number >= 0"),
    ("llama", {"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ("llama", {"eos_token_id": 2.0}, "eos_token_id must be an integer"),
    ("llama", {"bos_token_id": True}, "'bos_token_id' must be an integer"),
    ("llama", {"pad_token_id": 8}, "'pad_token_id' must be an integer in \\[0, 7\\]"),
]


@pytest.mark.parametrize(("fmt", "change", "match"), CONFIG_CASES)
def test_an_ill_typed_or_absurd_config_value_is_refused_naming_the_file_and_key(world, fmt, change, match):
    from minift.io.hub import load_pretrained

    folder = _copy(world, fmt)
    _edit_json(folder / "config.json", lambda d: d.update(change))
    with pytest.raises(ConfigError, match=match) as err:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


def test_an_eos_id_outside_the_vocabulary_in_generation_config_names_that_file(world):
    from minift.io.hub import load_pretrained

    folder = _copy(world, "llama")
    _edit_json(folder / "generation_config.json", lambda d: d.update(eos_token_id=10**30))
    with pytest.raises(ConfigError, match=r"generation_config.json: 'eos_token_id' must be"):
        load_pretrained(folder)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h["model.norm.weight"].update(shape=[2**32, 2**32]), "bytes of data for shape"),
        (lambda h: h["model.norm.weight"].update(dtype=["F32"]), "unsupported dtype"),
        (lambda h: h["model.norm.weight"].update(shape=[True, 8]), "list of at most 32 non-negative"),
        (lambda h: h["model.norm.weight"].update(shape=[0, 2**70]), "list of at most 32 non-negative"),
        (lambda h: h["model.norm.weight"].update(dtype="I32"), "dtype I32, expected one of"),
    ],
)
def test_a_hostile_safetensors_header_is_refused_before_anything_is_allocated(world, edit, match):
    from minift.io.hub import load_pretrained

    folder = _copy(world, "llama")
    _edit_header(folder / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(folder)


@pytest.mark.parametrize(
    ("fmt", "file"),
    [("llama", "model.safetensors"), ("peft", "adapter_model.safetensors"), ("s2ft", "adapter.safetensors"),
     ("checkpoint", "optimizer.safetensors")],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_weight_holding_nan_or_inf_is_refused_naming_the_file_and_tensor(world, fmt, file, bad):
    folder = _copy(world, fmt)
    tensors, meta = read_safetensors(folder / file)
    name = next(k for k, a in sorted(tensors.items()) if a.dtype.kind == "f")
    tensors[name].flat[0] = bad
    write_safetensors(folder / file, tensors, metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{file}: tensor '{name}' holds NaN or infinite values"):
        FORMATS[fmt].load(folder)


@pytest.mark.parametrize(
    ("weight_map", "match"),
    [
        ({}, "'weight_map' is empty"),
        ({"model.norm.weight": 3}, "must map tensor names to shard file names"),
        ({"model.norm.weight": "../llama/model.safetensors"}, "not a file in"),
        ({"model.norm.weight": "/etc/passwd"}, "not a file in"),
    ],
)
def test_a_hostile_shard_index_is_refused(world, weight_map, match):
    from minift.io.hub import load_pretrained

    folder = _copy(world, "sharded")
    _edit_json(folder / "model.safetensors.index.json", lambda d: d.update(weight_map=weight_map))
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(folder)


PEFT_CASES = [
    (lambda c: c.update(lora_alpha=float("inf")), None, "not a JSON number"),
    (lambda c: c.update(use_rslora="false"), None, "'use_rslora' must be true or false"),
    (lambda c: c.update(r=True), None, "'r' must be a positive integer"),
    (lambda c: c.update(layer_replication=[[0, 1]]), None, "layer_replication=.* is not supported"),
    (lambda c: c.update(exclude_modules=["q_proj"]), None, "exclude_modules=.* is not supported"),
    (lambda c: c.update(lora_bias=True), None, "lora_bias=True is not supported"),
    (lambda c: c.update(rank_pattern={"q_proj": "4"}), None, r"rank_pattern\['q_proj'\] must be a positive"),
    (lambda c: c.update(alpha_pattern={"q_proj": -1.0}), None, "alpha_pattern"),
    (lambda c: c.update(rank_pattern={"(a+)+$": 4}), None, "is not a module path"),
    (lambda c: c.update(use_dora=True), None, "use_dora=True is not supported"),
    (None, lambda h: h[next(k for k in h if "lora_A" in k)].update(dtype="I32"), "dtype I32; LoRA factors"),
    (None, "alias", "not written as PEFT"),
]


@pytest.mark.parametrize(("config_edit", "header_edit", "match"), PEFT_CASES)
def test_a_peft_adapter_with_an_unsupported_or_ill_typed_setting_is_refused(
    world, config_edit, header_edit, match
):
    from tests.fuzz_formats import _load_peft

    folder = _copy(world, "peft")
    if config_edit is not None:
        text = json.dumps(json.loads((folder / "adapter_config.json").read_text()) | {}, allow_nan=True)
        doc = json.loads(text)
        config_edit(doc)
        (folder / "adapter_config.json").write_text(json.dumps(doc, allow_nan=True))
    weights = folder / "adapter_model.safetensors"
    if header_edit == "alias":  # layers.00 beside layers.0: whichever came last would win
        tensors, meta = read_safetensors(weights)
        key = next(k for k in tensors if ".layers.0." in k)
        tensors[key.replace(".layers.0.", ".layers.00.")] = tensors[key] + 1
        write_safetensors(weights, tensors, metadata=meta)
    elif header_edit is not None:
        _edit_header(weights, header_edit)
    with pytest.raises(CheckpointError, match=match):
        _load_peft(folder)


def _drop_first_block(index):
    index["blocks"].pop(next(iter(index["blocks"])))


S2FT_CASES = [
    (lambda ix: ix.update(version=2), None, "adapter version 2"),
    (lambda ix: ix.update(version="1"), None, "'version' must be an integer"),
    (_drop_first_block, None, "tensors do not match the blocks"),
    (lambda ix: next(iter(ix["blocks"].values())).update(shape=["8", 8]), None, "'shape' must be a list"),
    (lambda ix: next(iter(ix["blocks"].values())).update(shape=[8.0, 8]), None, "'shape' must be a list"),
    (None, lambda h: h[next(k for k in h if k.endswith(".delta"))].update(dtype="I32"), "S2FT deltas"),
]


@pytest.mark.parametrize(("index_edit", "header_edit", "match"), S2FT_CASES)
def test_an_s2ft_adapter_that_does_not_add_up_is_refused(world, index_edit, header_edit, match):
    from minift.methods.s2ft import load_adapter

    folder = _copy(world, "s2ft")
    if index_edit is not None:
        _edit_json(folder / "adapter.json", index_edit)
    if header_edit is not None:
        _edit_header(folder / "adapter.safetensors", header_edit)
    with pytest.raises(CheckpointError, match=match):
        load_adapter(folder)


def test_s2ft_keys_with_unicode_or_padded_digits_are_refused_and_serving_errors_name_the_folder(world):
    from minift.methods.s2ft import load_adapter
    from minift.methods.s2ft.adapter import parse_key
    from minift.serving import check_adapter
    from tests.fuzz_formats import _tiny

    assert parse_key("blocks.1.q") == (1, "q")
    for key in ("blocks.².q", "blocks.٠.q", "blocks.01.q", "blocks.-1.q", "blocks.1.x", "blocks.1"):
        assert parse_key(key) is None, key
    folder = _copy(world, "s2ft")
    adapter = load_adapter(folder)
    with pytest.raises(CheckpointError, match=rf"^{folder}: the S2FT adapter was made for"):
        check_adapter(_tiny("gpt2"), adapter)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s["rng"]["state"].update(state=-1), r"'state' must be an integer in \[0, "),
        (lambda s: s["rng"]["state"].update(inc=2**200), r"'inc' must be an integer in \[0, "),
        (lambda s: s["rng"]["state"].update(inc=float(s["rng"]["state"]["inc"])), "'inc' must be an integer"),
        (lambda s: s["rng"].update(has_uint32="0"), r"'has_uint32' must be an integer in \[0, 1\]"),
        (lambda s: s["rng"].update(uinteger=True), "'uinteger' must be an integer"),
        (lambda s: s["rng"].update(bit_generator="MT19937"), "'bit_generator' must be one of"),
        (lambda s: s.update(step=True), r"'step' must be an integer in \[0, "),
        (lambda s: s.update(train_config=[]), "'train_config' must be a JSON object"),
    ],
)
def test_a_checkpoint_rng_state_numpy_would_take_is_refused_so_resume_stays_bitwise(world, edit, match):
    from minift.io.checkpoint import load_checkpoint

    folder = _copy(world, "checkpoint")
    _edit_json(folder / "state.json", edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(folder)


@pytest.mark.parametrize("name", ["step-0000000²", "step-٠٠٠٠٠٠٠3", "../step-00000003", "step-3"])
def test_a_latest_file_naming_no_step_folder_in_ascii_digits_is_refused(world, name):
    from minift.io.checkpoint import load_checkpoint

    folder = _copy(world, "checkpoint")
    (folder.parent / "latest").write_text(name)
    with pytest.raises(CheckpointError, match="not a step folder of this run"):
        load_checkpoint(folder.parent)


def test_tokenizer_ids_outside_the_vocabulary_are_refused(world):
    from minift.data import Tokenizer

    folder = _copy(world, "tokenizer")
    _edit_json(folder / "generation_config.json", lambda d: d.update(eos_token_id=[2, 10**30]))
    with pytest.raises(DataError, match=r"eos_token_id 10{30} is not an id of the 8-token vocabulary"):
        Tokenizer.from_pretrained(folder)


def test_a_jsonl_line_with_a_lone_surrogate_is_a_data_error_naming_the_line(tmp_path):
    from minift.data.datasets import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ab"}\n{"text": "a\\ud800"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: .*lone surrogate"):
        read_jsonl(path)


# ----------------------------------------------------------------------------------------------------
# the command line


def _cli(argv):
    from minift.tools.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


@pytest.mark.parametrize(
    "option",
    [("--max-new-tokens", "-1"), ("--max-new-tokens", "0"), ("--top-p", "0"), ("--top-p", "nan"),
     ("--temperature", "-1"), ("--temperature", "inf"), ("--top-k", "-2"), ("--seed", "-1")],
)
def test_an_out_of_range_number_on_the_command_line_exits_2_with_one_line(world, option):
    rc, err = _cli(["generate", "--model", str(world[0]["llama"]), "--prompt", "ab", *option])
    assert rc == 2, err
    assert err.count("\n") == 1, err
    assert option[0] in err


@pytest.mark.parametrize(
    "option",
    [("--steps", "0"), ("--checkpoint-every", "-1"), ("--batch-size", "0"), ("--lr", "-1e-3"),
     ("--dropout", "1"), ("--rank", "0"), ("--max-length", "1")],
)
def test_finetune_refuses_out_of_range_numbers_before_reading_anything(tmp_path, option):
    rc, err = _cli(["finetune", "--data", str(tmp_path / "none.jsonl"), "--method", "lora",
                    "--out", str(tmp_path / "o"), *option])
    assert rc == 2, err
    assert err.count("\n") == 1, err
    assert option[0] in err
    assert not (tmp_path / "o").exists()


_HOSTILE_ARGS = ["-1", "0", "1", "2", "nan", "inf", "-inf", "1e999", "²", "٣", "", "x", "1.5", "9" * 40]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    option=st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"]),
    value=st.sampled_from(_HOSTILE_ARGS),
    adapter=st.sampled_from([None, "peft", "s2ft", "llama", "nowhere"]),
)
def test_generate_with_hostile_arguments_exits_0_or_2_without_a_traceback(world, option, value, adapter):
    templates = world[0]
    argv = ["generate", "--model", str(templates["llama"]), "--prompt", "ab", "--max-new-tokens", "2"]
    if adapter is not None:
        argv += ["--adapter", str(templates.get(adapter, world[2] / adapter))]
    rc, err = _cli([*argv, f"{option}={value}"])
    assert rc in (0, 2), err
    assert "Traceback" not in err
    if rc == 2:
        assert err.count("\n") == 1, err


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1))
def test_any_command_with_hostile_numbers_or_mutated_files_exits_0_or_2_in_one_line(world, seed):
    templates, _, root = world
    out = run_cli_case(templates, seed, root / "cli-case")
    assert out.kind in ("error", "same"), f"{out.what} -> {out.detail}"


# ----------------------------------------------------------------------------------------------------
# writes that fail half-way


class _Boom(Exception):
    pass


def _fail_after_weights(monkeypatch, module):
    """Make ``module.write_safetensors`` write the file and then fail, as a full disk would next."""
    real = module.write_safetensors

    def write_then_fail(path, tensors, **kw):
        real(path, tensors, **kw)
        raise _Boom

    monkeypatch.setattr(module, "write_safetensors", write_then_fail)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _writers():
    from minift.io import checkpoint, hub, peft
    from minift.methods.s2ft import adapter as s2ft_adapter

    def peft_export(world, folder):
        from minift.methods.lora import LoRAConfig, apply_lora
        from tests.fuzz_formats import _tiny

        peft.export_peft_adapter(apply_lora(_tiny(seed=9), LoRAConfig(r=2), np.random.default_rng(9)), folder)

    def s2ft_save(world, folder):
        from minift.methods import s2ft

        s2ft.save_adapter(s2ft.load_adapter(world[0]["s2ft"]), folder)

    def model_save(world, folder):
        from tests.fuzz_formats import _tiny

        hub.save_pretrained(_tiny(seed=9), folder)

    def checkpoint_save(world, folder):
        from minift.model import set_trainable, trainable_parameters
        from minift.optim import AdamW
        from tests.fuzz_formats import _tiny

        model = set_trainable(_tiny(seed=9), True)
        checkpoint.save_checkpoint(folder.parent, model, AdamW(trainable_parameters(model)), step=3,
                                   rng=np.random.default_rng(9), train_config={})

    return [("peft", peft, peft_export), ("s2ft", s2ft_adapter, s2ft_save), ("llama", hub, model_save),
            ("checkpoint", checkpoint, checkpoint_save)]


@pytest.mark.parametrize("case", range(4), ids=["peft", "s2ft", "model", "checkpoint"])
def test_a_write_failing_after_the_weights_leaves_the_previous_folder_intact(world, monkeypatch, case):
    fmt, module, write = _writers()[case]
    folder = _copy(world, fmt)
    (folder / "notes.txt").write_text("kept")
    before = _snapshot(folder.parent if fmt == "checkpoint" else folder)
    _fail_after_weights(monkeypatch, module)
    with pytest.raises(_Boom):
        write(world, folder)
    after = _snapshot(folder.parent if fmt == "checkpoint" else folder)
    assert after == before
    monkeypatch.undo()
    if fmt != "checkpoint":  # (the checkpoint template loads from its run folder; compared above)
        assert same(FORMATS[fmt].load(folder), world[1][fmt])
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_only_minift_errors_escape_loading_hostile_json_of_any_shape():
    @settings(max_examples=60, deadline=None)
    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                        max_leaves=8))
    def check(value):
        from minift.io.hfconfig import check_hf_config
        from minift.io.hub import config_from_hf

        cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
               "num_hidden_layers": 1, "num_attention_heads": 2}
        for key in [*cfg, "rope_scaling", "head_dim", "rms_norm_eps", "eos_token_id"]:
            with contextlib.suppress(MinIFTError):
                check_hf_config(cfg | {key: value}, "c.json")
                config_from_hf(cfg | {key: value}, source="c.json")

    check()
