"""Text that maps to the unknown token is reported, not silently trained on."""

from __future__ import annotations

import warnings

import pytest

from minift.data import encode_example
from minift.data.tasks import task_tokenizer
from minift.data.tokenizer import UnknownTokenWarning


def test_text_outside_the_vocabulary_warns_with_the_count_and_the_first_example():
    tok = task_tokenizer()
    with pytest.warns(UnknownTokenWarning, match=r"2 token\(s\).*'é' at character 1"):
        ids = tok.encode("héllo wörld")
    assert ids.count(tok.unk_id) == 2


def test_a_training_record_with_unknown_characters_warns_too():
    with pytest.warns(UnknownTokenWarning, match="'→'"):
        encode_example(task_tokenizer(), {"prompt": "Q: a → b\nA: ", "completion": "b"})


def test_text_inside_the_vocabulary_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task_tokenizer().encode("Q: min 1 2 3\nA: 1")
