"""What the study needs from the task world (``minift.data.tasks``), in one place: the splits of a
fine-tuning task, the pretraining examples a replay arm mixes in, and retention three ways.

Retention (forgetting of the pretraining skills, the papers' far-OOD commonsense accuracy) is
measured on held-out pretraining prompts three ways (``tasks.retention_scores``), because after
fine-tuning exact match alone can sit at its floor when a model answers every prompt in the new
task's format: **exact match**; **answer NLL**, the mean teacher-forced negative log-likelihood per
answer token, which still ranks models whose answers are all wrong; and the **wrong-format rate**,
the fraction of answers not in their skill's format (a digit for "last letter of abc"), which
separates "answers in the new task's format" from "answers wrongly".
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from minift.data import tasks
from minift.data.tasks import TaskExample, task_tokenizer
from minift.model import Model


@dataclass(frozen=True)
class Splits:
    """A fine-tuning task's splits as the study uses them; ``far_ood`` is empty when the world has
    no such split for the task."""

    train: list[TaskExample]
    validation: list[TaskExample]
    test: list[TaskExample]
    near_ood: list[TaskExample]  # the same skill at unseen lengths
    far_ood: list[TaskExample]  # the test questions in an unseen surface form
    retention: list[TaskExample]  # held-out pretraining prompts


@functools.lru_cache(maxsize=8)
def splits(task: str, n_train: int, n_eval: int, n_retention: int) -> Splits:
    """The task's splits, fixed (split seed 0) whatever the run's seed: the study world's
    (``tasks.study_splits``, with far-OOD) where it has the task, else the tutorials' (``shift``)."""
    sizes = {"n_train": n_train, "n_eval": n_eval, "n_retention": n_retention}
    if task in tasks.STUDY_TASKS:
        s = tasks.study_splits(task, 0, **sizes)
        return Splits(s.train, s.validation, s.test, s.near_ood, s.far_ood, s.retention)
    t = tasks.task_splits(task, 0, **sizes)
    return Splits(t.train, t.validation, t.test, t.near_ood, [], t.retention)


@functools.lru_cache(maxsize=4)
def replay_examples(n: int, n_retention: int) -> list[TaskExample]:
    """``n`` pretraining examples for a replay arm; none of the retention split's algorithmic
    prompts among them (knowledge skills' facts are shown in pretraining and replay alike)."""
    return list(itertools.islice(tasks.pretrain_stream(0, n_heldout=max(50, n_retention)), n))


def accuracy(model: Model, examples: Sequence[TaskExample]) -> float:
    """Exact match of the greedy answers."""
    ex = list(examples)
    return tasks.exact_match(tasks.generate_answers(model, task_tokenizer(), ex), ex)


def answer_nll(model: Model, examples: Sequence[TaskExample]) -> float:
    """Mean teacher-forced NLL per answer token (EOS included), in nats."""
    return tasks.answer_nll(model, task_tokenizer(), list(examples))["all"]


def retention(model: Model, examples: Sequence[TaskExample]) -> dict[str, float]:
    """Exact match, answer NLL and wrong-format rate on held-out pretraining prompts."""
    r = tasks.retention_scores(model, task_tokenizer(), list(examples))
    return {
        "em": r["exact_match"]["all"],
        "nll": r["answer_nll"]["all"],
        "wrong_format": r["wrong_format"]["all"],
    }
