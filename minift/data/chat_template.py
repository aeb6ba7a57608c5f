"""Chat templates: a model's own Jinja2 template, rendered as transformers renders it, and the spans of
the assistant turns in a rendered conversation.

An instruction model is trained and used through its *chat template*, a Jinja2 program shipped in
its folder (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``: a string, or a
list of ``{"name", "template"}`` of which ``default`` is used). It is rendered exactly as transformers'
``apply_chat_template`` renders it: a Jinja2 ``ImmutableSandboxedEnvironment`` (templates from the Hub
are untrusted code) with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, the
``tojson`` filter without HTML escaping, the globals ``raise_exception``, ``strftime_now`` and a
``namespace`` that refuses underscore names, and the variables ``messages``,
``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...) as strings.
The rendered text is tokenized WITHOUT the tokenizer's own special tokens (the template already
writes BOS where the model wants one), so the ids are those of
``apply_chat_template(messages, tokenize=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from minift.errors import DataError
from minift.io.jsonio import read_json_object

TEMPLATE_FILE, TOKENIZER_CONFIG = "chat_template.jinja", "tokenizer_config.json"
ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, str]


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's source, the file it came from (for error messages), and the special tokens
    the template sees as variables (``bos_token``, ``eos_token``, ... as strings)."""

    source: str
    path: Path
    special_tokens: dict[str, str] = field(default_factory=dict)

    @cached_property
    def _compiled(self) -> Any:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            # jinja2's own tojson escapes HTML characters (< > &), which would change the prompt
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_block()]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        env.globals["namespace"] = _namespace_type()
        try:
            return env.from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise DataError(
                f"{self.path}: the chat template does not parse (line {e.lineno}: {e.message})"
            ) from None
        except (RecursionError, MemoryError, ValueError) as e:  # a pathological template
            raise DataError(
                f"{self.path}: the chat template cannot be compiled ({type(e).__name__})"
            ) from None

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as transformers renders it."""
        import jinja2

        try:
            return str(self._compiled.render(
                messages=[dict(m) for m in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            ))
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"{self.path}: the chat template failed on this conversation ({e})") from None
        except Exception as e:  # the template is a program from the model folder: any error is its own
            raise DataError(
                f"{self.path}: the chat template failed on this conversation ({type(e).__name__}: {e})"
            ) from None

    def end_of_turn(self) -> str:
        """The text that closes an assistant turn (``<|im_end|>\\n``, ``<|eot_id|>``): what the template
        writes after a reply, found by rendering a probe conversation."""
        probe = "minift-probe-reply"
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
        at = text.rfind(probe)
        return text[at + len(probe):] if at >= 0 else ""


def _generation_block() -> type:
    """The ``{% generation %}…{% endgeneration %}`` tag transformers defines to mark assistant text:
    here it renders its body unchanged (the mask comes from prefixes), so templates using it parse."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    return GenerationBlock


def _namespace_type() -> type:
    """jinja2's ``namespace`` that refuses underscore attributes (as transformers' does): a template
    must not reach CPython internals through names it stores."""
    import jinja2
    from jinja2.utils import Namespace

    def check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    class SafeNamespace(Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's signature: ``namespace(self=...)`` works
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                check(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            check(name)
            Namespace.__setitem__(self, name, value)

    return SafeNamespace


def load_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The chat template of a model folder, or None when it has none. ``chat_template.jinja`` wins over
    ``tokenizer_config.json`` (as in transformers ≥ 4.43); a list of named templates gives ``default``."""
    folder = Path(folder)
    config_path = folder / TOKENIZER_CONFIG
    config = read_json_object(config_path, error=DataError) if config_path.is_file() else {}
    map_path = folder / "special_tokens_map.json"  # older folders keep the special tokens here
    tokens_map = read_json_object(map_path, error=DataError) if map_path.is_file() else {}
    special = {}
    for key, value in {**tokens_map, **config}.items():
        if key.endswith("_token") and isinstance(value, dict):
            value = value.get("content")
        if key.endswith("_token") and isinstance(value, str):
            special[key] = value
    jinja_path = folder / TEMPLATE_FILE
    if jinja_path.is_file():
        try:
            return ChatTemplate(jinja_path.read_text(encoding="utf-8"), jinja_path, special)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{jinja_path}: cannot read the chat template ({e})") from None
    source = config.get("chat_template")
    if source is None:
        return None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
        if source is None:
            raise DataError(
                f"{config_path}: 'chat_template' lists {sorted(map(str, named))}, none named 'default'"
            )
    if not isinstance(source, str):
        raise DataError(f"{config_path}: 'chat_template' must be a string or a list of named templates")
    return ChatTemplate(source, config_path, special)


def check_messages(obj: Any, where: str) -> list[Message]:
    """A ``messages`` list: objects with a known ``role`` and a string ``content``; at least one
    assistant turn (else nothing is learned)."""
    if not isinstance(obj, list) or not obj:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for k, m in enumerate(obj):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{k}] has role {m['role']!r}; expected one of {ROLES}")
    return obj


def assistant_spans(
    template: ChatTemplate, messages: Sequence[Message], end_token: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (module docstring);
    ``end_token`` (e.g. ``<|im_end|>``) closes a reply located verbatim by the fallback."""
    full = template.render(messages)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:k], add_generation_prompt=True) if k else ""
        after = template.render(messages[: k + 1])
        if after.startswith(before) and full.startswith(after):
            spans.append((len(before), len(after)))
            continue
        start = full.find(m["content"], spans[-1][1] if spans else 0)
        if start < 0 or not m["content"]:
            raise DataError(f"{template.path}: the template does not render assistant turn {k} verbatim, so "
                            "its tokens cannot be located")
        end = start + len(m["content"])
        if end_token and full.startswith(end_token, end):
            end += len(end_token)
        spans.append((start, end))
    return full, spans
