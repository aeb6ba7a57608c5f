"""Training data: JSONL records, tokenized examples with a loss mask, and deterministic batches.

A record is ``{"prompt": ..., "completion": ...}`` (loss on the completion and its EOS only),
``{"text": ...}`` (loss on every token, language modelling) or ``{"messages": [...]}`` (a chat,
rendered with the model's chat template, loss on the assistant turns: ``minift.data.chat``).
Examples are batched with RIGHT padding and an attention mask, and the targets are already shifted,
as ``minift.model.loss_and_grads`` expects: ``targets[b, t]`` is the token that follows position t,
−100 where nothing is learned (prompt tokens, padding, the last position).

The batch order is a pure function of (seed, batch index), so a resumed run sees exactly the batches
an uninterrupted one would, without saving any data-loader state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from minift.data.chat import encode_chat
from minift.data.chat_template import check_messages
from minift.data.tokenizer import Tokenizer
from minift.errors import DataError
from minift.io.jsonio import loads
from minift.layers.cross_entropy import IGNORE_INDEX

Record = dict[str, Any]  # str values; a chat's "messages" is a list of {role, content}


class Example(NamedTuple):
    ids: list[int]  # the whole sequence: (BOS) prompt completion EOS
    labels: list[int]  # ids where the loss counts, IGNORE_INDEX elsewhere (same length)


class Batch(NamedTuple):
    tokens: np.ndarray  # (B, T) int64, right-padded
    targets: np.ndarray  # (B, T) int64, shifted: targets[b, t] = labels[b, t + 1]
    attention_mask: np.ndarray  # (B, T) int64, 1 = token, 0 = padding


def read_jsonl(path: str | Path) -> list[Record]:
    """Read a JSONL file of ``{"prompt", "completion"}`` or ``{"text"}`` objects (blank lines skipped).

    Raises:
        DataError naming the file and the 1-based line number, saying what was expected.
    """
    path = Path(path)
    try:
        # split on "\n" only: str.splitlines also breaks at U+2028, U+2029 and U+0085, which JSON allows
        # unescaped inside strings (read_text has already turned "\r\n" into "\n")
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:  # strict: no NaN, huge numbers, deep nesting or lone surrogates
            obj = loads(line, where, error=DataError)
        except DataError:
            try:  # plain invalid JSON: say at which column
                json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f'{where}: invalid JSON ({e.msg} at column {e.colno}); expected one object per line, '
                    'e.g. {"prompt": "...", "completion": "..."} or {"text": "..."}'
                ) from None
            except (ValueError, RecursionError):
                pass
            raise
        records.append(_check_record(obj, where))
    if not records:
        raise DataError(f"{path}: no records; expected one JSON object per line")
    return records


def _check_record(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if keys == {"messages"}:
        return {"messages": check_messages(obj["messages"], where)}
    if keys == {"prompt", "completion"} or keys == {"text"}:
        for k, v in obj.items():
            if not isinstance(v, str):
                raise DataError(f"{where}: {k!r} must be a string, got {type(v).__name__}")
        return obj
    raise DataError(
        f"{where}: expected the keys {{'prompt', 'completion'}} or {{'text'}}, got {sorted(keys)} "
        "(chat data: {'messages'})"
    )


def encode_example(tokenizer: Tokenizer, record: Record, *, max_length: int | None = None) -> Example:
    """Tokenize one record. Prompt and completion are tokenized separately, so the loss mask falls
    exactly on the boundary; the completion (or text) is followed by the first EOS id, which is
    learned (that is how the model learns to stop).

    ``max_length`` truncates the end of a too-long sequence.
    """
    if "messages" in record:  # the template writes the turns' end tokens itself
        return Example(*encode_chat(tokenizer, record["messages"], max_length=max_length))
    eos = list(tokenizer.eos_ids[:1])
    if "text" in record:
        ids = tokenizer.encode(record["text"]) + eos
        labels = list(ids)
    else:
        prompt = tokenizer.encode(record["prompt"])
        completion = tokenizer.encode(record["completion"], bos=False) + eos
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels)


def lm_examples(tokenizer: Tokenizer, text: str, block_size: int) -> list[Example]:
    """Plain-text language modelling: tokenize ``text`` once (BOS, text, EOS) and cut the ids into
    blocks of ``block_size`` tokens, every token counted (Hugging Face's ``group_texts``). A shorter
    last block is kept."""
    if block_size < 2:
        raise DataError(f"block_size must be at least 2 (a token and its successor), got {block_size}")
    ids = tokenizer.encode(text) + list(tokenizer.eos_ids[:1])
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    return [Example(b, list(b)) for b in blocks if len(b) >= 2]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad examples to the longest one and shift the labels into next-token targets.

    Shapes:
        returns tokens, targets, attention_mask: (B, T) with T the longest example
    """
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    B, T = len(examples), max(len(e.ids) for e in examples)
    tokens = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T + 1), IGNORE_INDEX, dtype=np.int64)  # one extra column: the last has no successor
    mask = np.zeros((B, T), dtype=np.int64)
    for b, e in enumerate(examples):
        n = len(e.ids)
        tokens[b, :n], labels[b, :n], mask[b, :n] = e.ids, e.labels, 1
    return Batch(tokens, labels[:, 1:], mask)


class BatchStream:
    """Micro-batches of ``batch_size`` examples, reshuffled every epoch, addressed by index.

    Batch i lies in epoch e = i // batches_per_epoch, which is ordered by a permutation drawn from
    ``numpy.random.default_rng([seed, e])``: the same (seed, i) always gives the same batch, so training
    can resume at any step without data-loader state. The last batch of an epoch may be smaller.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not examples or batch_size < 1:
            raise DataError(
                f"need at least one example and batch_size >= 1 (got {len(examples)}, {batch_size})"
            )
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.batches_per_epoch = -(-len(self.examples) // batch_size)
        self._order: tuple[int, np.ndarray] | None = None  # the current epoch's permutation, cached

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.examples)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def batch(self, index: int) -> Batch:
        """The ``index``-th micro-batch of the stream (0-based, over all epochs)."""
        epoch, j = divmod(index, self.batches_per_epoch)
        rows = self._permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return collate([self.examples[int(r)] for r in rows], self.pad_id)
