"""An instruction model from the command line: chat data, adapters that find their base model, and
S2FT exported as an exact PEFT LoRA adapter."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from minift.data.tokenizer import Tokenizer
from minift.io.hub import load_pretrained, save_pretrained
from minift.io.peft import CONFIG_NAME, WEIGHTS_NAME
from minift.io.provenance import PROVENANCE
from minift.io.s2ft_peft import lora_form
from minift.io.safetensors_io import read_safetensors
from minift.model import init_model, model_forward
from minift.testing import assert_close
from minift.tools.finetune import attach_adapter, load_with_adapter, merged_model
from tests.chat_fixtures import CONVERSATIONS, write_chat_tokenizer
from tests.test_cli import run
from tests.toy import task_world_config


def chat_model(folder, seed: int = 0):
    tok_dir = write_chat_tokenizer(folder.parent / f"tok-{folder.name}", "chatml")
    tok = Tokenizer.from_pretrained(tok_dir)
    end = tok.hf.token_to_id("<|im_end|>")
    config = replace(task_world_config(16), vocab_size=tok.vocab_size, bos_token_id=tok.hf.token_to_id(
        "<|im_start|>"), eos_token_id=end, pad_token_id=tok.hf.token_to_id("<|endoftext|>"))
    model = init_model(config, np.random.default_rng(seed), std=0.1)
    return save_pretrained(model, folder, tokenizer_path=tok_dir)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    model = chat_model(root / "chat-model")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 4))
    argv = ["finetune", "--model", model, "--data", data, "--method", "s2ft", "--heads", 1, "--channels", 4,
            "--s2ft-head-targets", "o,v", "--s2ft-channel-targets", "down,up",
            "--out", root / "run", "--steps", 3, "--batch-size", 4, "--no-progress"]
    return {"root": root, "model": model, "data": data, "argv": argv}


def test_finetune_on_chat_data_records_the_base_and_the_selection(chat_run, capsys):
    code, out, err = run(chat_run["argv"], capsys)
    assert code == 0, err
    adapter = chat_run["root"] / "run" / "adapter"
    assert json.loads((adapter / PROVENANCE).read_text())["base_model"] == str(chat_run["model"].resolve())
    record = json.loads((chat_run["root"] / "run" / "finetune.json").read_text())
    s2ft = record["s2ft"]
    assert (record["method"]["heads"], record["method"]["channels"]) == (1, 4)
    assert s2ft["config"]["head_targets"] == ["o", "v"]
    assert s2ft["config"]["channel_targets"] == ["down", "up"]
    assert [len(layer["heads"]) for layer in s2ft["layers"].values()] == [1, 1]
    assert [len(layer["channels"]) for layer in s2ft["layers"].values()] == [4, 4]
    assert "trainable parameters" in out
    assert "layer 0: heads" in out


def test_generate_and_eval_with_only_the_adapter_load_its_base(chat_run, capsys):
    adapter = chat_run["root"] / "run" / "adapter"
    code, out, err = run(["generate", "--adapter", adapter, "--chat", "Reverse abc", "--max-new-tokens", 4],
                         capsys)
    assert code == 0, err
    assert out.startswith("user: Reverse abc\nassistant: ")
    assert str(chat_run["model"]) in err
    code, out, err = run(["eval", "--adapter", adapter, "--data", chat_run["data"], "--limit", 2], capsys)
    assert code == 0, err
    assert "perplexity" in out
    assert "exact match  chat" in out


def test_a_mismatched_base_is_one_clear_line(chat_run, tmp_path, capsys):
    other = chat_model(tmp_path / "other", seed=1)  # same shapes, other weights
    adapter = chat_run["root"] / "run" / "adapter"
    code, _, err = run(["generate", "--model", other, "--adapter", adapter, "--chat", "x"], capsys)
    assert code == 2
    assert "another base model" in err
    assert "weights" in err
    assert len(err.strip().splitlines()) == 1


def test_s2ft_exports_as_an_exact_lora_with_a_rank_per_module(chat_run, tmp_path, capsys):
    adapter = chat_run["root"] / "run" / "adapter"
    code, _, err = run(["export", "--adapter", adapter, "--peft", tmp_path / "peft"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    tensors, _ = read_safetensors(tmp_path / "peft" / WEIGHTS_NAME)
    base = load_pretrained(chat_run["model"])
    merged = merged_model(attach_adapter(load_pretrained(chat_run["model"]), adapter))
    modules = {"o": "self_attn.o_proj", "v": "self_attn.v_proj", "down": "mlp.down_proj", "up": "mlp.up_proj"}
    assert sorted(config["target_modules"]) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in modules.values())
    for i in range(2):
        for name, module in modules.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            rank = config["rank_pattern"].get(f"model.layers.{i}.{module}", config["r"])
            alpha = config["alpha_pattern"].get(f"model.layers.{i}.{module}", config["lora_alpha"])
            assert A.shape[0] == rank
            assert alpha == rank
            W0 = getattr(base.blocks[i], name).weight
            np.testing.assert_array_equal(W0 + B @ A, getattr(merged.blocks[i], name).weight)


def test_minift_loads_its_s2ft_lora_export_with_the_merged_models_logits(chat_run, tmp_path, capsys):
    adapter = chat_run["root"] / "run" / "adapter"
    assert run(["export", "--adapter", adapter, "--peft", tmp_path / "peft"], capsys)[0] == 0
    tokens = np.array([[1, 5, 9, 30, 2, 7]])
    merged = merged_model(attach_adapter(load_pretrained(chat_run["model"]), adapter))
    as_lora, _, base = load_with_adapter(None, tmp_path / "peft")  # the base it records
    assert base == chat_run["model"].resolve()
    ours = model_forward(as_lora, tokens, train=False)[0]
    assert_close(ours, model_forward(merged, tokens, train=False)[0], rtol=1e-5, atol=1e-6,
                 what="LoRA form vs merged S2FT")


def test_lora_form_reproduces_row_and_column_blocks_bit_for_bit():
    rng = np.random.default_rng(0)
    idx = np.array([1, 4])
    cols = rng.normal(size=(3, 2)).astype(np.float32)
    A, B = lora_form("columns", idx, cols, (3, 6))
    expected = np.zeros((3, 6), np.float32)
    expected[:, idx] = cols
    np.testing.assert_array_equal(B @ A, expected)
    rows = rng.normal(size=(2, 6)).astype(np.float32)
    A, B = lora_form("rows", idx, rows, (5, 6))
    expected = np.zeros((5, 6), np.float32)
    expected[idx, :] = rows
    np.testing.assert_array_equal(B @ A, expected)


def test_finetune_without_model_says_it_uses_the_embedded_model(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: min 3 1\nA: ", "completion": "1"}) + "\n")
    code, _, err = run(["finetune", "--data", data, "--method", "lora", "--out", tmp_path / "r", "--steps", 1,
                        "--batch-size", 1, "--rank", 1, "--no-progress"], capsys)
    assert code == 0, err
    assert "embedded" in err
