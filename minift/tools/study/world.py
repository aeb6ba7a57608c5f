"""What the study needs from the task world, in one place: the splits of a fine-tuning task, the
pretraining examples a replay arm mixes in, and the three measures of retention.

Retention (forgetting of the pretraining skills, the papers' far-OOD commonsense accuracy) is
measured three ways on the held-out pretraining prompts, because after fine-tuning exact match alone
sits at its floor when a model answers every prompt in the new task's format:

- **exact match** of the greedy answer;
- **answer NLL**: the mean teacher-forced negative log-likelihood per answer token (and EOS), which
  still ranks models whose answers are all wrong;
- **wrong-format rate**: the fraction of answers whose *kind* differs from the reference's
  (``answer_kind``: a number, a lowercase word, empty, or anything else), e.g. a digit for
  "last letter of abc". It separates "answers in the new task's format" from "answers wrongly".
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from minift.data.tasks import (
    TaskExample,
    exact_match,
    generate_answers,
    perplexity,
    pretrain_stream,
    task_splits,
    task_tokenizer,
)
from minift.model import Model


@dataclass(frozen=True)
class Splits:
    """A fine-tuning task's splits as the study uses them; ``far_ood`` is empty when the world has
    no such split for the task."""

    train: list[TaskExample]
    validation: list[TaskExample]
    test: list[TaskExample]
    near_ood: list[TaskExample]  # the same skill at unseen lengths
    far_ood: list[TaskExample]  # the same skill in an unseen surface form
    retention: list[TaskExample]  # held-out pretraining prompts


@functools.lru_cache(maxsize=8)
def splits(task: str, n_train: int, n_eval: int, n_retention: int) -> Splits:
    """The task's splits, fixed (split seed 0) whatever the run's seed."""
    s = task_splits(task, 0, n_train=n_train, n_eval=n_eval, n_retention=n_retention)
    far = list(getattr(s, "far_ood", None) or [])
    return Splits(s.train, s.validation, s.test, s.near_ood, far, s.retention)


@functools.lru_cache(maxsize=4)
def replay_examples(n: int, n_retention: int) -> list[TaskExample]:
    """``n`` pretraining examples for a replay arm; none of the retention split's algorithmic
    prompts among them (knowledge skills' facts are shown in pretraining and replay alike)."""
    return list(itertools.islice(pretrain_stream(0, n_heldout=max(50, n_retention)), n))


_NUMBER = re.compile(r"-?\d+")
_WORD = re.compile(r"[a-z]+")


def answer_kind(answer: str) -> str:
    """ "number", "word" (lowercase letters), "empty" or "other"."""
    if not answer:
        return "empty"
    if _NUMBER.fullmatch(answer):
        return "number"
    return "word" if _WORD.fullmatch(answer) else "other"


def accuracy(model: Model, examples: Sequence[TaskExample]) -> float:
    """Exact match of the greedy answers."""
    return exact_match(generate_answers(model, task_tokenizer(), list(examples)), list(examples))


def answer_nll(model: Model, examples: Sequence[TaskExample]) -> float:
    """Mean teacher-forced NLL per answer token (EOS included), in nats."""
    return math.log(perplexity(model, task_tokenizer(), [ex.record for ex in examples]))


def retention(model: Model, examples: Sequence[TaskExample]) -> dict[str, float]:
    """Exact match, answer NLL and wrong-format rate on held-out pretraining prompts."""
    preds = generate_answers(model, task_tokenizer(), list(examples))
    wrong = sum(answer_kind(p) != answer_kind(ex.answer) for p, ex in zip(preds, examples, strict=True))
    return {
        "em": exact_match(preds, list(examples)),
        "nll": answer_nll(model, examples),
        "wrong_format": wrong / max(len(examples), 1),
    }
