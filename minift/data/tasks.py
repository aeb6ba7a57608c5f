"""The embedded tasks: a small character-level world in instruction format, generated from a seed.

Every example reads ``Q: <question>\\nA: <answer>`` followed by EOS, e.g. ``Q: reverse abc\\nA: cba``.
The world mirrors the setting of the S2FT and SORSA papers in miniature:

- a **pretraining mix** of skills the base model learns (``PRETRAIN_SKILLS``): string operations
  (``reverse``, ``last``, ``count``), a list operation (``max``), arithmetic (``add``) and knowledge
  (``after``: the letter that follows; ``facts``: a synthetic fact base of invented animals).
  String and list skills are *algorithmic*: their held-out prompts are inputs never seen in pretraining.
  ``add``, ``after`` and ``facts`` are *knowledge*: a fixed table that pretraining shows in full, so
  their test asks the same facts again (like the papers' commonsense questions, it probes what the
  model knows, which fine-tuning can keep or forget);
- **fine-tuning tasks** (``FINETUNE_TASKS``), skills absent from the mix: ``shift`` (every letter to the
  next one: ``shift abc`` → ``bcd``) and ``min`` (the smallest of a list of digits). Each has
  train / validation / in-domain test splits (disjoint prompts), a **near-OOD** split (unseen lengths,
  like the papers' out-of-distribution arithmetic sets) and a **far-OOD retention** split (held-out
  pretraining prompts, like commonsense accuracy after math fine-tuning).

``minift study`` uses a second world on the same skills (``study_splits``), built so that its
measurements mean something:

- ``instruct``, the main task, reuses pretrained skills in a new instruction format, as the papers'
  Math10K and commonsense data do: the questions of four pretraining skills, verbatim, behind a frame
  pretraining never shows (``Q: solve this: reverse abc\nA: cba``). Its answers are of mixed types (a
  letter string, a digit, a number, a word), so a fine-tuned model cannot score by answering in one
  format; ``min`` is the second task;
- splits: train, validation, in-domain test, near-OOD (longer inputs) and **far-OOD**: the test
  questions with the instruction written another way (delimiter, phrasing, casing), surface form only;
- retention three ways (``retention_scores``): exact match, teacher-forced answer NLL (it moves
  before an answer flips) and the wrong-format rate (``answer_format``: answers a fine-tuned model
  gives in the new task's format instead of the skill's).

Evaluation is exact match after answer extraction (greedy generation up to EOS or a newline) and
perplexity over the answer tokens. The tokenizer is character-level (``build_tokenizer``).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from minift.backend import get_xp
from minift.data.datasets import collate, encode_example
from minift.data.tokenizer import Tokenizer
from minift.generate import generate
from minift.layers.cross_entropy import cross_entropy_forward
from minift.model import Model, model_forward

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
# Printable ASCII and the newline: every character of the tasks, and of most user JSONL files.
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))

WORLD_SEED = 20240601  # fixes the fact base: part of what the shipped base model knows
LETTERS = string.ascii_lowercase


def build_tokenizer() -> HFTokenizer:
    """A character-level WordLevel tokenizer: one id per character, BOS/EOS/PAD/UNK specials.

    Like Llama's, its post-processor puts BOS before a sequence (``<s> $A``) and never adds EOS
    (training appends it where an answer ends); ``decode`` concatenates characters, skipping specials.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARSET:
        vocab[ch] = len(vocab)
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    tok.add_special_tokens(list(SPECIALS))
    return tok


def task_tokenizer() -> Tokenizer:
    """``build_tokenizer`` wrapped with its BOS, EOS and PAD ids, as ``Tokenizer.from_pretrained``
    reads it back from a folder ``save_tokenizer`` wrote."""
    return Tokenizer(build_tokenizer(), eos_ids=SPECIALS.index(EOS), bos_id=SPECIALS.index(BOS), pad_id=0)


def save_tokenizer(folder: str | Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json (its special tokens) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 256,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


@dataclass(frozen=True)
class TaskExample:
    """One instruction example; the model is trained to produce ``answer`` + EOS after ``prompt``."""

    prompt: str  # "Q: reverse abc\nA: "
    answer: str  # "cba"
    skill: str  # "reverse"

    @property
    def record(self) -> dict[str, str]:
        """The JSONL record ``minift.data.datasets`` trains on (loss on the completion and EOS)."""
        return {"prompt": self.prompt, "completion": self.answer}


def format_prompt(question: str) -> str:
    return f"Q: {question}\nA: "


def extract_answer(generated: str) -> str:
    """The answer in generated text: everything before the first newline, stripped of spaces.

    Generation stops at EOS, so ``generated`` holds no specials; a model that runs on into a new
    ``Q:`` line is still scored on its first line only.
    """
    return generated.split("\n", 1)[0].strip()


def exact_match(predictions: list[str], examples: list[TaskExample]) -> float:
    """The fraction of predictions whose extracted answer equals the reference answer."""
    if not examples:
        return 0.0
    hits = sum(extract_answer(p) == ex.answer for p, ex in zip(predictions, examples, strict=True))
    return hits / len(examples)


# ----------------------------------------------------------------------------------------------------
# the world


def _word(rng: np.random.Generator, lo: int, hi: int) -> str:
    n = int(rng.integers(lo, hi + 1))
    return "".join(LETTERS[i] for i in rng.integers(0, 26, size=n))


def _digits(rng: np.random.Generator, lo: int, hi: int) -> list[int]:
    return [int(d) for d in rng.integers(0, 10, size=int(rng.integers(lo, hi + 1)))]


def _after(ch: str) -> str:
    return LETTERS[(LETTERS.index(ch) + 1) % 26]


def fact_base() -> dict[str, dict[str, str]]:
    """The synthetic fact base: 16 invented animals, each with a colour and a home (fixed world)."""
    rng = np.random.default_rng(WORLD_SEED)
    colors = ["red", "blue", "green", "gold", "gray", "pink", "black", "white"]
    homes = ["lake", "cave", "hill", "moor", "reef", "nest", "dune", "wood"]
    names: list[str] = []
    while len(names) < 16:  # consonant-vowel-consonant-consonant names, all distinct
        name = "".join(rng.choice(list(s)) for s in ("bdfgklmnprstvz", "aeiou", "lmnr", "bdgkpt"))
        if name not in names:
            names.append(name)
    return {n: {"color": str(rng.choice(colors)), "home": str(rng.choice(homes))} for n in names}


Generator = Callable[[np.random.Generator], tuple[str, str]]


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 2, 5)
    return f"reverse {w}", w[::-1]


def _last(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 2, 6)
    return f"last letter of {w}", w[-1]


def _count(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 1, 7)
    return f"count {w}", str(len(w))


def _max(rng: np.random.Generator) -> tuple[str, str]:
    d = _digits(rng, 3, 4)
    return "max " + " ".join(map(str, d)), str(max(d))


def _add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(0, 10, size=2))
    return f"{a}+{b}", str(a + b)


def _after_q(rng: np.random.Generator) -> tuple[str, str]:
    ch = LETTERS[int(rng.integers(0, 26))]
    return f"after {ch}", _after(ch)


_FACTS = fact_base()


def _fact(rng: np.random.Generator) -> tuple[str, str]:
    name = list(_FACTS)[int(rng.integers(0, len(_FACTS)))]
    key = ("color", "home")[int(rng.integers(0, 2))]
    return f"{key} of {name}", _FACTS[name][key]


def _all_add() -> list[tuple[str, str]]:
    return [(f"{a}+{b}", str(a + b)) for a in range(10) for b in range(10)]


def _all_after() -> list[tuple[str, str]]:
    return [(f"after {c}", _after(c)) for c in LETTERS]


def _all_facts() -> list[tuple[str, str]]:
    return [(f"{k} of {n}", v) for n, attrs in _FACTS.items() for k, v in attrs.items()]


PRETRAIN_SKILLS: dict[str, Generator] = {
    "reverse": _reverse,
    "last": _last,
    "count": _count,
    "max": _max,
    "add": _add,
    "after": _after_q,
    "facts": _fact,
}
# Knowledge skills: the whole table is the test (pretraining shows every fact).
KNOWLEDGE: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "add": _all_add,
    "after": _all_after,
    "facts": _all_facts,
}


def _shift(lo: int, hi: int) -> Generator:
    def gen(rng: np.random.Generator) -> tuple[str, str]:
        w = _word(rng, lo, hi)
        return f"shift {w}", "".join(_after(c) for c in w)

    return gen


def _min(lo: int, hi: int) -> Generator:
    def gen(rng: np.random.Generator) -> tuple[str, str]:
        d = _digits(rng, lo, hi)
        return "min " + " ".join(map(str, d)), str(min(d))

    return gen


# name -> (in-domain generator, near-OOD generator)
FINETUNE_TASKS: dict[str, tuple[Generator, Generator]] = {
    "shift": (_shift(2, 4), _shift(5, 5)),  # near-OOD: strings one letter longer than any trained
    "min": (_min(3, 4), _min(5, 6)),  # near-OOD: longer lists
}


# ----------------------------------------------------------------------------------------------------
# sampling and splits


def _unique(
    gen: Generator, skill: str, rng: np.random.Generator, n: int, exclude: set[str]
) -> list[TaskExample]:
    """``n`` examples with distinct prompts not in ``exclude`` (which is extended with them)."""
    out: list[TaskExample] = []
    for _ in range(200 * n + 1000):  # generous: every space used here is far larger than n
        if len(out) == n:
            return out
        q, a = gen(rng)
        prompt = format_prompt(q)
        if prompt not in exclude:
            exclude.add(prompt)
            out.append(TaskExample(prompt, a, skill))
    raise ValueError(f"skill {skill!r}: could not draw {n} distinct prompts")


def pretrain_heldout(seed: int = 0, n_per_skill: int = 50) -> list[TaskExample]:
    """Held-out pretraining prompts, ``n_per_skill`` per skill — the retention (far-OOD) set.

    Algorithmic skills get inputs never seen in pretraining; knowledge skills (``KNOWLEDGE``) a
    sample of their table (all of it when ``n_per_skill`` exceeds its size), which pretraining shows.
    """
    out: list[TaskExample] = []
    for i, (skill, gen) in enumerate(PRETRAIN_SKILLS.items()):
        rng = np.random.default_rng([seed, 1, i])  # one stream per skill: a smaller n gives a prefix
        if skill in KNOWLEDGE:
            table = KNOWLEDGE[skill]()
            picked = rng.permutation(len(table))[:n_per_skill]
            out += [TaskExample(format_prompt(table[j][0]), table[j][1], skill) for j in picked]
        else:
            out += _unique(gen, skill, rng, n_per_skill, set())
    return out


def pretrain_stream(seed: int = 0, n_heldout: int = 50) -> Iterator[TaskExample]:
    """An endless stream of pretraining examples, skills drawn uniformly; the prompts of
    ``pretrain_heldout(seed, n_heldout)`` of algorithmic skills never appear."""
    heldout = {ex.prompt for ex in pretrain_heldout(seed, n_heldout) if ex.skill not in KNOWLEDGE}
    rng = np.random.default_rng([seed, 2])
    skills = list(PRETRAIN_SKILLS.items())
    while True:
        skill, gen = skills[int(rng.integers(0, len(skills)))]
        q, a = gen(rng)
        prompt = format_prompt(q)
        if prompt not in heldout:
            yield TaskExample(prompt, a, skill)


@dataclass(frozen=True)
class TaskSplits:
    """A fine-tuning task's splits; train, validation and test prompts are pairwise disjoint."""

    name: str
    train: list[TaskExample]
    validation: list[TaskExample]
    test: list[TaskExample]  # in-domain
    near_ood: list[TaskExample]  # same skill, unseen lengths
    retention: list[TaskExample]  # far-OOD: held-out pretraining prompts


def task_splits(
    name: str, seed: int = 0, *, n_train: int = 2000, n_eval: int = 100, n_retention: int = 20
) -> TaskSplits:
    """The splits of fine-tuning task ``name`` ("shift" or "min"), deterministic under ``seed``.

    ``n_eval`` examples each for validation, test and near-OOD; ``n_retention`` held-out prompts per
    pretraining skill.
    """
    if name not in FINETUNE_TASKS:
        raise KeyError(f"unknown task {name!r}; expected one of {sorted(FINETUNE_TASKS)}")
    in_domain, near = FINETUNE_TASKS[name]
    rng = np.random.default_rng([seed, 3, sorted(FINETUNE_TASKS).index(name)])
    seen: set[str] = set()
    test = _unique(in_domain, name, rng, n_eval, seen)
    validation = _unique(in_domain, name, rng, n_eval, seen)
    train = _unique(in_domain, name, rng, n_train, seen)
    near_ood = _unique(near, name, rng, n_eval, set())
    return TaskSplits(name, train, validation, test, near_ood, pretrain_heldout(seed, n_retention))


# ----------------------------------------------------------------------------------------------------
# evaluation


def answer_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Generation stops at EOS or at a newline: an answer is one line."""
    return (*tokenizer.eos_ids, *tokenizer.encode("\n", bos=False))


def generate_answers(
    model: Model,
    tokenizer: Tokenizer,
    examples: list[TaskExample],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions of the examples' prompts (stopped at EOS or a newline), answers extracted.
    The task models are small: a large batch makes each decoding step one call per layer."""
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [tokenizer.encode(ex.prompt) for ex in examples[start : start + batch_size]]
        new = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_ids=answer_stop_ids(tokenizer),
            pad_id=tokenizer.pad_id,
        )
        out += [extract_answer(tokenizer.decode(ids)) for ids in new]
    return out


def perplexity(
    model: Model, tokenizer: Tokenizer, records: list[dict[str, str]], *, batch_size: int = 64
) -> float:
    """exp of the mean cross-entropy over the tokens the records train on: a completion and its EOS
    given the prompt (``{"prompt", "completion"}``), or every token (``{"text"}``); for a task
    example pass ``example.record``."""
    xp = get_xp(model.embed.weight)
    total, count = 0.0, 0
    for start in range(0, len(records), batch_size):
        batch = collate(
            [encode_example(tokenizer, r) for r in records[start : start + batch_size]], tokenizer.pad_id
        )
        logits, _ = model_forward(
            model, xp.asarray(batch.tokens), attention_mask=xp.asarray(batch.attention_mask), train=False
        )
        B, T, V = logits.shape
        loss, ce = cross_entropy_forward(logits.reshape(B * T, V), xp.asarray(batch.targets).reshape(-1))
        total, count = total + loss * ce.count, count + ce.count
    return math.exp(total / max(count, 1))


def evaluate(model: Model, tokenizer: Tokenizer, examples: list[TaskExample]) -> dict[str, float]:
    """Exact match overall ("all") and per skill on ``examples``."""
    preds = generate_answers(model, tokenizer, examples)
    result = {"all": exact_match(preds, examples)}
    for skill in dict.fromkeys(ex.skill for ex in examples):
        pairs = [(p, ex) for p, ex in zip(preds, examples, strict=True) if ex.skill == skill]
        result[skill] = exact_match([p for p, _ in pairs], [ex for _, ex in pairs])
    return result


# ----------------------------------------------------------------------------------------------------
# the study's world: a task that reuses pretrained skills in a new format, far-OOD splits, retention
#
# The papers fine-tune on data whose *skills* the base model already has (arithmetic for Math10K,
# world knowledge for the commonsense sets) in an instruction *format* it has not seen, and ask what
# the fine-tuned model keeps of everything else. ``instruct`` is that in miniature: four pretraining
# skills, their questions exactly as pretraining asks them, behind an instruction frame the
# pretraining corpus never contains,
#
#     Q: solve this: reverse abc\nA: cba        (pretraining: Q: reverse abc\nA: cba)
#
# so what fine-tuning has to learn is the format, and what it can reuse is the skill: a knowledge
# question of the test (``solve this: color of kibt``) was never fine-tuned on, only pretrained.
# Answers are of mixed types (a letter string, a digit, a number, a word from a closed vocabulary), so
# no single answer format scores: a model that has learned "answer with a digit" gets at most the
# number questions right. ``min`` (a new skill: new attention routing over a list) is the second task.


@dataclass(frozen=True)
class _Item:
    """One ``instruct`` question before it is framed: its skill, pretraining question and answer."""

    skill: str
    question: str
    answer: str


# the pretraining skills ``instruct`` reuses, and the type of every skill's answers
INSTRUCT_SKILLS = ("reverse", "max", "add", "facts")
ANSWER_TYPES: dict[str, str] = {
    "reverse": "string",  # letters, as many as the input's
    "shift": "string",
    "last": "letter",
    "after": "letter",
    "count": "digit",
    "max": "digit",
    "min": "digit",
    "add": "number",  # one or two digits
    "facts": "word",  # a colour or a home, from a closed vocabulary
}

# The instruction frame of ``instruct``, and the far-OOD surface forms: the same question behind the
# frame written another way. ``far_ood[i]`` is ``test[i]`` in form ``FAR_FORMS[i % 3]``, so the two
# accuracies compare the same questions and differ only in how the instruction is written.
FAR_FORMS = ("delimiter", "phrasing", "casing")
_FRAMES: dict[str, Callable[[str], str]] = {
    "in-domain": lambda q: f"solve this: {q}",
    "delimiter": lambda q: f"solve this - {q}",
    "phrasing": lambda q: f"please solve this: {q}",
    "casing": lambda q: f"Solve this: {q}",
}
_MIN_FORMS: dict[str, Callable[[str], str]] = {  # of the list "3 1 4" in "min 3 1 4"
    "delimiter": lambda digits: "min " + digits.replace(" ", ","),
    "phrasing": lambda digits: f"min of {digits}",
    "casing": lambda digits: f"Min {digits}",
}


def _instruct_algorithmic(skill: str, lo: int, hi: int) -> Callable[[np.random.Generator], _Item]:
    """Questions of ``skill`` asked as pretraining asks them, of inputs with ``lo`` to ``hi`` elements."""

    def gen(rng: np.random.Generator) -> _Item:
        if skill == "max":
            d = _digits(rng, lo, hi)
            return _Item(skill, "max " + " ".join(map(str, d)), str(max(d)))
        w = _word(rng, lo, hi)
        return _Item(skill, f"{skill} {w}", w[::-1] if skill == "reverse" else str(len(w)))

    return gen


# lengths: fine-tuning sees short inputs (words of 2–4 letters, lists of 3 digits); near-OOD asks
# ``max`` of longer lists, 4 digits (a length pretraining taught, 3–4) and 5–6 (longer than any seen),
# like ``min``'s near-OOD. (Longer words for ``reverse`` would test nothing: a model fine-tuned on 2–4
# letters stops after three whatever the method, though the base reverses five.)
_INSTRUCT_IN_DOMAIN = {"reverse": (2, 4), "max": (3, 3)}
_INSTRUCT_NEAR = {"max": (4, 6)}


def _quotas(n: int, caps: dict[str, int]) -> dict[str, int]:
    """``n`` split evenly over ``INSTRUCT_SKILLS``; a knowledge skill takes at most its cap, and what it
    cannot take goes to the algorithmic skills."""
    k = len(INSTRUCT_SKILLS)
    quota = {s: n // k + (i < n % k) for i, s in enumerate(INSTRUCT_SKILLS)}
    for skill, cap in caps.items():
        quota[skill] = min(quota[skill], cap)
    algorithmic = [s for s in INSTRUCT_SKILLS if s not in caps]
    for i in range(n - sum(quota.values())):
        quota[algorithmic[i % len(algorithmic)]] += 1
    return quota


def _draw_items(
    rng: np.random.Generator,
    quota: dict[str, int],
    gens: dict[str, Callable[[np.random.Generator], _Item]],
    seen: set[str],
) -> list[_Item]:
    """``quota[skill]`` items of each skill in ``gens``, each with a question not in ``seen`` (which is
    extended with them)."""
    out: list[_Item] = []
    for skill, gen in gens.items():
        drawn = 0
        for _ in range(200 * quota[skill] + 1000):
            if drawn == quota[skill]:
                break
            item = gen(rng)
            if item.question not in seen:
                seen.add(item.question)
                out.append(item)
                drawn += 1
        else:
            raise ValueError(f"instruct: could not draw {quota[skill]} distinct {skill} questions")
    return out


def _framed(items: list[_Item], rng: np.random.Generator) -> list[TaskExample]:
    """The items in a seeded random order (skills interleaved), behind the in-domain frame."""
    ordered = [items[j] for j in rng.permutation(len(items))]
    return [
        TaskExample(format_prompt(_FRAMES["in-domain"](it.question)), it.answer, it.skill) for it in ordered
    ]


@dataclass(frozen=True)
class StudySplits(TaskSplits):
    """A study task's splits: ``TaskSplits`` (train, validation, in-domain test, near-OOD, retention)
    and ``far_ood``, the in-domain test questions in surface forms fine-tuning never showed."""

    far_ood: list[TaskExample]  # far_ood[i]: test[i] written in form FAR_FORMS[i % len(FAR_FORMS)]


def _question(ex: TaskExample) -> str:
    """The question of a ``Q: <question>\\nA: `` prompt."""
    return ex.prompt[len("Q: ") : -len("\nA: ")]


def _instruct_splits(seed: int, n_train: int, n_eval: int, n_retention: int) -> StudySplits:
    rng = np.random.default_rng([seed, 4, 0])
    # knowledge tables: a quarter of each for test, a quarter for validation, the rest for training,
    # so test asks facts the base knows but fine-tuning never showed in the new format
    tables = {s: [_Item(s, q, a) for q, a in KNOWLEDGE[s]()] for s in INSTRUCT_SKILLS if s in KNOWLEDGE}
    tables = {s: [t[j] for j in rng.permutation(len(t))] for s, t in tables.items()}
    q = {s: len(t) // 4 for s, t in tables.items()}
    parts = {
        "test": {s: t[: q[s]] for s, t in tables.items()},
        "validation": {s: t[q[s] : 2 * q[s]] for s, t in tables.items()},
        "train": {s: t[2 * q[s] :] for s, t in tables.items()},
    }
    # a question held out for retention is never a fine-tuning question of an algorithmic skill
    seen = {_question(ex) for ex in pretrain_heldout(seed, 50) if ex.skill not in KNOWLEDGE}
    gens = {s: _instruct_algorithmic(s, *_INSTRUCT_IN_DOMAIN[s]) for s in _INSTRUCT_IN_DOMAIN}
    items: dict[str, list[_Item]] = {}
    for name, n in (("test", n_eval), ("validation", n_eval), ("train", n_train)):
        # evaluation asks each knowledge question once (its share capped at its part of the table);
        # training repeats its part up to an even share, so the four skills weigh the same in the loss
        caps = {} if name == "train" else {s: len(p) for s, p in parts[name].items()}
        quota = _quotas(n, caps)
        knowledge = [p[j % len(p)] for s, p in parts[name].items() for j in range(quota[s])]
        items[name] = _draw_items(rng, quota, gens, seen) + knowledge
    near_gens = {s: _instruct_algorithmic(s, *_INSTRUCT_NEAR[s]) for s in _INSTRUCT_NEAR}
    near = _draw_items(rng, {"max": n_eval}, near_gens, seen)
    train, validation, test = (_framed(items[s], rng) for s in ("train", "validation", "test"))
    frame = _FRAMES["in-domain"]("")
    far = [
        TaskExample(
            format_prompt(_FRAMES[FAR_FORMS[i % 3]](_question(ex)[len(frame) :])), ex.answer, ex.skill
        )
        for i, ex in enumerate(test)
    ]
    retention = pretrain_heldout(seed, n_retention)
    return StudySplits("instruct", train, validation, test, _framed(near, rng), retention, far)


def _min_splits(seed: int, n_train: int, n_eval: int, n_retention: int) -> StudySplits:
    s = task_splits("min", seed, n_train=n_train, n_eval=n_eval, n_retention=n_retention)
    far = [
        TaskExample(
            format_prompt(_MIN_FORMS[FAR_FORMS[i % 3]](_question(ex)[len("min ") :])), ex.answer, ex.skill
        )
        for i, ex in enumerate(s.test)
    ]
    return StudySplits(s.name, s.train, s.validation, s.test, s.near_ood, s.retention, far)


STUDY_TASKS: dict[str, Callable[[int, int, int, int], StudySplits]] = {
    "instruct": _instruct_splits,
    "min": _min_splits,
}


def study_splits(
    name: str, seed: int = 0, *, n_train: int = 2000, n_eval: int = 100, n_retention: int = 20
) -> StudySplits:
    """The splits of study task ``name``, deterministic under ``seed``.

    ``instruct``: the questions of the pretraining skills ``INSTRUCT_SKILLS`` (reverse, max, add,
    facts), each behind the frame ``solve this: `` (``Q: solve this: 3+4\\nA: 7``). Each split is an
    even mix of the four, shuffled; validation and test ask each of their knowledge questions once
    (at most a quarter of the table each), training repeats its part of the tables (the other half)
    to an even share. Train, validation and test share no question (``max`` has 1000 lists of three
    digits, so ``n_train`` stays below about 3,600). ``near_ood``: ``max`` of 4–6 digits, longer lists
    than fine-tuning shows. ``far_ood``: the test
    questions behind the frame written another way (``FAR_FORMS``: ``solve this - 3+4``, ``please
    solve this: 3+4``, ``Solve this: 3+4``).

    ``min``: ``task_splits("min", ...)`` unchanged, and its test written as ``min 3,1,4``, ``min of
    3 1 4`` and ``Min 3 1 4``.

    ``n_eval`` examples each for validation, test, near- and far-OOD; ``retention`` holds
    ``n_retention`` held-out pretraining prompts per skill, in the pretraining format (see
    ``retention_scores``).
    """
    if name not in STUDY_TASKS:
        raise KeyError(f"unknown study task {name!r}; expected one of {sorted(STUDY_TASKS)}")
    return STUDY_TASKS[name](seed, n_train, n_eval, n_retention)


# ----------------------------------------------------------------------------------------------------
# retention, three ways: exact match, teacher-forced answer NLL, wrong-format rate


def answer_format(example: TaskExample) -> re.Pattern[str]:
    """The pattern every answer of ``example``'s skill matches, right or wrong: its *format*.

    A fine-tuned model that answers a retention prompt in the fine-tuning task's format (a digit for
    ``reverse``, a letter string for ``add``) has forgotten more than one that answers in the right
    format with the wrong content; exact match alone cannot tell the two apart. ``facts`` answers are
    a colour for colour questions and a home for home questions (the category of the reference).
    """
    kind = ANSWER_TYPES.get(example.skill)
    if kind == "word":
        words = {a["color"] for a in _FACTS.values()}
        if example.answer not in words:
            words = {a["home"] for a in _FACTS.values()}
        return re.compile("|".join(sorted(words)))
    patterns = {"string": "[a-z]+", "letter": "[a-z]", "digit": "[0-9]", "number": "[0-9]{1,2}"}
    if kind not in patterns:
        raise KeyError(f"no answer format for skill {example.skill!r}")
    return re.compile(patterns[kind])


def has_expected_format(prediction: str, example: TaskExample) -> bool:
    """Whether the extracted ``prediction`` has the format of ``example``'s skill (``answer_format``)."""
    return answer_format(example).fullmatch(extract_answer(prediction)) is not None


def wrong_format_rate(predictions: list[str], examples: list[TaskExample]) -> float:
    """The fraction of predictions not in their skill's answer format."""
    if not examples:
        return 0.0
    pairs = zip(predictions, examples, strict=True)
    return sum(not has_expected_format(p, ex) for p, ex in pairs) / len(examples)


def answer_nll(model: Model, tokenizer: Tokenizer, examples: list[TaskExample]) -> dict[str, float]:
    """Teacher-forced negative log-likelihood (nats per token) of the reference answers and their EOS
    given the prompts, overall ("all") and per skill: the log of ``perplexity``.

    Unlike exact match it moves before an answer flips, so it sees forgetting that exact match, at
    its floor or ceiling, hides.
    """
    result = {"all": math.log(perplexity(model, tokenizer, [ex.record for ex in examples]))}
    for skill in dict.fromkeys(ex.skill for ex in examples):
        records = [ex.record for ex in examples if ex.skill == skill]
        result[skill] = math.log(perplexity(model, tokenizer, records))
    return result


def retention_scores(
    model: Model, tokenizer: Tokenizer, examples: list[TaskExample]
) -> dict[str, dict[str, float]]:
    """Retention on ``examples`` (held-out pretraining prompts) three ways, each overall ("all") and
    per skill: ``exact_match``, ``answer_nll`` (``answer_nll``) and ``wrong_format`` (the rate of
    answers not in their skill's format, ``wrong_format_rate``). One greedy generation pass."""
    preds = generate_answers(model, tokenizer, examples)
    em, wrong = {"all": exact_match(preds, examples)}, {"all": wrong_format_rate(preds, examples)}
    for skill in dict.fromkeys(ex.skill for ex in examples):
        pairs = [(p, ex) for p, ex in zip(preds, examples, strict=True) if ex.skill == skill]
        em[skill] = exact_match([p for p, _ in pairs], [ex for _, ex in pairs])
        wrong[skill] = wrong_format_rate([p for p, _ in pairs], [ex for _, ex in pairs])
    return {"exact_match": em, "answer_nll": answer_nll(model, tokenizer, examples), "wrong_format": wrong}
