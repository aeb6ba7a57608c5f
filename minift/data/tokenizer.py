"""A thin wrapper over a Hugging Face ``tokenizers.Tokenizer`` (a ``tokenizer.json`` file).

Special tokens follow the file: the BOS a post-processor adds (Llama's ``TemplateProcessing``
``<s> $A``) is kept and never added twice; a tokenizer without one (Qwen2) gets no BOS unless
``add_bos=True`` asks for it. EOS is one id or several (Llama 3 ends turns with either of two).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Tokenizer as HFTokenizer

from minift.config import is_int
from minift.data.chat_template import ChatTemplate, load_chat_template
from minift.errors import DataError
from minift.io.jsonio import read_json_object

T = TypeVar("T")


class UnknownTokenWarning(UserWarning):
    """Text mapped to the vocabulary's unknown token: what it said is lost to the model."""


class Tokenizer:
    """Text ↔ ids with the BOS/EOS/PAD conventions training and generation need.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        eos_ids: the id(s) that end a sequence; the first one is appended to training examples.
        bos_id: the BOS id, used only with ``add_bos=True`` when the post-processor adds none.
        pad_id: the id right/left padding uses (its positions are masked, so any id works); defaults
            to the first EOS id, as Hugging Face does for models without a pad token.
        add_bos: None: BOS exactly as the post-processor adds it; True: also when it adds none;
            False: never (strip the post-processor's prefix).

    ``encode`` warns (``UnknownTokenWarning``, with the count and the first piece of text affected)
    when text maps to the model's unknown token, e.g. characters outside a character-level
    vocabulary: silently training on ``<unk>`` is a data bug.
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        eos_ids: int | Sequence[int] = (),
        bos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool | None = None,
    ) -> None:
        self.hf = tokenizer
        self.eos_ids: tuple[int, ...] = (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids)
        self.bos_id = bos_id
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.add_bos = add_bos
        self.chat_template: ChatTemplate | None = None  # set by from_pretrained when the folder has one
        if add_bos and bos_id is None:
            raise DataError("add_bos=True needs a bos_id")
        # every special id is an integer inside the vocabulary (an id past it would index nothing)
        V = self.vocab_size
        named = [("eos_token_id", e) for e in self.eos_ids] + [("bos_id", bos_id), ("pad_id", self.pad_id)]
        for name, tid in named:
            if tid is not None and not (is_int(tid) and 0 <= tid < V):
                raise DataError(f"tokenizer: {name} {tid!r} is not an id of the {V}-token vocabulary of "
                                "tokenizer.json")
        unk = getattr(tokenizer.model, "unk_token", None)  # WordLevel, WordPiece, BPE; None if unset
        self.unk_id: int | None = None if unk is None else tokenizer.token_to_id(str(unk))

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Tokenizer:
        """Load a ``tokenizer.json``; keyword arguments as in the constructor."""
        hf = _library(lambda: HFTokenizer.from_file(str(path)), f"{path}: not a readable tokenizer.json")
        return cls(hf, **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """Load a Hugging Face model folder's tokenizer: ``tokenizer.json``, with BOS/EOS/PAD tokens from
        ``tokenizer_config.json`` and EOS id(s) from ``generation_config.json`` when present (the ids
        generation stops on, which may be several)."""
        folder = Path(folder)
        hf_path = folder / "tokenizer.json"
        tok = cls.from_file(hf_path)
        config = _read_json(folder / "tokenizer_config.json")
        ids: dict[str, int | None] = {}
        for name in ("bos_token", "eos_token", "pad_token"):
            ids[name] = tok._special_id(config.get(name), folder / "tokenizer_config.json", name)
        gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        if gen_eos is not None and not _is_ids(gen_eos):
            raise DataError(f"{folder / 'generation_config.json'}: eos_token_id must be an integer or a list "
                            f"of integers, got {gen_eos!r}")
        eos: int | Sequence[int] = gen_eos if gen_eos is not None else (
            () if ids["eos_token"] is None else ids["eos_token"]
        )
        try:
            loaded = cls(tok.hf, eos_ids=eos, bos_id=ids["bos_token"], pad_id=ids["pad_token"])
        except DataError as e:  # name the files the ids came from
            raise DataError(f"{folder}: {str(e).removeprefix('tokenizer: ')} (from tokenizer_config.json "
                            "or generation_config.json)") from None
        loaded.chat_template = load_chat_template(folder)
        return loaded

    def _special_id(self, token: Any, path: Path, key: str) -> int | None:
        if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
            if not isinstance(token.get("content"), str):
                raise DataError(f"{path}: {key} must be a token string or an object with a string "
                                f"'content', got {token!r}")
            token = token["content"]
        if token is None:
            return None
        if not isinstance(token, str):
            raise DataError(f"{path}: {key} must be a token string, got {token!r}")
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise DataError(f"{path}: {key} {token!r} is not in the vocabulary of tokenizer.json")
        return int(tid)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Ids of ``text``, with BOS (per ``add_bos``) when ``bos`` and never with an EOS: callers
        append EOS where a training sequence ends (``encode_example``)."""
        encoding = _library(lambda: self.hf.encode(text, add_special_tokens=False),
                            f"cannot tokenize {text[:40]!r}")
        plain = encoding.ids
        if self.unk_id is not None and self.unk_id in plain:
            self._warn_unknown(text, plain, encoding.offsets)
        if not bos or self.add_bos is False:
            return list(plain)
        prefix = self._post_processor_prefix(text, plain)
        if not prefix and self.add_bos and self.bos_id is not None:
            prefix = [self.bos_id]
        return prefix + list(plain)

    def _warn_unknown(self, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        at = [k for k, i in enumerate(ids) if i == self.unk_id]
        start, end = offsets[at[0]]
        warnings.warn(
            f"{len(at)} token(s) of the text map to the unknown token (id {self.unk_id}); the first is "
            f"{text[start:end]!r} at character {start} of {text[:60]!r}",
            UnknownTokenWarning,
            stacklevel=3,
        )

    def _post_processor_prefix(self, text: str, plain: list[int]) -> list[int]:
        """The ids the post-processor puts before the text (e.g. [BOS]); suffixes such as an EOS a
        template adds are dropped, so a prompt can be continued."""
        full = _library(lambda: self.hf.encode(text, add_special_tokens=True).ids,
                        f"cannot tokenize {text[:40]!r} with the tokenizer's post-processor")
        n = len(plain)
        for k in range(len(full) - n + 1):
            if full[k : k + n] == plain:
                return list(full[:k])
        return []

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))


def _library(call: Callable[[], T], what: str) -> T:
    """``call()`` into the tokenizers library, its failures a DataError: it raises a bare Exception
    for malformed files, TypeError for text with lone surrogates, and a Rust panic (a BaseException)
    for a post-processor naming a token the file does not define."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # PanicException derives from BaseException
        raise DataError(f"{what} ({type(e).__name__}: {e})") from None


def _is_ids(value: Any) -> bool:
    """An id (int, not bool) or a list of ids."""
    return all(type(i) is int for i in (value if isinstance(value, list) else [value]))


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when the (optional) file is absent."""
    return read_json_object(path, error=DataError) if path.exists() else {}
