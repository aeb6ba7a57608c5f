"""Spec of the study's task world (minift.data.tasks): ``instruct`` asks pretraining skills in a new
format with mixed answer types, ``min`` is kept; splits are deterministic and disjoint, near-OOD is
longer inputs, far-OOD is the test questions in another surface form only; retention three ways."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest

from minift.data.tasks import (
    ANSWER_TYPES,
    FAR_FORMS,
    INSTRUCT_SKILLS,
    KNOWLEDGE,
    PRETRAIN_SKILLS,
    STUDY_TASKS,
    StudySplits,
    TaskExample,
    TaskSplits,
    answer_format,
    answer_nll,
    fact_base,
    has_expected_format,
    perplexity,
    pretrain_heldout,
    pretrain_stream,
    retention_scores,
    study_splits,
    task_splits,
    task_tokenizer,
    wrong_format_rate,
)
from minift.model import init_model
from tests.test_tasks import question_of
from tests.toy import task_world_config


def _inner(ex: TaskExample) -> str:
    """The pretraining question behind the frame of an in-domain ``instruct`` prompt."""
    question = question_of(ex)
    assert question.startswith("solve this: "), question
    return question[len("solve this: ") :]


def _solve(question: str) -> tuple[str, str]:
    """(skill, answer) of a pretraining question of a reused skill, written again as plainly as possible."""
    words = question.split(" ")
    if words[0] == "reverse":
        return "reverse", words[1][::-1]
    if words[0] == "max":
        return "max", str(max(int(w) for w in words[1:]))
    if re.fullmatch(r"[0-9]\+[0-9]", question):
        return "add", str(int(question[0]) + int(question[2]))
    if words[0] in ("color", "home") and words[1] == "of":
        return "facts", fact_base()[words[2]][words[0]]
    raise AssertionError(question)


FAR_PATTERNS = {  # the far-OOD forms, in FAR_FORMS order: (instruct, min)
    "delimiter": (r"solve this - (.+)", r"min ([0-9](?:,[0-9])+)"),
    "phrasing": (r"please solve this: (.+)", r"min of ([0-9](?: [0-9])+)"),
    "casing": (r"Solve this: (.+)", r"Min ([0-9](?: [0-9])+)"),
}


@pytest.fixture(scope="module")
def instruct() -> StudySplits:
    return study_splits("instruct", 0, n_train=400, n_eval=60, n_retention=5)


# ----------------------------------------------------------------------------------------------------
# definition


def test_every_instruct_question_is_a_pretraining_question_behind_a_new_frame(instruct):
    for ex in instruct.train + instruct.validation + instruct.test + instruct.near_ood:
        assert (ex.skill, ex.answer) == _solve(_inner(ex)), ex
    assert set(INSTRUCT_SKILLS) <= set(PRETRAIN_SKILLS)


def test_the_instruct_format_never_occurs_in_pretraining(instruct):
    corpus = {ex.prompt for ex in itertools.islice(pretrain_stream(0, 50), 20000)}
    for split in (instruct.train, instruct.validation, instruct.test, instruct.near_ood, instruct.far_ood):
        assert not {ex.prompt for ex in split} & corpus
    assert not any("solve" in p.lower() for p in corpus)


def test_instruct_mixes_answer_types_so_no_format_alone_scores(instruct):
    """Every split holds a letter string, a digit, a number and a word answer; in training each skill
    weighs a quarter; in test no one answer type is the majority, and all-digit answers at most 60%."""
    assert Counter(ex.skill for ex in instruct.train) == dict.fromkeys(INSTRUCT_SKILLS, 100)
    for split in (instruct.validation, instruct.test):
        types = Counter(ANSWER_TYPES[ex.skill] for ex in split)
        assert set(types) == {"string", "digit", "number", "word"}
        assert max(types.values()) < len(split) / 2
        assert sum(ex.answer.isdigit() for ex in split) <= 0.6 * len(split)


def test_study_splits_are_a_function_of_the_seed():
    a = study_splits("instruct", 3, n_train=80, n_eval=20, n_retention=2)
    assert a == study_splits("instruct", 3, n_train=80, n_eval=20, n_retention=2)
    assert a.train != study_splits("instruct", 4, n_train=80, n_eval=20, n_retention=2).train
    assert isinstance(a, TaskSplits)


def test_train_validation_and_test_share_no_question(instruct):
    sets = [{ex.prompt for ex in s} for s in (instruct.train, instruct.validation, instruct.test)]
    assert not sets[0] & sets[1]
    assert not sets[0] & sets[2]
    assert not sets[1] & sets[2]
    assert not {ex.prompt for ex in instruct.near_ood} & (sets[0] | sets[1] | sets[2])
    # evaluation splits ask each question once; training repeats only knowledge questions
    assert len(sets[1]) == len(instruct.validation) == 60
    assert len(sets[2]) == len(instruct.test) == 60
    repeated = [p for p, n in Counter(ex.prompt for ex in instruct.train).items() if n > 1]
    assert all(ex.skill in KNOWLEDGE for ex in instruct.train if ex.prompt in repeated)


def test_knowledge_questions_of_the_test_were_never_trained_in_the_new_format():
    s = study_splits("instruct", 0, n_train=2000, n_eval=100, n_retention=1)
    trained = {_inner(ex) for ex in s.train if ex.skill in KNOWLEDGE}
    tested = {_inner(ex) for ex in s.test + s.validation if ex.skill in KNOWLEDGE}
    assert tested
    assert not trained & tested
    assert len(trained) == 50 + 16  # the training parts of the add and facts tables, all of them


def test_questions_held_out_for_retention_are_never_instruct_questions(instruct):
    heldout = {question_of(ex) for ex in pretrain_heldout(0, 50) if ex.skill not in KNOWLEDGE}
    for ex in instruct.train + instruct.validation + instruct.test + instruct.near_ood:
        assert _inner(ex) not in heldout


def test_near_ood_asks_max_of_longer_lists_than_fine_tuning_shows(instruct):
    trained = max(len(_inner(ex).split(" ")) for ex in instruct.train if ex.skill == "max")
    near = [len(_inner(ex).split(" ")) for ex in instruct.near_ood]
    assert {ex.skill for ex in instruct.near_ood} == {"max"}
    assert trained < min(near)
    pretrained = max(len(question_of(ex).split(" ")) for ex in pretrain_heldout(0, 50) if ex.skill == "max")
    assert min(near) <= pretrained < max(near)  # some within pretraining's lengths, some beyond


@pytest.mark.parametrize("name", sorted(STUDY_TASKS))
def test_far_ood_is_the_test_in_another_surface_form_only(name):
    """Same skill, answer and question as the paired test example, the instruction written in each
    of the far forms in turn (delimiter, phrasing, casing), and no far-OOD prompt ever trained on."""
    s = study_splits(name, 0, n_train=300, n_eval=30, n_retention=1)
    assert len(s.far_ood) == len(s.test)
    assert tuple(FAR_PATTERNS) == FAR_FORMS
    for i, (far, ex) in enumerate(zip(s.far_ood, s.test, strict=True)):
        assert (far.answer, far.skill) == (ex.answer, ex.skill)
        pattern = FAR_PATTERNS[FAR_FORMS[i % len(FAR_FORMS)]][name == "min"]
        m = re.fullmatch(pattern, question_of(far))
        assert m, (far, pattern)
        if name == "instruct":
            assert m.group(1) == _inner(ex)
        else:
            assert re.split("[ ,]", m.group(1)) == question_of(ex).split(" ")[1:]
    assert not {ex.prompt for ex in s.far_ood} & {ex.prompt for ex in s.train}


def test_the_min_task_of_the_study_is_the_tutorials_min_task():
    s = study_splits("min", 2, n_train=100, n_eval=20, n_retention=3)
    t = task_splits("min", 2, n_train=100, n_eval=20, n_retention=3)
    assert (s.train, s.validation, s.test, s.near_ood, s.retention) == (
        t.train,
        t.validation,
        t.test,
        t.near_ood,
        t.retention,
    )


def test_the_retention_split_is_the_held_out_pretraining_prompts_of_every_skill(instruct):
    assert instruct.retention == pretrain_heldout(0, 5)
    assert Counter(ex.skill for ex in instruct.retention) == dict.fromkeys(PRETRAIN_SKILLS, 5)


def test_an_unknown_study_task_is_refused_with_the_known_names():
    with pytest.raises(KeyError, match="instruct"):
        study_splits("shift")


# ----------------------------------------------------------------------------------------------------
# retention: the wrong-format detector, answer NLL


@pytest.mark.parametrize(
    ("skill", "answer", "right", "wrong"),
    [
        ("reverse", "cba", ["xyz", " ab \n", "cbaa"], ["3", "c b", "cB", ""]),
        ("last", "c", ["a", "z\nQ: x"], ["ab", "1", ""]),
        ("after", "d", ["e"], ["de", "5"]),
        ("count", "3", ["0", "7"], ["12", "abc", "3a"]),
        ("max", "9", ["1"], ["10", "x"]),
        ("min", "0", ["4"], ["04", "-1"]),
        ("add", "12", ["3", "18", "99"], ["100", "a", "1 2"]),
        ("shift", "bcd", ["q"], ["b1"]),
    ],
)
def test_the_wrong_format_detector_knows_each_skills_answer_format(skill, answer, right, wrong):
    ex = TaskExample("Q: x\nA: ", answer, skill)
    assert has_expected_format(answer, ex)
    for p in right:
        assert has_expected_format(p, ex), p
    for p in wrong:
        assert not has_expected_format(p, ex), p


def test_a_fact_answer_must_be_a_word_of_its_questions_category():
    facts = fact_base()
    colors = {a["color"] for a in facts.values()}
    homes = {a["home"] for a in facts.values()}
    color_q = TaskExample("Q: color of x\nA: ", sorted(colors)[0], "facts")
    home_q = TaskExample("Q: home of x\nA: ", sorted(homes)[0], "facts")
    assert all(has_expected_format(c, color_q) for c in colors)
    assert not any(has_expected_format(h, color_q) for h in homes)
    assert all(has_expected_format(h, home_q) for h in homes)
    assert not has_expected_format("purple", color_q)


def test_every_reference_answer_has_its_skills_format(instruct):
    s = study_splits("min", 0, n_train=50, n_eval=20, n_retention=1)
    shift = task_splits("shift", 0, n_train=10, n_eval=10, n_retention=1)
    everything = instruct.train + instruct.near_ood + instruct.far_ood + s.test + shift.test
    for ex in everything + pretrain_heldout(0, 50):
        assert has_expected_format(ex.answer, ex), ex


def test_the_wrong_format_rate_counts_answers_outside_their_format():
    exs = [TaskExample("Q: a\nA: ", "cba", "reverse"), TaskExample("Q: b\nA: ", "7", "count")]
    assert wrong_format_rate(["abc", "7"], exs) == 0.0  # wrong content, right format
    assert wrong_format_rate(["7", "7"], exs) == 0.5
    assert wrong_format_rate(["7", "cba"], exs) == 1.0
    assert wrong_format_rate([], []) == 0.0
    with pytest.raises(KeyError, match="sort"):
        answer_format(TaskExample("Q: a\nA: ", "x", "sort"))


def test_retention_scores_measure_exact_match_answer_nll_and_format_per_skill():
    model = init_model(task_world_config(), np.random.default_rng(0), std=0.5)
    tok = task_tokenizer()
    exs = pretrain_heldout(0, 2)
    scores = retention_scores(model, tok, exs)
    assert set(scores) == {"exact_match", "answer_nll", "wrong_format"}
    for table in scores.values():
        assert set(table) == {"all", *PRETRAIN_SKILLS}
    assert all(0.0 <= v <= 1.0 for k in ("exact_match", "wrong_format") for v in scores[k].values())
    nll = answer_nll(model, tok, exs)
    assert scores["answer_nll"] == nll
    assert nll["all"] == pytest.approx(math.log(perplexity(model, tok, [ex.record for ex in exs])))
    reverse = [ex for ex in exs if ex.skill == "reverse"]
    assert nll["reverse"] == pytest.approx(math.log(perplexity(model, tok, [ex.record for ex in reverse])))
    assert nll["all"] > 0.0
