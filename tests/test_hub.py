"""Hugging Face folders in and out (``minift.io.hub``, ``minift.io.safetensors_io``).

Properties: minift → folder → minift is bit-exact for every architecture, and a model with an adapter
is saved as the dense model it computes; the transformers 4 and 5 config formats describe the same
model; a sharded checkpoint loads like a single file; bf16 widens to float32 exactly and float32 rounds
to bf16 to nearest even; GPT-2 files without the ``transformer.`` prefix and with mask buffers, and
Llama files with ``rotary_emb.inv_freq``, load by exact name rules. Every bad input — missing folder or
file, pickle-only folder, truncated file, bad header, missing, extra, misshapen or non-float tensor,
unsupported architecture or RoPE type — raises a project error naming the file and the key.
The outside oracle (transformers itself) is in ``tests/crosscheck/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from minift.config import ModelConfig, RopeScaling
from minift.errors import CheckpointError, ConfigError
from minift.io.hub import (
    config_from_hf,
    config_to_hf,
    load_pretrained,
    model_state,
    save_pretrained,
)
from minift.io.safetensors_io import (
    bf16_to_float32,
    float32_to_bf16,
    read_header,
    read_safetensors,
    write_safetensors,
)
from minift.methods.lora import LowRankLinear
from minift.model import init_model, model_forward
from minift.testing import assert_close
from tests.strategies import configs

LLAMA = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=4, n_kv_heads=2,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
GPT2 = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=12, n_layers=2, n_heads=2, arch="gpt2",
                   qkv_bias=True, o_bias=True, mlp_bias=True, max_position_embeddings=10, norm_eps=1e-5,
                   tie_word_embeddings=True)


def random_model(config: ModelConfig, seed: int = 0):
    """A model whose every array (norms and biases included) is random, so no swap can go unnoticed."""
    model = init_model(config, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for array in model_state(model).values():
        array[...] = rng.normal(0.0, 0.5, array.shape)
    return model


def saved(config: ModelConfig, folder: Path, seed: int = 0) -> Path:
    return save_pretrained(random_model(config, seed), folder)


def assert_same_state(a, b) -> None:
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


# ----------------------------------------------------------------------------------------------------
# definition: round trips


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), seed=st.integers(0, 2**16))
@example(config=LLAMA, seed=0)
@example(config=GPT2, seed=0)
def test_a_model_saved_and_loaded_again_is_bit_identical(config, seed):
    model = random_model(config, seed)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_pretrained(model, Path(tmp) / "m")
        except ConfigError:  # e.g. a Mistral with biases: no HF config.json can express it
            assume(False)
        loaded = load_pretrained(Path(tmp) / "m")
    assert loaded.config == model.config
    assert_same_state(loaded, model)


def test_float64_models_round_trip_in_float64(tmp_path):
    model = init_model(LLAMA, np.random.default_rng(0), dtype=np.float64)
    loaded = load_pretrained(save_pretrained(model, tmp_path / "m"), dtype=np.float64)
    assert_same_state(loaded, model)


def test_a_model_with_an_adapter_is_saved_as_the_dense_model_it_computes(tmp_path):
    model = random_model(LLAMA)
    rng = np.random.default_rng(5)
    q = model.blocks[1].q
    model.blocks[1].q = LowRankLinear(q.weight, rng.standard_normal((2, 8)).astype(np.float32),
                                      rng.standard_normal((8, 2)).astype(np.float32), 0.5)
    loaded = load_pretrained(save_pretrained(model, tmp_path / "m"))
    np.testing.assert_array_equal(loaded.blocks[1].q.weight, model.blocks[1].q.dense_weight())
    tokens = np.array([[1, 5, 7, 3, 2]])
    assert_close(model_forward(loaded, tokens, train=False)[0], model_forward(model, tokens, train=False)[0],
                 rtol=1e-5, atol=1e-5, what="logits")


def test_saving_writes_hf_metadata_and_no_temporary_files_and_replaces_an_existing_folder(tmp_path):
    folder = saved(LLAMA, tmp_path / "m")
    assert read_header(folder / "model.safetensors")[1] == {"format": "pt"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    (folder / "notes.txt").write_text("kept")
    save_pretrained(random_model(LLAMA, seed=9), folder)
    assert_same_state(load_pretrained(folder), random_model(LLAMA, seed=9))
    assert (folder / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_config_no_hf_format_can_express_is_refused_before_anything_is_written(tmp_path):
    mistral_with_bias = LLAMA.replace(arch="mistral", qkv_bias=True)
    with pytest.raises(ConfigError, match="mistral"):
        save_pretrained(init_model(mistral_with_bias, np.random.default_rng(0)), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_files_generation_config_and_eos_ids_travel_with_the_model(tmp_path):
    src = saved(LLAMA, tmp_path / "src")
    (src / "tokenizer.json").write_text('{"model": "stub"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "temperature": 0.6}))
    model = load_pretrained(src)
    assert model.meta["tokenizer_path"] == str(src / "tokenizer.json")
    assert model.meta["generation_config"]["temperature"] == 0.6
    assert model.config.eos_token_id == (2, 7)  # config.json's 2 and generation_config.json's 2, 7
    out = save_pretrained(model, tmp_path / "out")
    assert (out / "tokenizer.json").read_text() == '{"model": "stub"}'
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6


# ----------------------------------------------------------------------------------------------------
# config.json: transformers 4 and 5 formats


def hf_llama_config(**changes) -> dict:
    cfg = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 64}
    return cfg | changes


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize(
    ("v4", "v5"),
    [
        ({"rope_theta": 5e5, "rope_scaling": LLAMA3},
         {"rope_parameters": LLAMA3 | {"rope_theta": 5e5}}),
        ({"rope_theta": 100.0, "rope_scaling": {"type": "linear", "factor": 2.0}},  # legacy "type" key
         {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}}),
        ({"rope_theta": 1e6, "rope_scaling": None},
         {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    ],
)
def test_transformers_4_and_5_config_formats_give_the_same_model(v4, v5):
    a, b = config_from_hf(hf_llama_config(**v4)), config_from_hf(hf_llama_config(**v5))
    assert a == b
    assert a.rope_theta == (v4["rope_theta"])


def test_llama3_original_context_defaults_to_max_position_embeddings():
    scaling = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    config = config_from_hf(hf_llama_config(rope_parameters=scaling, max_position_embeddings=128))
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 128)


def test_a_written_config_reads_back_to_the_same_model_config():
    config = LLAMA.replace(rope_theta=5e5, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32),
                           eos_token_id=(2, 3))
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


def test_qwen2_has_q_k_v_biases_and_mistral_none_whatever_the_config_says():
    qwen = config_from_hf(hf_llama_config(model_type="qwen2", attention_bias=True))
    mistral = config_from_hf(hf_llama_config(model_type="mistral", attention_bias=True, mlp_bias=True))
    assert (qwen.qkv_bias, qwen.o_bias, qwen.mlp_bias) == (True, False, False)
    assert (mistral.qkv_bias, mistral.o_bias, mistral.mlp_bias) == (False, False, False)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model_type": "falcon"}, "unsupported architecture model_type='falcon'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE type 'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported RoPE type 'dynamic'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"hidden_size": None}, "missing required key 'hidden_size'"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
        ({"rope_scaling": {"rope_type": "linear"}}, "needs a 'factor'"),
        ({"rope_theta": "large"}, "rope_theta and the RoPE scaling parameters must be numbers"),
        ({"eos_token_id": ["2"]}, "eos_token_id must be an integer or a list of integers"),
    ],
)
def test_unsupported_or_invalid_configs_raise_a_config_error_naming_the_file_and_key(
    tmp_path, changes, match
):
    folder = saved(LLAMA, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps(hf_llama_config(**changes)))
    with pytest.raises(ConfigError, match=match) as err:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


def test_gpt2_with_the_exact_erf_gelu_is_refused():
    with pytest.raises(ConfigError, match="activation_function 'gelu'"):
        config_from_hf({"model_type": "gpt2", "vocab_size": 16, "n_embd": 8, "n_layer": 1, "n_head": 2,
                        "n_positions": 8, "activation_function": "gelu"})


# ----------------------------------------------------------------------------------------------------
# layouts: shards, optional prefixes, skipped buffers


def reshard(folder: Path, n_shards: int = 2) -> None:
    """Split model.safetensors into shards plus an index, as save_pretrained(max_shard_size=…) does."""
    tensors, meta = read_safetensors(folder / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for k in range(n_shards):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::n_shards]}
        write_safetensors(folder / shard, part, metadata=meta)
        weight_map |= dict.fromkeys(part, shard)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def test_a_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    folder = saved(GPT2, tmp_path / "m")
    reshard(folder, 3)
    assert_same_state(load_pretrained(folder), random_model(GPT2))


def test_a_shard_index_that_disagrees_with_the_shards_is_refused(tmp_path):
    folder = saved(LLAMA, tmp_path / "m")
    reshard(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"safetensors: does not match .*index.json.*'{key}'"):
        load_pretrained(folder)
    index["weight_map"][key] = "model-00009-of-00009.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00009-of-00009.safetensors.*not a file"):
        load_pretrained(folder)


def rewrite(folder: Path, edit) -> None:
    """Apply ``edit(tensors) -> tensors`` to a folder's model.safetensors."""
    tensors, meta = read_safetensors(folder / "model.safetensors")
    write_safetensors(folder / "model.safetensors", edit(tensors), metadata=meta)


def test_gpt2_files_without_the_transformer_prefix_and_with_mask_buffers_load_the_same(tmp_path):
    folder = saved(GPT2, tmp_path / "m")

    def openai_layout(tensors):
        out = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        for i in range(GPT2.n_layers):
            out[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 10, 10), dtype=np.float32))
            out[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
        return out

    rewrite(folder, openai_layout)
    assert_same_state(load_pretrained(folder), random_model(GPT2))


def test_llama_rotary_inv_freq_buffers_are_skipped_by_their_exact_name_only(tmp_path):
    folder = saved(LLAMA, tmp_path / "m")
    inv_freq = np.ones(1, dtype=np.float32)
    rewrite(folder, lambda t: t | {"model.layers.1.self_attn.rotary_emb.inv_freq": inv_freq})
    assert_same_state(load_pretrained(folder), random_model(LLAMA))
    rewrite(folder, lambda t: t | {"model.layers.1.self_attn.rotary_emb.inv_freq.x": inv_freq})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.1.self_attn.rotary_emb"):
        load_pretrained(folder)


def test_a_tied_head_stored_anyway_must_equal_the_embedding(tmp_path):
    folder = saved(GPT2, tmp_path / "m")
    rewrite(folder, lambda t: t | {"lm_head.weight": t["transformer.wte.weight"]})
    assert_same_state(load_pretrained(folder), random_model(GPT2))
    rewrite(folder, lambda t: t | {"lm_head.weight": t["transformer.wte.weight"] + 1})
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' differs from the token embedding"):
        load_pretrained(folder)


# ----------------------------------------------------------------------------------------------------
# bf16 and fp16


def test_every_bf16_bit_pattern_widens_to_float32_exactly_and_rounds_back_to_itself():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    f = bf16_to_float32(bits)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f.view(np.uint32), bits.astype(np.uint32) << 16)
    finite = ~np.isnan(f)
    np.testing.assert_array_equal(float32_to_bf16(f)[finite], bits[finite])
    assert (float32_to_bf16(f)[~finite] == 0x7FC0).all()


@given(x=st.floats(width=32, allow_nan=False, allow_infinity=False))
@example(x=1.0 + 2.0**-8)  # halfway between 1 and 1 + 2⁻⁷: the even neighbour, 1, wins
@example(x=1.0 + 3 * 2.0**-8)  # halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: 1 + 2⁻⁶ is even
@example(x=3.3961775e38)  # past the largest bf16 by half an ulp or more: inf, as in torch
def test_float32_rounds_to_the_nearest_bf16_ties_to_even(x):
    x32 = np.float32(x)
    down = (np.array(x32).view(np.uint32) >> 16).astype(np.uint16)  # truncation, toward zero
    up = down + np.uint16(1)
    lo, hi = (float(bf16_to_float32(np.array(b))) for b in (down, up))
    if not np.isfinite(hi):  # IEEE 754 rounds past the largest bf16 as if 2¹²⁸ were its neighbour
        hi = math.copysign(2.0**128, hi)
    got = float32_to_bf16(np.array(x32))
    d_lo, d_hi = abs(float(x32) - lo), abs(hi - float(x32))
    expected = down if d_lo < d_hi or (d_lo == d_hi and down % 2 == 0) else up
    assert got == expected


def test_bf16_and_fp16_checkpoints_load_as_exactly_widened_float32(tmp_path):
    model = random_model(LLAMA)
    state = model_state(model)
    for code, store, widen in (
        ("BF16", lambda t: t, lambda a: bf16_to_float32(float32_to_bf16(a))),
        ("F16", lambda t: {k: v.astype(np.float16) for k, v in t.items()},
         lambda a: a.astype(np.float16).astype(np.float32)),
    ):
        folder = save_pretrained(model, tmp_path / code)
        tensors, meta = read_safetensors(folder / "model.safetensors")
        write_safetensors(folder / "model.safetensors", store(tensors), metadata=meta, bf16=code == "BF16")
        assert {i.dtype for i in read_header(folder / "model.safetensors")[0].values()} == {code}
        loaded = model_state(load_pretrained(folder))
        for key, a in state.items():
            assert loaded[key].dtype == np.float32
            np.testing.assert_array_equal(loaded[key], widen(a), err_msg=f"{code} {key}")


# ----------------------------------------------------------------------------------------------------
# bad input: every error names the file and the key


def test_a_missing_folder_or_config_or_weights_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_pretrained(tmp_path / "nowhere")
    folder = saved(LLAMA, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors"):
        load_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config.json"):
        load_pretrained(folder)


def test_a_folder_with_only_pickle_weights_is_refused_with_the_reason_and_the_conversion(tmp_path):
    folder = saved(LLAMA, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin") as err:
        load_pretrained(folder)
    assert "execute arbitrary code" in str(err.value)
    assert "save_pretrained" in str(err.value)


def test_a_config_json_that_is_not_json_is_a_config_error_naming_it(tmp_path):
    folder = saved(LLAMA, tmp_path / "m")
    (folder / "config.json").write_text("{'model_type': llama")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_pretrained(folder)


def corrupt_bytes(folder: Path, how: str) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if how == "truncated":
        path.write_bytes(data[:-10])
    elif how == "trailing bytes":
        path.write_bytes(data + b"\0" * 4)
    elif how == "header beyond file":
        path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    elif how == "bad header json":
        path.write_bytes(data[:8] + b"#" + data[9:])
    elif how == "tiny file":
        path.write_bytes(b"\x01\x02")
    elif how in ("wrong byte count", "duplicate name"):
        header = json.loads(data[8:8 + n])
        header["model.norm.weight"]["shape"] = [7]
        raw = json.dumps(header).encode()
        if how == "duplicate name":  # the same tensor twice: which entry to believe is not defined
            entry = json.dumps({"model.norm.weight": header["model.norm.weight"]})[1:-1]
            raw = raw[:-1] + b", " + entry.encode() + b"}"
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("truncated", "tensor '.*' ends at byte .* truncated"),
        ("trailing bytes", "data ends at byte"),
        ("header beyond file", "header length .* beyond"),
        ("bad header json", "header is not valid JSON"),
        ("tiny file", "too short"),
        ("wrong byte count", "tensor 'model.norm.weight': .* bytes of data for shape \\[7\\]"),
        ("duplicate name", "names tensor 'model.norm.weight' twice"),
    ],
)
def test_a_corrupt_safetensors_file_is_a_checkpoint_error_naming_the_file(tmp_path, how, match):
    folder = saved(LLAMA, tmp_path / "m")
    corrupt_bytes(folder, how)
    with pytest.raises(CheckpointError, match=match) as err:
        load_pretrained(folder)
    assert str(folder / "model.safetensors") in str(err.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"},
         "missing tensor 'model.layers.1.mlp.up_proj.weight', expected shape \\[12, 8\\]"),
        (lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"},
         "missing tensor 'lm_head.weight'.*tie_word_embeddings=false"),
        (lambda t: t | {"model.layers.0.self_attn.o_proj.bias": np.zeros(8, np.float32)},
         "unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"),
        (lambda t: t | {"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 8), np.float32)},
         "tensor 'model.layers.0.self_attn.k_proj.weight' has shape \\[8, 8\\], expected \\[4, 8\\]"),
        (lambda t: t | {"model.norm.weight": np.zeros(8, np.int32)},
         "tensor 'model.norm.weight' has dtype I32"),
    ],
    ids=["missing", "missing head", "extra", "misshapen", "integer"],
)
def test_a_missing_extra_misshapen_or_integer_tensor_is_a_checkpoint_error_naming_it(tmp_path, edit, match):
    folder = saved(LLAMA, tmp_path / "m")
    rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=match) as err:
        load_pretrained(folder)
    assert "model.safetensors" in str(err.value)


def test_a_header_over_the_readers_limit_is_named_as_such_not_as_truncation(tmp_path, monkeypatch):
    from minift.io import safetensors_io

    path = tmp_path / "t.safetensors"
    safetensors_io.write_safetensors(path, {"x": np.zeros(3, np.float32)})
    monkeypatch.setattr(safetensors_io, "MAX_HEADER_BYTES", 16)
    with pytest.raises(CheckpointError, match=rf"{path}: header length \d+ exceeds the 16-byte limit"):
        safetensors_io.read_header(path)


def test_a_crash_while_replacing_a_saved_model_never_leaves_a_mix_of_old_and_new(tmp_path, monkeypatch):
    folder = saved(LLAMA, tmp_path / "m")
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        if Path(dst).parent == folder:  # a file published into the saved folder
            calls.append(dst)
            if len(calls) > 1:  # the process dies after publishing one file
                raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with contextlib.suppress(OSError):
        save_pretrained(random_model(LLAMA.replace(norm_eps=1e-3), seed=9), folder)
    monkeypatch.undo()
    loaded = load_pretrained(folder)  # whichever model the folder holds, it holds all of it
    expected = random_model(LLAMA, seed=9) if loaded.config.norm_eps == 1e-3 else random_model(LLAMA)
    assert_same_state(loaded, expected)
