"""Chat data: ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with a model's own chat
template (``minift.data.chat_template``), the loss on the assistant turns only.

Which tokens are learned (the assistant mask) — by rendering prefixes, not by ``{% generation %}``:
transformers marks assistant text with a ``{% generation %}`` block that few templates contain. Here,
for each assistant message k, two prefixes of the conversation are rendered,

    before_k = render(messages[:k], add_generation_prompt=True)    ends with the assistant header
    after_k  = render(messages[:k + 1])                             ends after the turn's end token

and the characters ``[len(before_k), len(after_k))`` of the full rendering are the assistant's turn:
its content and whatever closes it (``<|im_end|>``, ``<|eot_id|>``), which the model must learn to
emit to stop. This holds when each rendering is a prefix of the next, as it is for templates that
render the conversation message by message (ChatML, Llama 3, Mistral, Gemma). Templates that rewrite
earlier turns (e.g. dropping the reasoning of all but the last turn) break it; then the span is the
content itself, found in the rendering after the previous span, plus the end-of-turn token if it
follows at once. A token is learned when its first character lies in a span.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from minift.data.chat_template import (
    TEMPLATE_FILE,
    TOKENIZER_CONFIG,
    ChatTemplate,
    Message,
    assistant_spans,
)
from minift.errors import DataError
from minift.layers.cross_entropy import IGNORE_INDEX

if TYPE_CHECKING:
    from minift.data.tokenizer import Tokenizer
    from minift.model import Model


def _require_template(tokenizer: Tokenizer) -> ChatTemplate:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise DataError(
            "chat data ({'messages': [...]}) needs a model with a chat template "
            f"({TEMPLATE_FILE} or 'chat_template' in {TOKENIZER_CONFIG}); this model folder has none"
        )
    return template


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Message], *, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(ids of the rendered conversation, as ``apply_chat_template``; labels: the ids on the assistant
    turns, IGNORE_INDEX elsewhere)."""
    template = _require_template(tokenizer)
    end = end_of_turn_id(tokenizer)
    text, spans = assistant_spans(template, messages, None if end is None else tokenizer.hf.id_to_token(end))
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    learned = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, learned, strict=True)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of a conversation followed by the assistant header (``add_generation_prompt``): what a model
    continues to answer."""
    text = _require_template(tokenizer).render(messages, add_generation_prompt=True)
    return list(tokenizer.hf.encode(text, add_special_tokens=False).ids)


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The template's end-of-turn token: the first special token in the text that closes an assistant
    turn (``<|im_end|>``, ``<|eot_id|>``); None if that text holds none."""
    closing = _require_template(tokenizer).end_of_turn()
    specials = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special}
    for tid in tokenizer.hf.encode(closing, add_special_tokens=False).ids:
        if tokenizer.hf.id_to_token(tid) in specials:
            return int(tid)
    return None


def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Generation stops at the EOS ids (``generation_config.json``) and at the template's end-of-turn
    token."""
    end = end_of_turn_id(tokenizer)
    return tuple(tokenizer.eos_ids) + ((end,) if end is not None and end not in tokenizer.eos_ids else ())


def chat_replies(
    model: Model, tokenizer: Tokenizer, chats: Sequence[Sequence[Message]], *, max_new_tokens: int = 64
) -> list[str]:
    """Greedy replies to each conversation (its messages up to, not including, the last assistant turn),
    stopping at the template's end of turn."""
    from minift.generate import generate

    prompts = [chat_prompt_ids(tokenizer, _context(m)) for m in chats]
    new = generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids=chat_stop_ids(tokenizer),
                   pad_id=tokenizer.pad_id)
    return [tokenizer.decode(ids).strip() for ids in new]


def _last_reply(messages: Sequence[Message]) -> int:
    return max(k for k, m in enumerate(messages) if m["role"] == "assistant")


def _context(messages: Sequence[Message]) -> list[Message]:
    return list(messages[: _last_reply(messages)])


def chat_exact_match(model: Model, tokenizer: Tokenizer, chats: Sequence[Sequence[Message]]) -> float:
    """The fraction of conversations whose last assistant turn the model reproduces exactly (stripped)."""
    replies = chat_replies(model, tokenizer, chats)
    expected = [m[_last_reply(m)]["content"].strip() for m in chats]
    return sum(r == e for r, e in zip(replies, expected, strict=True)) / len(chats)
