"""Chat data: the template renders in a sandbox, the loss falls on the assistant turns only, and a
template's failures name its file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minift.data.chat import chat_stop_ids
from minift.data.chat_template import ChatTemplate, load_chat_template
from minift.data.datasets import encode_example, read_jsonl
from minift.data.tokenizer import Tokenizer
from minift.errors import DataError
from minift.layers.cross_entropy import IGNORE_INDEX
from tests.chat_fixtures import CHATML_GENERATION, CONVERSATIONS, TEMPLATES, write_chat_tokenizer


def _learned_text(tok: Tokenizer, messages) -> list[str]:
    """The learned tokens, decoded run by run."""
    ex = encode_example(tok, {"messages": messages})
    runs, current = [], []
    for t, label in zip(ex.ids, ex.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == t
            current.append(t)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tok.decode(current, skip_special_tokens=False))
    return runs


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_the_loss_falls_on_each_assistant_reply_and_its_end_of_turn_token(kind, tmp_path):
    tok = Tokenizer.from_pretrained(write_chat_tokenizer(tmp_path, kind))
    end = TEMPLATES[kind][2]
    messages = CONVERSATIONS[1]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _learned_text(tok, messages)
    closing = "\n" if kind == "chatml" else ""  # ChatML closes a turn with "<|im_end|>\n"
    assert runs == [r + end + closing for r in replies]


def test_generation_stops_at_the_templates_end_of_turn_token(tmp_path):
    tok = Tokenizer.from_pretrained(write_chat_tokenizer(tmp_path, "llama3"))
    eot = tok.hf.token_to_id("<|eot_id|>")
    assert chat_stop_ids(tok) == (*tok.eos_ids, eot)


def test_a_template_that_rewrites_earlier_turns_still_masks_the_replies(tmp_path):
    """A template that renders the last assistant turn differently breaks the prefix property; the
    replies are then located verbatim."""
    folder = write_chat_tokenizer(tmp_path, "chatml")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last %} (last){% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(folder)
    runs = _learned_text(tok, CONVERSATIONS[1])
    assert runs[0] == "cba<|im_end|>"
    assert runs[1].startswith("zyx")


def test_templates_run_sandboxed_and_their_errors_name_the_file(tmp_path):
    folder = write_chat_tokenizer(tmp_path, "chatml", as_jinja_file=True)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no system role, please') }}")
    tok = Tokenizer.from_pretrained(folder)
    with pytest.raises(DataError, match=r"chat_template\.jinja.*no system role"):
        encode_example(tok, {"messages": CONVERSATIONS[0]})
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # a sandbox escape attempt
    with pytest.raises(DataError, match=r"chat_template\.jinja"):
        load_chat_template(folder).render(CONVERSATIONS[0])
    (folder / "chat_template.jinja").write_text("{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(DataError, match=r"chat_template\.jinja.*may not start with '_'"):
        load_chat_template(folder).render(CONVERSATIONS[0])
    (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(DataError, match=r"chat_template\.jinja.*does not parse"):
        load_chat_template(folder).render(CONVERSATIONS[0])


def test_named_templates_use_default_and_a_model_without_one_says_so(tmp_path):
    folder = write_chat_tokenizer(tmp_path, "chatml")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "ok"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(folder).render(CONVERSATIONS[0]) == "ok"
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"has none"):
        encode_example(Tokenizer.from_pretrained(folder), {"messages": CONVERSATIONS[0]})


def test_chat_lines_are_read_and_bad_messages_name_the_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n"
                    + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: messages\[0\] has role 'robot'"):
        read_jsonl(path)


def test_a_template_with_generation_blocks_renders_their_body(tmp_path):
    folder = write_chat_tokenizer(tmp_path, "chatml", as_jinja_file=True)
    (folder / "chat_template.jinja").write_text(CHATML_GENERATION)
    tok = Tokenizer.from_pretrained(folder)
    assert _learned_text(tok, CONVERSATIONS[1]) == ["cba<|im_end|>\n", "zyx \"q\"\n\nDone.<|im_end|>\n"]


@pytest.mark.parametrize(
    "source",
    [
        "{{ 1 / 0 }}",  # Python errors inside the template
        "{{ messages[0]['content'] + 1 }}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",  # unbounded recursion
        "{{ messages[",  # does not parse
    ],
)
def test_a_template_that_fails_in_any_way_is_a_data_error_naming_its_file(source):
    with pytest.raises(DataError, match=r"bad\.jinja"):
        ChatTemplate(source, Path("bad.jinja")).render([{"role": "user", "content": "hi"}])
