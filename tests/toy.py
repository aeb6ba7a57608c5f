"""Shared test fixtures for training, data and generation: a char-level tokenizer built in-process
with the ``tokenizers`` library (nothing downloaded), a string-reversal task and a tiny model."""

from __future__ import annotations

import itertools

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from minift.config import ModelConfig
from minift.data import Tokenizer
from minift.model import Model, init_model, set_trainable

PAD, BOS, EOS = 0, 1, 2
LETTERS = "abcd"


def char_tokenizer(chars: str = LETTERS + "=", *, with_bos: bool = True) -> Tokenizer:
    """One id per character after <pad>, <s>, </s>; the post-processor adds <s> when ``with_bos``."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS} | {c: i + 3 for i, c in enumerate(chars)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(["<pad>", "<s>", "</s>"])
    if with_bos:
        hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return Tokenizer(hf, eos_ids=EOS, bos_id=BOS, pad_id=PAD)


def reverse_records(max_len: int = 3) -> list[dict[str, str]]:
    """Every string over LETTERS of length 1..max_len: prompt "abc=", completion "cba"."""
    words = ["".join(p) for n in range(1, max_len + 1) for p in itertools.product(LETTERS, repeat=n)]
    return [{"prompt": w + "=", "completion": w[::-1]} for w in words]


def tiny_model(
    vocab_size: int, *, seed: int = 0, dtype=np.float32, std: float = 0.1, trainable: bool = True, **overrides
) -> Model:
    """A 2-layer GQA Llama with C = 32 (``overrides`` change any config field): small enough for
    hundreds of training steps in a second or two."""
    fields = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "n_layers": 2,
              "n_heads": 4, "n_kv_heads": 2, "eos_token_id": EOS, "bos_token_id": BOS, "pad_token_id": PAD}
    config = ModelConfig(**(fields | overrides))
    model = init_model(config, np.random.default_rng(seed), dtype=dtype, std=std)
    return set_trainable(model, trainable)


def task_world_config(hidden: int = 16) -> ModelConfig:
    """A tiny GQA Llama over the embedded tasks' 100-id character vocabulary (``minift.data.tasks``)."""
    return ModelConfig(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=24,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
