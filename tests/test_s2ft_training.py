"""S2FT training through the model (paper Sec. 3.3): ``apply_s2ft`` then AdamW.

Properties: partial backpropagation returns, for every block, the full backward's weight gradient
restricted to that block (float64, relative error ≤ 1e-10), for MHA, GQA (any head selection,
including the O-only case that crashes the official code), GPT-2 and every target combination;
after any number of AdamW steps every weight entry outside the blocks is bitwise unchanged and the
optimizer state has the blocks' size; training the co-permuted model and un-permuting equals
training index sets in the original layout; micro-batch gradients accumulate to the full batch's;
blocks below the lowest selected layer keep no cache.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minift.backend import to_numpy
from minift.config import ModelConfig
from minift.errors import ConfigError
from minift.layers.linear import linear_backward_input, linear_backward_weight, linear_forward
from minift.methods import method_record
from minift.methods.s2ft import ColumnBlock, LayerLayout, RowBlock, S2FTConfig, apply_s2ft, unpermute
from minift.methods.s2ft.permute import expand, layouts_of
from minift.model import init_model, loss_and_grads, model_forward, set_trainable, trainable_parameters
from minift.optim import AdamW
from minift.slots import Dense
from tests.strategies import configs

GQA = ModelConfig(
    vocab_size=11, hidden_size=8, intermediate_size=10, n_layers=3, n_heads=6, n_kv_heads=3, head_dim=2
)
ALL = S2FTConfig(
    heads=3, channels=4, head_targets=("q", "k", "v", "o"), channel_targets=("gate", "up", "down")
)


def _batch(config: ModelConfig, seed: int, B: int = 2, T: int = 5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


def _s2ft_model(config: ModelConfig, s2: S2FTConfig, seed: int = 0):
    model = init_model(config, np.random.default_rng(seed), dtype=np.float64, std=0.5)
    return apply_s2ft(model, s2, rng=np.random.default_rng(seed + 1))


def _block_slots(model):
    for i, block in enumerate(model.blocks):
        for name, slot in block.slots():
            if isinstance(slot, ColumnBlock | RowBlock):
                yield i, name, slot


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@st.composite
def _s2ft_configs(draw, config: ModelConfig):
    channel_choices = ["up", "down"] + ([] if config.arch == "gpt2" else ["gate"])
    return S2FTConfig(
        heads=draw(st.integers(0, config.n_heads)),
        channels=draw(st.integers(0, config.intermediate_size)),
        head_targets=tuple(draw(st.sets(st.sampled_from(["q", "k", "v", "o"])))),
        channel_targets=tuple(draw(st.sets(st.sampled_from(channel_choices)))),
    )


@st.composite
def _cases(draw):
    config = draw(configs())
    return config, draw(_s2ft_configs(config)), draw(st.integers(0, 2**16))


@settings(max_examples=20)
@given(_cases())
@example((GQA, ALL, 0))
@example((GQA, S2FTConfig(heads=3, channels=0, channel_targets=()), 3))  # O only under GQA
def test_block_gradients_equal_the_full_backward_restricted_to_the_blocks(case):
    config, s2, seed = case
    model = _s2ft_model(config, s2, seed)
    dense = copy.deepcopy(model)  # the same permuted weights, every array trainable
    for block in dense.blocks:
        for name, slot in block.slots():
            setattr(block, name, Dense(slot.weight, slot.bias))
    set_trainable(dense)
    tokens, targets = _batch(config, seed)
    loss, grads = loss_and_grads(model, tokens, targets)
    full_loss, full = loss_and_grads(dense, tokens, targets)
    assert loss == full_loss
    assert grads.keys() == trainable_parameters(model).keys()
    for i, name, slot in _block_slots(model):
        dw = full[f"blocks.{i}.{name}.weight"]
        for local, (a, b) in zip(slot.parameters(), slot.segments, strict=True):
            want = dw[:, a:b] if isinstance(slot, ColumnBlock) else dw[a:b]
            assert _rel(grads[f"blocks.{i}.{name}.{local}"], want) <= 1e-10, (i, name, local)


def _weights(model) -> dict[str, np.ndarray]:
    return {f"{i}.{n}": s.weight.copy() for i, b in enumerate(model.blocks) for n, s in b.slots()}


@settings(max_examples=10)
@given(st.integers(1, 4), st.integers(0, 2**16))
@example(3, 0)
def test_after_any_number_of_adamw_steps_every_entry_outside_the_blocks_is_bitwise_unchanged(steps, seed):
    model = _s2ft_model(GQA, ALL, seed)
    before = _weights(model)
    others = [model.embed.weight.copy(), model.final_norm.weight.copy()]
    opt = AdamW(trainable_parameters(model), weight_decay=0.1)
    for s in range(steps):
        opt.step(loss_and_grads(model, *_batch(GQA, seed + s))[1], lr=1e-2)
    assert opt.state_bytes() == 2 * sum(p.nbytes for p in trainable_parameters(model).values())
    after = _weights(model)
    for i, name, slot in _block_slots(model):
        inside = np.zeros(slot.weight.shape, dtype=bool)
        for a, b in slot.segments:
            inside[(slice(None), slice(a, b)) if isinstance(slot, ColumnBlock) else slice(a, b)] = True
        key = f"{i}.{name}"
        np.testing.assert_array_equal(after[key][~inside], before[key][~inside], err_msg=key)
        assert (after[key][inside] != before[key][inside]).any(), key
    for key in before.keys() - {f"{i}.{n}" for i, n, _ in _block_slots(model)}:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    np.testing.assert_array_equal(model.embed.weight, others[0])
    np.testing.assert_array_equal(model.final_norm.weight, others[1])


@dataclass(eq=False)
class IndexSetSlot:
    """Reference: trainable rows or columns ``idx`` of W in the ORIGINAL layout, by fancy indexing
    (no permutation): the block is a separate array written into a copy of W at every forward."""

    weight: np.ndarray
    bias: np.ndarray | None
    idx: np.ndarray
    columns: bool
    block: np.ndarray

    def current(self) -> np.ndarray:
        w = self.weight.copy()
        if self.columns:
            w[:, self.idx] = self.block
        else:
            w[self.idx] = self.block
        return w

    def forward(self, x, *, keep, rng=None):
        return linear_forward(x, self.current(), self.bias), (x if keep else None)

    def backward(self, dy, cache, *, need_dx=True):
        dw = linear_backward_weight(dy, cache)
        dx = linear_backward_input(dy, self.current()) if need_dx else None
        return dx, {"weight": dw[:, self.idx] if self.columns else dw[self.idx]}

    def parameters(self):
        return {"weight": self.block}


def _index_set_model(config: ModelConfig, s2: S2FTConfig, layouts, seed: int):
    model = set_trainable(init_model(config, np.random.default_rng(seed), dtype=np.float64, std=0.5), False)
    D, G = config.head_dim, config.n_heads // config.n_kv_heads
    for i, lay in layouts.items():
        units = {
            "q": expand(lay.heads, D),
            "o": expand(lay.heads, D),
            "k": expand(sorted({h // G for h in lay.heads}), D),
            "v": expand(sorted({h // G for h in lay.heads}), D),
        }
        units |= {name: list(lay.channels) for name in ("gate", "up", "down")}
        block = model.blocks[i]
        for name in (*s2.head_targets, *s2.channel_targets):
            slot, idx = getattr(block, name), np.array(units[name], dtype=np.int64)
            if len(idx):
                cols = name in ("o", "down")
                blk = slot.weight[:, idx].copy() if cols else slot.weight[idx].copy()
                setattr(block, name, IndexSetSlot(slot.weight, slot.bias, idx, cols, blk))
    return model


@settings(max_examples=6)
@given(st.integers(0, 2**16), st.sampled_from([ALL, S2FTConfig(heads=2, channels=3)]))
@example(0, ALL)
def test_training_the_permuted_model_then_unpermuting_equals_training_index_sets_in_place(seed, s2):
    permuted = _s2ft_model(GQA, s2, seed)
    reference = _index_set_model(GQA, s2, layouts_of(permuted), seed)
    for m in (permuted, reference):
        opt = AdamW(trainable_parameters(m))
        for s in range(3):
            opt.step(loss_and_grads(m, *_batch(GQA, 100 + s))[1], lr=1e-2)
    unpermute(permuted)
    for i, block in enumerate(reference.blocks):
        for name, slot in block.slots():
            w = slot.current() if isinstance(slot, IndexSetSlot) else slot.weight
            got = getattr(permuted.blocks[i], name).weight
            np.testing.assert_allclose(got, w, rtol=1e-9, atol=1e-11, err_msg=f"{i}.{name}")


def test_micro_batch_gradients_accumulate_to_the_full_batch_gradient():
    model = _s2ft_model(GQA, ALL)
    tokens, targets = _batch(GQA, 7, B=4)
    _, full = loss_and_grads(model, tokens, targets)
    halves = [loss_and_grads(model, tokens[k : k + 2], targets[k : k + 2], loss_scale=0.5)[1] for k in (0, 2)]
    for key, g in full.items():
        np.testing.assert_allclose(halves[0][key] + halves[1][key], g, rtol=1e-10, atol=1e-14, err_msg=key)


def test_blocks_below_the_lowest_selected_layer_keep_nothing_and_frozen_slots_keep_nothing():
    model = _s2ft_model(GQA, S2FTConfig(heads=2, channels=3, layers=(1,)))
    _, cache = model_forward(model, _batch(GQA, 0)[0])
    assert cache.lowest == 1
    assert cache.blocks[0] is None
    kept = cache.blocks[1]
    assert kept.q is None
    assert kept.up is None
    assert [c.shape for c in kept.o] == [(10, 2 * GQA.head_dim)]
    assert [c.shape for chunk in kept.down for c in chunk] == [(10, 3)]  # per row chunk (one here)
    assert kept.act is None  # frozen gate and up: g and u are rebuilt in the backward


def test_applying_s2ft_twice_or_over_foreign_slots_is_a_config_error():
    model = _s2ft_model(GQA, ALL)
    with pytest.raises(ConfigError, match="already carries s2ft"):
        apply_s2ft(model, ALL, rng=np.random.default_rng(0))
    foreign = _index_set_model(GQA, ALL, layouts_of(model), 0)
    with pytest.raises(ConfigError, match=r"needs dense slots; blocks\.0\.q is a IndexSetSlot"):
        apply_s2ft(foreign, ALL, rng=np.random.default_rng(0))


def test_on_every_array_module_a_step_moves_only_the_blocks_by_the_restricted_full_gradient(xp):
    model = init_model(GQA, np.random.default_rng(0), dtype=np.float64, std=0.5, xp=xp)
    apply_s2ft(model, ALL, rng=np.random.default_rng(1))
    dense = copy.deepcopy(model)
    for block in dense.blocks:
        for name, slot in block.slots():
            setattr(block, name, Dense(slot.weight, slot.bias, requires_grad=True))
    tokens, targets = (xp.asarray(a) for a in _batch(GQA, 0))
    _, grads = loss_and_grads(model, tokens, targets)
    _, full = loss_and_grads(dense, tokens, targets)
    before = {k: to_numpy(v) for k, v in _weights(model).items()}
    AdamW(trainable_parameters(model)).step(grads, lr=1e-2)
    for i, name, slot in _block_slots(model):
        w, dw = to_numpy(slot.weight), to_numpy(full[f"blocks.{i}.{name}.weight"])
        inside = np.zeros(w.shape, dtype=bool)
        for local, (a, b) in zip(slot.parameters(), slot.segments, strict=True):
            cut = (slice(None), slice(a, b)) if isinstance(slot, ColumnBlock) else (slice(a, b),)
            assert _rel(to_numpy(grads[f"blocks.{i}.{name}.{local}"]), dw[cut]) <= 1e-10
            inside[cut] = True
        np.testing.assert_array_equal(w[~inside], before[f"{i}.{name}"][~inside])


def test_the_record_in_model_meta_is_json_and_rebuilds_the_configuration_and_layouts():
    model = _s2ft_model(GQA, ALL)
    record = method_record(model)
    assert record.name == "s2ft"
    assert record.config == ALL
    assert S2FTConfig.from_dict(json.loads(json.dumps(record.config.to_dict()))) == ALL
    state = json.loads(json.dumps(record.state))
    assert {int(i): LayerLayout.from_dict(d) for i, d in state["layers"].items()} == layouts_of(model)
