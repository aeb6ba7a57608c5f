"""Spec of the study's shipped base model (minift/assets/study_base): the tutorials' base at the same
width with 8 query heads of D=16, pretrained by ``minift pretrain --recipe study``, that knows its
pretraining skills on prompts it never saw and has not yet learned the study's task."""

from __future__ import annotations

import dataclasses
import json

import pytest

from minift.data.tasks import (
    PRETRAIN_SKILLS,
    evaluate,
    pretrain_heldout,
    study_splits,
    task_tokenizer,
)
from minift.io.hub import load_pretrained, model_state
from minift.tools.cli import build_parser, main
from minift.tools.pretrain import (
    BASE_CONFIG,
    EMBEDDED,
    RECIPES,
    STUDY_CONFIG,
    STUDY_EMBEDDED,
    PretrainRecipe,
    load_embedded,
    load_study_base,
)
from tests.test_embedded_model import assert_the_folder_holds_the_tasks_tokenizer


@pytest.fixture(scope="module")
def model():
    return load_study_base()


def test_the_study_base_has_eight_query_heads_at_the_tutorial_bases_width_and_size(model):
    c = model.config
    assert c == STUDY_CONFIG
    assert (c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim) == (128, 8, 4, 16)
    assert c.n_kv_heads * c.head_dim == BASE_CONFIG.n_kv_heads * BASE_CONFIG.head_dim
    ours, tutorials = model_state(model), model_state(load_embedded())
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tutorials.items()}
    assert all(str(v.dtype) == "float32" for v in ours.values())


def test_the_study_base_folder_holds_the_tasks_tokenizer():
    assert_the_folder_holds_the_tasks_tokenizer(STUDY_EMBEDDED)


def test_the_study_base_was_made_by_the_study_recipe():
    record = json.loads((STUDY_EMBEDDED / "pretrain_recipe.json").read_text())
    recipe = RECIPES["study"].recipe
    assert record["recipe"] == json.loads(json.dumps(dataclasses.asdict(recipe)))
    assert record["steps"] == recipe.steps
    assert RECIPES["study"].folder == STUDY_EMBEDDED
    assert (RECIPES["base"].config, RECIPES["base"].recipe, RECIPES["base"].folder) == (
        BASE_CONFIG,
        PretrainRecipe(),
        EMBEDDED,
    )


def test_a_study_fine_tuning_run_is_a_small_fraction_of_pretraining():
    recipe = RECIPES["study"].recipe
    assert 0.05 * recipe.steps * recipe.batch_size >= 600 * 16


def test_the_study_base_answers_held_out_prompts_of_every_pretraining_skill(model):
    """≥ 90% exact match overall on prompts never seen in pretraining, ≥ 80% on each skill."""
    scores = evaluate(model, task_tokenizer(), pretrain_heldout(RECIPES["study"].recipe.seed, 15))
    assert set(scores) == {"all", *PRETRAIN_SKILLS}
    assert scores["all"] >= 0.9, scores
    assert min(scores.values()) >= 0.8, scores


def test_the_study_base_has_not_learned_the_instruct_format(model):
    """The study's task is there to be learned: before fine-tuning the base fails most of its test."""
    scores = evaluate(model, task_tokenizer(), study_splits("instruct", 0, n_train=8, n_eval=40).test)
    assert scores["all"] <= 0.5, scores


def test_the_pretrain_command_knows_every_recipe_and_defaults_to_the_tutorials_base(capsys):
    parser = build_parser()
    for name in RECIPES:
        assert parser.parse_args(["pretrain", "--recipe", name, "--out", "x"]).recipe == name
    assert parser.parse_args(["pretrain", "--out", "x"]).recipe == "base"
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--recipe", "nope", "--out", "x"])
    assert "study" in capsys.readouterr().err


def test_the_study_recipe_writes_its_architecture_and_the_same_weights_each_time(tmp_path, capsys):
    """The recipe's first steps (not the whole run) twice: byte-identical weights."""
    for name in ("a", "b"):
        argv = ["pretrain", "--recipe", "study", "--out", str(tmp_path / name), "--steps", "3"]
        assert main([*argv, "--batch-size", "4", "--no-progress"]) == 0, capsys.readouterr().err
    assert load_pretrained(tmp_path / "a").config == STUDY_CONFIG
    record = json.loads((tmp_path / "a" / "pretrain_recipe.json").read_text())
    assert record["recipe"] == record["recipe"] | {"steps": 3, "batch_size": 4, "warmup_steps": 0}
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
