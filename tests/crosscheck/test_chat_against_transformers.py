"""minift renders and tokenizes chats exactly as transformers' ``apply_chat_template`` does."""

from __future__ import annotations

import pytest

from minift.data.chat import chat_prompt_ids
from minift.data.datasets import encode_example
from minift.data.tokenizer import Tokenizer
from minift.layers.cross_entropy import IGNORE_INDEX
from tests.chat_fixtures import CHATML_GENERATION, CONVERSATIONS, TEMPLATES, write_chat_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("jinja_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_chat_ids_equal_apply_chat_template(kind, jinja_file, tmp_path):
    folder = write_chat_tokenizer(tmp_path / kind, kind, as_jinja_file=jinja_file)
    ours = Tokenizer.from_pretrained(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert encode_example(ours, {"messages": messages}).ids == list(expected)
        prompt = theirs.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                            return_dict=False)
        assert chat_prompt_ids(ours, messages[:-1]) == list(prompt)


def test_the_assistant_mask_equals_transformers_generation_mask(tmp_path):
    """On a template that marks assistant text with {% generation %}, transformers' own mask and the
    mask minift derives by rendering prefixes (without using the tag) agree token by token."""
    folder = write_chat_tokenizer(tmp_path, "chatml", as_jinja_file=True)
    (folder / "chat_template.jinja").write_text(CHATML_GENERATION)
    ours = Tokenizer.from_pretrained(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        example = encode_example(ours, {"messages": messages})
        assert example.ids == list(out["input_ids"])
        assert [int(label != IGNORE_INDEX) for label in example.labels] == list(out["assistant_masks"])
