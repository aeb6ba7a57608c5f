"""Spec of the shipped base model (minift/assets/base): a small Llama with grouped-query attention,
pretrained by ``minift pretrain``, that knows its pretraining skills on prompts it never saw."""

from __future__ import annotations

import json

import pytest

from minift.data.tasks import PRETRAIN_SKILLS, build_tokenizer, evaluate, pretrain_heldout, task_tokenizer
from minift.data.tokenizer import Tokenizer
from minift.tools.pretrain import BASE_CONFIG, EMBEDDED, PretrainRecipe, load_embedded


@pytest.fixture(scope="module")
def model():
    return load_embedded()


def test_the_embedded_model_is_a_small_llama_with_grouped_query_attention(model):
    c = model.config
    assert c.arch == "llama"
    assert c.n_kv_heads < c.n_heads
    assert c == BASE_CONFIG
    size = sum(f.stat().st_size for f in EMBEDDED.iterdir())
    assert size <= 20 * 2**20


def assert_the_folder_holds_the_tasks_tokenizer(folder):
    shipped = Tokenizer.from_pretrained(folder)
    assert shipped.hf.get_vocab() == build_tokenizer().get_vocab()
    ours = task_tokenizer()
    assert (shipped.eos_ids, shipped.bos_id, shipped.pad_id) == (ours.eos_ids, ours.bos_id, ours.pad_id)


def test_the_embedded_folder_holds_the_tasks_tokenizer():
    assert_the_folder_holds_the_tasks_tokenizer(EMBEDDED)


def test_the_embedded_model_was_made_by_the_default_recipe():
    record = json.loads((EMBEDDED / "pretrain_recipe.json").read_text())
    recipe = json.loads(json.dumps(PretrainRecipe().__dict__))
    assert record["recipe"] == recipe
    assert record["steps"] == PretrainRecipe().steps


def test_the_embedded_model_answers_held_out_prompts_of_every_pretraining_skill(model):
    """≥ 90% exact match overall on prompts never seen in pretraining (knowledge skills: their
    facts), and ≥ 80% on each skill on its own."""
    scores = evaluate(model, task_tokenizer(), pretrain_heldout(PretrainRecipe().seed, 15))
    assert set(scores) == {"all", *PRETRAIN_SKILLS}
    assert scores["all"] >= 0.9, scores
    assert min(scores.values()) >= 0.8, scores
