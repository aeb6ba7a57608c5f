"""Data: the tokenizer wrapper (``tokenizer``) and datasets, masks and batches (``datasets``)."""

from minift.data.datasets import (
    Batch,
    BatchStream,
    Example,
    collate,
    encode_example,
    lm_examples,
    read_jsonl,
)
from minift.data.tokenizer import Tokenizer

__all__ = [
    "Batch",
    "BatchStream",
    "Example",
    "Tokenizer",
    "collate",
    "encode_example",
    "lm_examples",
    "read_jsonl",
]
