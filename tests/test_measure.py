"""Measurements of a training step (minift.tools.measure): weights' bytes, traced step memory, FLOPs, speed.
No timed assertions: only what a measurement must satisfy whatever the machine."""

from __future__ import annotations

import numpy as np
import pytest

from minift.data import BatchStream, encode_example
from minift.methods.s2ft.slots import block_slot
from minift.model import trainable_parameters
from minift.tools.measure import model_bytes, step_flops, step_memory, time_step
from tests.toy import char_tokenizer, reverse_records, tiny_model

TOK = char_tokenizer()


def _batch(batch_size: int = 8):
    examples = [encode_example(TOK, r) for r in reverse_records(3)]
    return BatchStream(examples, batch_size, TOK.pad_id).batch(0)


def _partial():
    """Everything frozen but an S2FT column block of the top block's o projection."""
    model = tiny_model(TOK.vocab_size, trainable=False)
    model.blocks[1].o = block_slot("columns", model.blocks[1].o.weight, ((0, 8),))
    return model


def test_model_bytes_counts_every_weight_once_views_by_their_base():
    model = tiny_model(TOK.vocab_size)
    c = model.config
    C, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.n_layers
    qkvo = C * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * C
    per_block = qkvo + 3 * C * F + 2 * C
    assert model_bytes(model) == 4 * (2 * V * C + C + L * per_block)  # float32
    partial = _partial()
    assert model_bytes(partial) == model_bytes(model) + 4 * C * 8  # + the block's reference copy only


def test_step_memory_reports_weights_optimizer_and_a_positive_step_peak_without_changing_weights():
    model = tiny_model(TOK.vocab_size)
    before = {k: p.copy() for k, p in trainable_parameters(model).items()}
    report = step_memory(model, [_batch()])
    assert report.weights_bytes == model_bytes(model)
    assert report.optimizer_bytes == 2 * sum(p.nbytes for p in trainable_parameters(model).values())
    assert report.step_peak_bytes > 0
    assert report.total_bytes == report.weights_bytes + report.optimizer_bytes + report.step_peak_bytes
    for k, p in trainable_parameters(model).items():
        assert np.array_equal(p, before[k])  # lr = 0


def test_partial_backprop_and_smaller_batches_need_less_step_memory():
    full = step_memory(tiny_model(TOK.vocab_size), [_batch()]).step_peak_bytes
    partial = step_memory(_partial(), [_batch()]).step_peak_bytes
    small = step_memory(tiny_model(TOK.vocab_size), [_batch(2)]).step_peak_bytes
    assert partial < full
    assert small < full


def test_full_fine_tuning_flops_are_the_matmuls_forward_and_twice_that_backward():
    model = tiny_model(TOK.vocab_size)
    c = model.config
    B, T = 3, 5
    N = B * T
    weights = sum(slot.weight.size for block in model.blocks for _, slot in block.slots())
    attention = c.n_layers * 4 * B * c.n_heads * T * T * c.head_dim
    flops = step_flops(model, B, T)
    assert flops.forward == 2 * N * weights + attention + 2 * N * c.hidden_size * c.vocab_size
    assert flops.backward == 2 * flops.forward  # dx and dW for every product
    assert set(flops.by_kind) == {"Dense", "attention", "lm_head"}
    assert flops.total == 3 * flops.forward


def test_flops_follow_partial_backprop_nothing_below_the_lowest_trainable_block():
    model = tiny_model(TOK.vocab_size, trainable=False)
    model.lm_head.requires_grad = True
    flops = step_flops(model, 2, 4)
    head_fwd = flops.by_kind["lm_head"][0]
    assert flops.backward == 2 * head_fwd  # only the head's dx and dW; no block is backpropagated
    c, N = model.config, 2 * 4
    C, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    partial = step_flops(_partial(), 2, 4)
    expected = (
        3 * 2 * N * C * F  # top block's down, gate, up: dx only
        + 2 * N * C * 8  # o: dW of its 8 trainable columns; no dx, no attention backward below it
        + 2 * N * C * V  # the frozen head's dx
    )
    assert partial.backward == expected


@pytest.mark.parametrize("accum", [1, 2])
def test_time_step_counts_the_real_tokens_of_its_micro_batches(accum):
    batches = [_batch()] * accum
    timing = time_step(tiny_model(TOK.vocab_size), batches, repeats=2)
    assert timing.tokens == accum * int(_batch().attention_mask.sum())
    assert timing.median_s > 0
    assert timing.tokens_per_s == timing.tokens / timing.median_s
