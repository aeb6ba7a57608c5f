"""minift renders and tokenizes chats exactly as transformers' ``apply_chat_template`` does."""

from __future__ import annotations

import pytest

from minift.data.chat import chat_prompt_ids
from minift.data.datasets import encode_example
from minift.data.tokenizer import Tokenizer
from tests.chat_fixtures import CONVERSATIONS, TEMPLATES, write_chat_tokenizer

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
