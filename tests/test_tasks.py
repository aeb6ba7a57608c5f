"""Spec of the embedded tasks (minift.data.tasks): answers are the skills applied to their questions,
splits are deterministic and disjoint, answer extraction and exact match, perplexity, the tokenizer."""

from __future__ import annotations

import itertools
import json
import math
import string

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.data.datasets import encode_example
from minift.data.tasks import (
    BOS,
    EOS,
    FINETUNE_TASKS,
    PAD,
    PRETRAIN_SKILLS,
    TaskExample,
    build_tokenizer,
    exact_match,
    extract_answer,
    fact_base,
    generate_answers,
    perplexity,
    pretrain_heldout,
    pretrain_stream,
    save_tokenizer,
    task_splits,
    task_tokenizer,
)
from minift.data.tokenizer import Tokenizer
from minift.generate import generate
from minift.model import init_model
from tests.toy import task_world_config


def question_of(ex: TaskExample) -> str:
    assert ex.prompt.startswith("Q: ")
    assert ex.prompt.endswith("\nA: ")
    return ex.prompt[3:-4]


def _solve(skill: str, q: str) -> str:
    """Each skill written again, as plainly as possible: the reference the generators must match."""
    words = q.split(" ")
    letters = string.ascii_lowercase
    if skill == "reverse":
        return words[1][::-1]
    if skill == "last":
        return words[-1][-1]
    if skill == "count":
        return str(len(words[1]))
    if skill == "max":
        return str(max(int(w) for w in words[1:]))
    if skill == "min":
        return str(min(int(w) for w in words[1:]))
    if skill == "add":
        a, b = q.split("+")
        return str(int(a) + int(b))
    if skill == "after":
        return letters[(letters.index(words[1]) + 1) % 26]
    if skill == "shift":
        return "".join(letters[(letters.index(c) + 1) % 26] for c in words[1])
    if skill == "facts":
        return fact_base()[words[2]][words[0]]
    raise AssertionError(skill)


# ----------------------------------------------------------------------------------------------------
# definition


def test_every_pretraining_answer_is_its_skill_applied_to_the_question():
    stream = list(itertools.islice(pretrain_stream(0, 10), 700))
    assert {ex.skill for ex in stream} == set(PRETRAIN_SKILLS)
    for ex in stream + pretrain_heldout(0, 10):
        assert ex.answer == _solve(ex.skill, question_of(ex)), ex


def test_every_finetuning_answer_is_its_skill_applied_to_the_question():
    for name in FINETUNE_TASKS:
        s = task_splits(name, 0, n_train=200, n_eval=30, n_retention=3)
        for ex in s.train + s.validation + s.test + s.near_ood:
            assert ex.skill == name
            assert ex.answer == _solve(name, question_of(ex)), ex


def test_finetuning_skills_are_not_in_the_pretraining_mix():
    assert not set(FINETUNE_TASKS) & set(PRETRAIN_SKILLS)
    prompts = {question_of(ex).split(" ")[0] for ex in itertools.islice(pretrain_stream(0, 10), 700)}
    assert "shift" not in prompts
    assert "min" not in prompts


def test_near_ood_inputs_are_longer_than_every_trained_input():
    for name in FINETUNE_TASKS:
        s = task_splits(name, 0, n_train=300, n_eval=30, n_retention=1)
        trained = (
            max(len(question_of(ex).split(" ")) for ex in s.train)
            if name == "min"
            else max(len(question_of(ex).split(" ")[1]) for ex in s.train)
        )
        shortest = (
            min(len(question_of(ex).split(" ")) for ex in s.near_ood)
            if name == "min"
            else min(len(question_of(ex).split(" ")[1]) for ex in s.near_ood)
        )
        assert shortest > trained


# ----------------------------------------------------------------------------------------------------
# determinism and disjointness


def test_splits_are_a_function_of_the_seed():
    assert task_splits("shift", 3, n_train=50) == task_splits("shift", 3, n_train=50)
    assert task_splits("shift", 3, n_train=50).train != task_splits("shift", 4, n_train=50).train
    first = list(itertools.islice(pretrain_stream(7), 50))
    assert first == list(itertools.islice(pretrain_stream(7), 50))


def test_train_validation_and_test_prompts_are_pairwise_disjoint():
    for name in FINETUNE_TASKS:
        s = task_splits(name, 0, n_train=1000, n_eval=100)
        sets = [{ex.prompt for ex in split} for split in (s.train, s.validation, s.test)]
        assert [len(x) for x in sets] == [1000, 100, 100]  # no duplicates inside a split either
        assert not (sets[0] & sets[1])
        assert not (sets[0] & sets[2])
        assert not (sets[1] & sets[2])
        assert not {ex.prompt for ex in s.near_ood} & sets[0]


def test_held_out_prompts_of_algorithmic_skills_never_appear_in_pretraining():
    heldout = {ex.prompt for ex in pretrain_heldout(0, 50) if ex.skill in ("reverse", "last", "count", "max")}
    assert len(heldout) == 200
    assert not heldout & {ex.prompt for ex in itertools.islice(pretrain_stream(0, 50), 20000)}


def test_a_smaller_held_out_sample_is_part_of_a_larger_one():
    assert set(pretrain_heldout(0, 5)) <= set(pretrain_heldout(0, 20))


def test_the_retention_split_covers_every_pretraining_skill():
    s = task_splits("min", 0, n_train=10, n_eval=5, n_retention=4)
    counts = {skill: sum(ex.skill == skill for ex in s.retention) for skill in PRETRAIN_SKILLS}
    assert counts == dict.fromkeys(PRETRAIN_SKILLS, 4)


def test_an_unknown_task_is_refused_with_the_known_names():
    with pytest.raises(KeyError, match="shift"):
        task_splits("sort")


# ----------------------------------------------------------------------------------------------------
# answer extraction and exact match


@given(
    answer=st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=8),
    rest=st.text(alphabet=string.printable, max_size=20),
)
@example(answer="cba", rest="Q: reverse abc\nA: cba")
def test_extraction_keeps_the_first_line_without_surrounding_spaces(answer, rest):
    assert extract_answer(f" {answer} \n{rest}") == answer
    assert extract_answer(answer) == answer


def test_exact_match_counts_extracted_answers_equal_to_the_reference():
    exs = [TaskExample("Q: a\nA: ", "x", "s"), TaskExample("Q: b\nA: ", "yz", "s")]
    assert exact_match(["x\nQ: more", "y"], exs) == 0.5
    assert exact_match(["x", "yz "], exs) == 1.0
    assert exact_match([], []) == 0.0


# ----------------------------------------------------------------------------------------------------
# tokenizer


@given(st.text(alphabet="\n" + "".join(chr(c) for c in range(32, 127)), max_size=40))
@example("Q: reverse abc\nA: cba")
def test_the_tokenizer_has_one_id_per_character_and_decodes_back_exactly(text):
    tok = task_tokenizer()
    ids = tok.encode(text, bos=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_the_tokenizer_adds_bos_once_and_reserves_the_special_ids():
    tok = task_tokenizer()
    assert tok.encode("ab") == [1, *tok.encode("ab", bos=False)]
    assert [tok.hf.token_to_id(t) for t in (PAD, BOS, EOS)] == [0, 1, 2]
    assert tok.eos_ids == (2,)
    assert tok.pad_id == 0
    assert build_tokenizer().get_vocab_size() == 100


def test_a_saved_tokenizer_folder_reads_back_with_the_same_specials(tmp_path):
    save_tokenizer(tmp_path)
    json.loads((tmp_path / "tokenizer_config.json").read_text())
    back = Tokenizer.from_pretrained(tmp_path)
    ours = task_tokenizer()
    assert (back.eos_ids, back.bos_id, back.pad_id) == (ours.eos_ids, ours.bos_id, ours.pad_id)
    assert back.encode("Q: 3+4\nA: ") == ours.encode("Q: 3+4\nA: ")


def test_training_records_count_the_answer_and_eos_only():
    tok = task_tokenizer()
    ex = TaskExample("Q: reverse ab\nA: ", "ba", "reverse")
    enc = encode_example(tok, ex.record)
    counted = [i for i, label in zip(enc.ids, enc.labels, strict=True) if label != -100]
    assert tok.decode(counted, skip_special_tokens=False) == "ba" + EOS


# ----------------------------------------------------------------------------------------------------
# evaluation on a model


def _tiny(std: float) -> object:
    config = task_world_config()
    return init_model(config, np.random.default_rng(0), std=std)


def test_perplexity_of_a_model_with_uniform_predictions_is_the_vocabulary_size():
    model = _tiny(std=0.0)  # zero weights: every logit is 0
    exs = task_splits("shift", 0, n_train=10, n_eval=6, n_retention=1).test
    assert math.isclose(perplexity(model, task_tokenizer(), [ex.record for ex in exs]), 100.0, rel_tol=1e-5)


def test_generated_answers_are_the_greedy_continuations_cut_at_eos_or_newline():
    model, tok = _tiny(std=0.5), task_tokenizer()
    exs = task_splits("min", 0, n_train=10, n_eval=5, n_retention=1).test
    got = generate_answers(model, tok, exs, max_new_tokens=6, batch_size=2)
    for ex, answer in zip(exs, got, strict=True):
        (alone,) = generate(model, [tok.encode(ex.prompt)], max_new_tokens=6, eos_ids=[2])
        text = tok.decode(alone)
        assert answer == text.split("\n")[0].strip()
