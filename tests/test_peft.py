"""PEFT adapter folders (minift.io.peft): export and load, and merged full-model export through the hub.

Properties: the folder has PEFT's file names, keys, shapes and an explicit config; a LoRA adapter
survives export → load on a fresh base model (same logits, same hyperparameters); PiSSA and SORSA are
written as rank-2r LoRA whose lora_B · lora_A is exactly their change of the original weight, so
loading them on the original base reproduces the trained model; a merged model saved with
``hub.save_pretrained`` reproduces the adapted one; bad folders raise CheckpointError naming key and
file. PEFT itself loads these folders in tests/crosscheck/test_against_peft.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minift.config import ModelConfig
from minift.errors import CheckpointError, ConfigError
from minift.io.hub import load_pretrained, save_pretrained
from minift.io.peft import CONFIG_NAME, WEIGHTS_NAME, export_peft_adapter, load_peft_adapter, peft_key
from minift.io.safetensors_io import read_safetensors, write_safetensors
from minift.methods import method_record
from minift.methods.lora import LoRAConfig, apply_lora, low_rank_slots
from minift.methods.pissa import PiSSAConfig, apply_pissa
from minift.methods.sorsa import SORSAConfig, apply_sorsa
from minift.model import trainable_parameters
from minift.testing import assert_close
from tests.adapters import TINY, base_model, batch, logits, perturb


def _lora(**kw) -> object:
    config = LoRAConfig(**{"r": 2, "alpha": 6.0, "targets": ("q", "v", "down")} | kw)
    return perturb(apply_lora(base_model(), config, np.random.default_rng(0)))


def test_lora_folder_has_peft_keys_shapes_and_an_explicit_config(tmp_path):
    folder = export_peft_adapter(_lora(layers=(1,)), tmp_path / "a", base_model_name_or_path="tiny")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 6.0, False)
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert config["layers_to_transform"] == [1]
    tensors, metadata = read_safetensors(folder / WEIGHTS_NAME)
    assert metadata == {"format": "pt"}
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": (2, 8),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": (8, 2),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": (2, 8),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight": (4, 2),  # K·D = 4 (GQA)
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": (2, 12),
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": (8, 2),
    }
    assert all(v.dtype == np.float32 for v in tensors.values())


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_survives_export_and_load_on_a_fresh_base(tmp_path, rslora):
    model = _lora(use_rslora=rslora, dropout=0.1)
    folder = export_peft_adapter(model, tmp_path / "a")
    loaded = load_peft_adapter(base_model(), folder)
    tokens = batch(0)
    assert_close(logits(loaded, tokens), logits(model, tokens), rtol=1e-5, atol=1e-6, what="logits")
    assert sorted(trainable_parameters(loaded)) == sorted(trainable_parameters(model))
    record = method_record(loaded)
    assert record.name == "lora"
    assert record.state["source"] == str(folder)
    c = record.config
    assert (c.r, c.alpha, c.use_rslora, c.dropout) == (2, 6.0, rslora, 0.1)
    scaling = LoRAConfig(r=2, alpha=6.0, use_rslora=rslora).scaling
    assert all(s.scaling == scaling for _, s in low_rank_slots(loaded))


@pytest.mark.parametrize("method", ["pissa", "sorsa"])
def test_pissa_and_sorsa_export_as_exact_rank_2r_lora_on_the_original_weights(tmp_path, method):
    base = base_model()
    if method == "pissa":
        model = apply_pissa(base_model(), PiSSAConfig(r=2, alpha=4.0, targets="all"))
    else:
        model = apply_sorsa(base_model(), SORSAConfig(r=2, alpha=3.0))
    perturb(model, seed=1, scale=0.1)
    folder = export_peft_adapter(model, tmp_path / method)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 4.0)  # 2r, scaling 1 (baked into lora_B)
    tensors, _ = read_safetensors(folder / WEIGHTS_NAME, dtype=np.float64)
    for path, slot in low_rank_slots(model):
        i, name = int(path.split(".")[1]), path.split(".")[2]
        original = getattr(base.blocks[i], name).weight
        delta = tensors[peft_key(i, name, "B")] @ tensors[peft_key(i, name, "A")]
        assert_close(original + delta, slot.dense_weight(), rtol=1e-6, atol=1e-6, what=path)  # float32 file
    tokens = batch(1)
    loaded = load_peft_adapter(base_model(), folder)
    assert_close(logits(loaded, tokens), logits(model, tokens), rtol=1e-5, atol=1e-6, what="logits")


@pytest.mark.parametrize("method", ["lora", "sorsa"])
def test_a_merged_full_model_saved_with_the_hub_reproduces_the_adapted_model(tmp_path, method):
    sorsa = apply_sorsa(base_model(), SORSAConfig(r=2))
    model = _lora() if method == "lora" else perturb(sorsa, scale=0.1)
    save_pretrained(model, tmp_path / "merged")
    merged = load_pretrained(tmp_path / "merged", dtype=np.float64)
    assert not trainable_parameters(merged)
    assert_close(logits(merged, batch(2)), logits(model, batch(2)), rtol=1e-10, atol=1e-12, what="logits")


# ----------------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def folder(tmp_path) -> Path:
    return export_peft_adapter(_lora(), tmp_path / "a")


def _edit_config(folder: Path, **changes) -> None:
    path = folder / CONFIG_NAME
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_tensors(folder: Path, edit) -> None:
    tensors, metadata = read_safetensors(folder / WEIGHTS_NAME)
    edit(tensors)
    write_safetensors(folder / WEIGHTS_NAME, tensors, metadata=metadata)


def test_a_wrong_rank_names_the_key_and_the_file(folder):
    _edit_config(folder, r=3)
    with pytest.raises(CheckpointError, match=r"lora_A\.weight' has shape \(2, 8\), expected \(3, 8\).*r=3"):
        load_peft_adapter(base_model(), folder)


def test_a_base_model_of_another_shape_is_refused(folder):
    wider = ModelConfig(**TINY.to_dict() | {"hidden_size": 12, "head_dim": 4})
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: tensor .*q_proj.lora_A.weight' has shape"):
        load_peft_adapter(base_model(config=wider), folder)


def test_a_missing_tensor_is_named(folder):
    key = peft_key(1, "down", "B")
    _edit_tensors(folder, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{key}'"):
        load_peft_adapter(base_model(), folder)


def test_a_tensor_the_config_does_not_target_is_refused_where_peft_would_ignore_it(folder):
    key = peft_key(0, "k", "A")
    _edit_tensors(folder, lambda t: t.update({key: np.zeros((2, 8), np.float32)}))
    with pytest.raises(CheckpointError, match=r"k_proj.*does not\s+select"):
        load_peft_adapter(base_model(), folder)


@pytest.mark.parametrize(("change", "message"), [
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"use_dora": True}, "use_dora=True"),
])
def test_unsupported_adapter_configs_are_refused(folder, change, message):
    _edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=message):
        load_peft_adapter(base_model(), folder)


def test_a_folder_without_config_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=CONFIG_NAME):
        load_peft_adapter(base_model(), tmp_path)


def test_export_needs_an_unmerged_adapter_on_a_llama_family_model(tmp_path):
    with pytest.raises(ConfigError, match="no LoRA/PiSSA/SORSA adapter"):
        export_peft_adapter(base_model(), tmp_path)
    model = _lora()
    low_rank_slots(model)[0][1].merge()
    with pytest.raises(ConfigError, match="merged"):
        export_peft_adapter(model, tmp_path)


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2]", "expected a JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
    ({"r": "eight"}, r"'r' must be a positive integer, got 'eight'"),
    ({"r": 0}, r"'r' must be a positive integer, got 0"),
    ({"lora_alpha": None}, r"'lora_alpha' must be a number, got None"),
    ({"lora_dropout": "x"}, r"'lora_dropout' must be a number in \[0, 1\), got 'x'"),
    ({"target_modules": "q_proj("}, r"'target_modules' 'q_proj\(' is not a valid regular expression"),
    ({"target_modules": [1]}, r"'target_modules' must be a string or a list of strings"),
    ({"layers_to_transform": "0"}, r"'layers_to_transform' must be null, an integer or a list of integers"),
])
def test_a_malformed_adapter_config_is_a_checkpoint_error_naming_the_file_and_key(folder, text, message):
    path = folder / CONFIG_NAME
    if isinstance(text, dict):
        _edit_config(folder, **text)
    else:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=rf"{path}: .*{message}"):
        load_peft_adapter(base_model(), folder)


def test_loading_onto_an_already_adapted_model_changes_nothing_before_refusing(folder):
    model = base_model()
    model.blocks[1].v = _lora().blocks[1].v  # one target already adapted, another still dense
    before = [type(s).__name__ for b in model.blocks for _, s in b.slots()]
    with pytest.raises(ConfigError, match=r"blocks\.1\.v .*not a plain dense projection"):
        load_peft_adapter(model, folder)
    assert [type(s).__name__ for b in model.blocks for _, s in b.slots()] == before
