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

Evaluation is exact match after answer extraction (greedy generation up to EOS or a newline) and
perplexity over the answer tokens. The tokenizer is character-level (``build_tokenizer``).
"""

from __future__ import annotations

import json
import math
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
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of the examples' prompts (stopped at EOS or a newline), answers extracted."""
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
