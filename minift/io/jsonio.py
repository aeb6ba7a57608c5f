"""Reading JSON strictly: one parser and one set of typed getters for every JSON file minift reads
(config.json, generation_config.json, tokenizer_config.json, adapter_config.json, adapter.json,
state.json, safetensors headers, sharded indexes, JSONL lines), so every file fails the same clear way.

Python's ``json`` accepts more than a file format should: ``NaN``/``Infinity`` (not JSON at all), numbers
of any length (a 5,000-digit integer raises a bare ``ValueError`` on conversion), nesting until the
interpreter's recursion limit (``RecursionError``) and repeated keys (the last one silently wins).
``loads`` closes each of these, and the getters check types the way a config means them: an integer is
an ``int`` and not a ``bool`` (``True`` is an ``int`` in Python), a float is finite, a flag is JSON
``true``/``false`` and not the truthy string ``"false"``. Every error is the caller's ``MinIFTError``
subclass and names the file (or ``file:line``) and the key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from minift.errors import CheckpointError, MinIFTError

MAX_BYTES = 256 * 2**20  # a JSON file beside a model is kilobytes; a tokenizer.json a few megabytes
MAX_DEPTH = 64  # real configs nest 3-4 levels deep
MAX_DIGITS = 100  # longer than any id, size or float literal a real file holds

_MISSING = object()


def _number(kind: type, limit: int = MAX_DIGITS) -> Any:
    def parse(text: str) -> Any:
        if len(text) > limit:
            raise _NumberTooLong(text)
        return kind(text)

    return parse


class _NumberTooLong(ValueError):
    pass


def _depth_ok(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest at most ``limit`` deep (checked before parsing, so the
    parser's recursion is bounded)."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes, where: str, *, error: type[MinIFTError] = CheckpointError,
          max_depth: int = MAX_DEPTH, label: str = "") -> Any:
    """Parse JSON text strictly; ``where`` (a file, or ``file:line``) names it in every error, and
    ``label`` (e.g. "the header") what part of it the text is.

    Refused: invalid JSON or UTF-8, NaN and ±Infinity, numbers longer than ``MAX_DIGITS`` characters,
    nesting deeper than ``max_depth``, a key repeated within one object, and lone surrogates
    (``"\\ud800"``: no UTF-8 text can hold them).
    """
    invalid = f"{where}: {label + ' is ' if label else ''}not valid JSON"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{invalid} (not UTF-8: {e})") from None
    if len(text) > MAX_BYTES:
        raise error(f"{where}: {len(text)} characters of JSON is beyond the {MAX_BYTES} limit")
    if text.count("[") + text.count("{") > max_depth and not _depth_ok(text, max_depth):
        raise error(f"{where}: JSON nested more than {max_depth} levels deep")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where}: key {key!r} appears twice in one object")
            out[key] = value
        return out

    try:
        value = json.loads(text, parse_int=_number(int), parse_float=_number(float),
                           parse_constant=_no_constants, object_pairs_hook=unique)
    except _NumberTooLong as e:
        raise error(f"{where}: a number of {len(str(e))} characters (at most {MAX_DIGITS})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN, a recursion limit lower than ours
        raise error(f"{invalid} ({e})") from None
    _check_strings(value, where, error)
    return value


def _check_strings(value: Any, where: str, error: type[MinIFTError]) -> None:
    """Refuse lone surrogates (JSON escapes can write them; they are not text and break every encoder)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise error(f"{where}: a string holds a lone surrogate escape (e.g. \\ud800), "
                            "which is not text") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float) and not math.isfinite(v):  # 1e999 parses to inf
            raise error(f"{where}: a number overflows to {v} (finite numbers only)")


def read_json(path: Path, *, error: type[MinIFTError] = CheckpointError) -> Any:
    """The JSON value in ``path`` (strict, as ``loads``)."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise error(f"{path}: {size} bytes is beyond the {MAX_BYTES}-byte limit for a JSON file")
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    return loads(raw, str(path), error=error)


def read_json_object(path: Path, *, error: type[MinIFTError] = CheckpointError) -> dict[str, Any]:
    """The JSON object in ``path``; an unreadable file, invalid JSON (or UTF-8) or a value that is not
    an object raises ``error`` naming the file and what was wrong."""
    data = read_json(path, error=error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------
# typed getters: ``get_int(obj, "r", where, default=8, lo=1)``


class Fields:
    """A JSON object read through typed getters; every error names ``where`` and the key."""

    def __init__(self, obj: Mapping[str, Any], where: str, error: type[MinIFTError] = CheckpointError,
                 *, null_is_default: bool = True):
        # Hugging Face configs write null for "the default"; other formats may refuse it
        self.obj, self.where, self.error, self.null_is_default = obj, where, error, null_is_default

    def fail(self, key: str, what: str, value: Any) -> MinIFTError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return self.error(f"{self.where}: {key!r} must be {what}, got {shown}")

    def _get(self, key: str | tuple[str, ...], default: Any) -> tuple[str, Any]:
        """The first of the keys present and not null (aliases), or the default."""
        keys = (key,) if isinstance(key, str) else key
        for k in keys:
            if k in self.obj and (self.obj[k] is not None or not self.null_is_default):
                return k, self.obj[k]
        if default is _MISSING:
            raise self.error(f"{self.where}: missing required key {keys[0]!r}")
        return keys[0], default

    def int(self, key: str | tuple[str, ...], default: Any = _MISSING, *, lo: int | None = None,
            hi: int | None = None) -> Any:
        """An integer (not a bool, not "2", not 2.0) in [lo, hi]; the default is returned as is."""
        k, v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        return check_int(v, lo, hi, lambda what: self.fail(k, what, v))

    def float(self, key: str | tuple[str, ...], default: Any = _MISSING, *, positive: bool = False,
              nonneg: bool = False) -> Any:
        """A finite number (int or float, not bool), as float; > 0 with ``positive``, ≥ 0 with ``nonneg``."""
        k, v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        return check_float(v, positive=positive, nonneg=nonneg, fail=lambda what: self.fail(k, what, v))

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        """JSON true or false (a string such as "false" is refused: it would be truthy)."""
        k, v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if type(v) is not bool:
            raise self.fail(k, "true or false", v)
        return v

    def str(self, key: str | tuple[str, ...], default: Any = _MISSING, *,
            choices: Collection[str] | None = None) -> Any:
        """A string, one of ``choices`` when given."""
        k, v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str):
            raise self.fail(k, "a string", v)
        if choices is not None and v not in choices:
            raise self.fail(k, f"one of {sorted(choices)}", v)
        return v

    def obj_(self, key: str, default: Any = _MISSING) -> Any:
        """A JSON object."""
        k, v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, dict):
            raise self.fail(k, "a JSON object", v)
        return v

    def ints(self, key: str, default: Any = _MISSING, *, lo: int | None = None, hi: int | None = None,
             scalar: bool = False) -> Any:
        """A list of integers in [lo, hi] as a tuple (with ``scalar``, one integer is one-element)."""
        k, v = self._get(key, default)
        if v is default and default is not _MISSING:
            return v
        values = [v] if scalar and not isinstance(v, list) else v
        if not isinstance(values, list):
            raise self.fail(k, "a list of integers", v)
        what = "an integer or a list of integers" if scalar else "a list of integers"
        for item in values:
            check_int(item, lo, hi, lambda w: self.fail(k, f"{what} ({w})", v))
        return tuple(values)


def check_int(v: Any, lo: int | None, hi: int | None, fail: Any) -> int:
    """``v`` if it is an int (not a bool) within [lo, hi]; else raise ``fail(what)``."""
    if type(v) is not int or (lo is not None and v < lo) or (hi is not None and v > hi):
        what = {(None, None): "an integer", (1, None): "a positive integer", (0, None): "an integer >= 0"}
        raise fail(what.get((lo, hi), f"an integer in [{lo}, {hi}]"))
    return v


def check_float(v: Any, *, positive: bool = False, nonneg: bool = False, fail: Any) -> float:
    """``float(v)`` if ``v`` is a finite int or float (not a bool), > 0 / ≥ 0 when asked; else
    raise ``fail(what)``."""
    if type(v) not in (int, float):
        raise fail("a number")
    try:
        x = float(v)
    except OverflowError:
        raise fail("a finite number") from None
    if not math.isfinite(x):
        raise fail("a finite number")
    if positive and not x > 0:
        raise fail("a positive number")
    if nonneg and not x >= 0:
        raise fail("a number >= 0")
    return x


_ASCII_DIGITS = re.compile(r"[0-9]+")


def ascii_int(text: str) -> int | None:
    """The value of a string of ASCII digits, else None (``str.isdigit`` accepts ``²`` and ``٠``)."""
    return int(text) if _ASCII_DIGITS.fullmatch(text) and len(text) <= MAX_DIGITS else None
