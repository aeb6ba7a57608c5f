"""Tokenizer wrapper, JSONL records, loss masks, batches and the batch stream (minift.data).

Every tokenizer here is built in-process with the ``tokenizers`` library (tests/toy.py): nothing is
downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minift.data import BatchStream, Example, Tokenizer, collate, encode_example, lm_examples, read_jsonl
from minift.errors import DataError
from tests.toy import BOS, EOS, PAD, char_tokenizer

# ----------------------------------------------------------------------------------------------------
# tokenizer


def test_the_bos_the_post_processor_adds_is_kept_once():
    tok = char_tokenizer(with_bos=True)
    ids = tok.encode("ab")
    assert ids == [BOS, tok.hf.token_to_id("a"), tok.hf.token_to_id("b")]
    assert tok.encode("ab", bos=False) == ids[1:]


def test_a_tokenizer_without_a_bos_post_processor_adds_none_unless_asked():
    tok = char_tokenizer(with_bos=False)
    assert BOS not in tok.encode("ab")
    forced = Tokenizer(tok.hf, eos_ids=EOS, bos_id=BOS, add_bos=True)
    assert forced.encode("ab")[0] == BOS
    assert forced.encode("ab").count(BOS) == 1
    assert Tokenizer(char_tokenizer().hf, bos_id=BOS, add_bos=True).encode("a").count(BOS) == 1


def test_eos_may_be_one_id_or_several_and_pad_defaults_to_the_first_eos():
    hf = char_tokenizer().hf
    assert Tokenizer(hf, eos_ids=EOS).eos_ids == (EOS,)
    several = Tokenizer(hf, eos_ids=[EOS, PAD])
    assert several.eos_ids == (EOS, PAD)
    assert several.pad_id == EOS


def test_decode_inverts_encode_and_skips_special_tokens():
    tok = char_tokenizer()
    assert tok.decode([*tok.encode("abba="), EOS]) == "abba="


def test_from_pretrained_reads_special_tokens_and_generation_eos_ids(tmp_path):
    char_tokenizer().hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": "<pad>"})
    )
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (BOS, (EOS,), PAD)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 3]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_ids == (EOS, 3)


def test_a_special_token_missing_from_the_vocabulary_is_a_data_error_naming_the_file(tmp_path):
    char_tokenizer().hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(DataError, match=r"tokenizer_config\.json: eos_token '<\|end\|>'"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("value", ["</s>", [EOS, "3"], True, {"id": 3}])
def test_a_generation_eos_that_is_not_ids_is_a_data_error_naming_the_file(tmp_path, value):
    char_tokenizer().hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(DataError, match=r"generation_config\.json: eos_token_id must be"):
        Tokenizer.from_pretrained(tmp_path)

def test_an_unreadable_tokenizer_file_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=str(bad)):
        Tokenizer.from_file(bad)


# ----------------------------------------------------------------------------------------------------
# examples and batches


def test_a_prompt_completion_example_learns_only_the_completion_and_its_eos():
    tok = char_tokenizer()
    ex = encode_example(tok, {"prompt": "ab=", "completion": "ba"})
    a, b, eq = (tok.hf.token_to_id(c) for c in "ab=")
    assert ex.ids == [BOS, a, b, eq, b, a, EOS]
    assert ex.labels == [-100, -100, -100, -100, b, a, EOS]


def test_a_text_example_learns_every_token_and_is_truncated_at_max_length():
    tok = char_tokenizer()
    ex = encode_example(tok, {"text": "abc"})
    assert ex.labels == ex.ids == [*tok.encode("abc"), EOS]
    short = encode_example(tok, {"text": "abc"}, max_length=3)
    assert short.ids == ex.ids[:3]


def test_plain_text_is_cut_into_blocks_that_concatenate_back_to_the_whole_text():
    tok = char_tokenizer()
    blocks = lm_examples(tok, "abcdabcdab", block_size=4)
    assert [len(b.ids) for b in blocks] == [4, 4, 4]
    assert [t for b in blocks for t in b.ids] == [*tok.encode("abcdabcdab"), EOS]
    assert all(b.labels == b.ids for b in blocks)


examples_st = st.lists(
    st.lists(st.integers(3, 8), min_size=1, max_size=6).flatmap(
        lambda ids: st.integers(0, len(ids)).map(lambda p: Example(ids, [-100] * p + ids[p:]))
    ),
    min_size=1,
    max_size=4,
)


@given(examples=examples_st)
@example(examples=[Example([3, 4, 5], [-100, 4, 5]), Example([6], [6])])
def test_collate_right_pads_masks_and_shifts_labels_into_next_token_targets(examples):
    batch = collate(examples, pad_id=PAD)
    T = max(len(e.ids) for e in examples)
    assert batch.tokens.shape == batch.targets.shape == batch.attention_mask.shape == (len(examples), T)
    for b, e in enumerate(examples):
        n = len(e.ids)
        assert batch.tokens[b, :n].tolist() == e.ids
        assert (batch.tokens[b, n:] == PAD).all()
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (T - n)
        # targets[b, t] is the label of the token after t; the last real position and padding learn nothing
        assert batch.targets[b, : n - 1].tolist() == e.labels[1:]
        assert (batch.targets[b, n - 1 :] == -100).all()


# ----------------------------------------------------------------------------------------------------
# JSONL


def test_a_jsonl_file_of_both_record_kinds_reads_back_skipping_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "ab=", "completion": "ba"}\n\n{"text": "abc"}\n')
    assert read_jsonl(path) == [{"prompt": "ab=", "completion": "ba"}, {"text": "abc"}]



def test_unicode_line_separators_inside_a_json_string_do_not_split_the_record(tmp_path):
    # JSON allows U+2028, U+2029 and U+0085 unescaped in strings (json.dumps(ensure_ascii=False) writes
    # them so); a JSONL line ends only at "\n" (or "\r\n"), so they must not split it.
    records = [{"text": "a\u2028b"}, {"prompt": "c\u2029", "completion": "\x85d"}]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    path.write_bytes(b"\r\n".join([*lines, b"[]", b""]))
    with pytest.raises(DataError, match=rf"{path}:3: expected a JSON object"):
        read_jsonl(path)
    path.write_bytes(b"\n".join(lines))
    assert read_jsonl(path) == records

@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"prompt": "ab=", "completion": ', "invalid JSON"),
        ('["ab", "ba"]', "expected a JSON object, got list"),
        ('{"prompt": "ab="}', r"expected the keys \{'prompt', 'completion'\} or \{'text'\}, got \['prompt"),
        ('{"text": 3}', "'text' must be a string, got int"),
    ],
)
def test_a_malformed_jsonl_line_is_a_data_error_naming_file_line_and_what_was_expected(
    tmp_path, line, expected
):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: {expected}"):
        read_jsonl(path)


def test_an_empty_or_missing_jsonl_file_is_a_data_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "absent.jsonl")


# ----------------------------------------------------------------------------------------------------
# batch stream


def _stream(seed: int, n: int = 7, batch_size: int = 3) -> BatchStream:
    return BatchStream([Example([3 + i, 3], [3 + i, 3]) for i in range(n)], batch_size, PAD, seed=seed)


@given(seed=st.integers(0, 2**32 - 1), index=st.integers(0, 20))
@example(seed=0, index=4)
def test_the_same_seed_and_index_always_give_the_same_batch(seed, index):
    a, b = _stream(seed), _stream(seed)
    b.batch(index + 1)  # another epoch's permutation cached in between must not matter
    assert np.array_equal(a.batch(index).tokens, b.batch(index).tokens)


def test_every_epoch_shows_each_example_exactly_once_in_a_fresh_order():
    stream = _stream(seed=3)
    epochs = []
    for e in range(3):
        firsts = [int(t) for i in range(3) for t in stream.batch(3 * e + i).tokens[:, 0]]
        assert sorted(firsts) == list(range(3, 10))
        epochs.append(firsts)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
