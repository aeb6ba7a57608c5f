"""Adapter serving (paper Sec. 6.2): S2FT adapters as (original indices, dense blocks),
and LoRA factors as the baseline.

Properties: an extracted adapter is in original coordinates (merging it into the base model gives
the trained, un-permuted model); merge then unmerge is the identity up to one rounding inside the
blocks and bitwise outside them, and snapshot/restore is bitwise; switching equals merging the new
adapter into the base; save/load round-trips bitwise; disjoint adapters fuse additively (bitwise)
and overlapping ones to the weighted sum; a batch in which every request has its own adapter (S2FT
column and row blocks, LoRA, or none) equals each request run on its own merged model; an adapter that
does not fit is a CheckpointError naming what is wrong.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minift.config import ModelConfig
from minift.device import to_device
from minift.errors import CheckpointError, ShapeError
from minift.methods import lora
from minift.methods.lora import LoRAConfig, apply_lora
from minift.methods.s2ft import (
    AdapterBlock,
    S2FTAdapter,
    S2FTConfig,
    apply_s2ft,
    extract_adapter,
    load_adapter,
    save_adapter,
    unpermute,
)
from minift.methods.s2ft.adapter import model_signature
from minift.model import init_model, model_forward, trainable_parameters
from minift.serving import (
    LoraFactors,
    batched_forward,
    fuse_adapters,
    lora_factors,
    merge_adapter,
    restore,
    snapshot,
    switch_adapter,
    unmerge_adapter,
)
from minift.testing import assert_close

CFG = ModelConfig(
    vocab_size=11,
    hidden_size=8,
    intermediate_size=10,
    n_layers=2,
    n_heads=6,
    n_kv_heads=3,
    head_dim=2,
    qkv_bias=True,
)
ALL = S2FTConfig(
    heads=3, channels=4, head_targets=("q", "k", "v", "o"), channel_targets=("gate", "up", "down")
)


def _base(seed: int = 0):
    return init_model(CFG, np.random.default_rng(seed), dtype=np.float64, std=0.5)


def _trained(s2: S2FTConfig = ALL, seed: int = 0):
    """(an S2FT model whose blocks moved as if trained, the adapter extracted from it)."""
    model = apply_s2ft(_base(), s2, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 100)
    for p in trainable_parameters(model).values():
        p += 0.3 * rng.standard_normal(p.shape)
    return model, extract_adapter(model)


def _weights(model) -> dict[str, np.ndarray]:
    return {f"blocks.{i}.{n}": s.weight.copy() for i, b in enumerate(model.blocks) for n, s in b.slots()}


def _lora(seed: int, targets=("q", "v", "down")) -> dict[str, LoraFactors]:
    rng, base = np.random.default_rng(seed), _base()
    out = {}
    for i, block in enumerate(base.blocks):
        for name in targets:
            O, I = getattr(block, name).weight.shape
            out[f"blocks.{i}.{name}"] = LoraFactors(
                rng.standard_normal((2, I)), rng.standard_normal((O, 2)), 0.5
            )
    return out


def test_an_extracted_adapter_merged_into_the_base_gives_the_trained_unpermuted_model():
    trained, adapter = _trained()
    assert {b.axis for b in adapter.blocks.values()} == {"rows", "columns"}
    base = _base()
    merge_adapter(base, adapter)
    want = _weights(unpermute(trained))
    for key, w in _weights(base).items():
        assert_close(w, want[key], rtol=1e-14, atol=1e-15, what=key)


def test_merge_then_unmerge_is_the_identity_and_restore_is_bitwise():
    _, adapter = _trained()
    base = _base()
    original = _weights(base)
    saved = snapshot(base, adapter)
    merge_adapter(base, adapter)
    unmerge_adapter(base, adapter)
    for key, w in _weights(base).items():
        # (W + Δ) − Δ is W up to one rounding of each of the two sums
        np.testing.assert_allclose(
            w, original[key], rtol=0, atol=4 * np.finfo(np.float64).eps * 8, err_msg=key
        )
        blk = adapter.blocks.get(key)
        if blk is not None:  # outside the blocks nothing was touched
            outside = np.ones(w.shape, dtype=bool)
            outside[(slice(None), blk.indices) if blk.axis == "columns" else blk.indices] = False
            np.testing.assert_array_equal(w[outside], original[key][outside])
    merge_adapter(base, adapter)
    restore(base, adapter, saved)
    for key, w in _weights(base).items():
        np.testing.assert_array_equal(w, original[key])


def test_switching_adapters_equals_merging_the_new_one_into_the_base():
    (_, old), (_, new) = _trained(seed=0), _trained(seed=1)
    served, fresh = _base(), _base()
    merge_adapter(served, old)
    switch_adapter(served, old, new)
    merge_adapter(fresh, new)
    for key, w in _weights(served).items():
        np.testing.assert_allclose(w, _weights(fresh)[key], rtol=0, atol=1e-14, err_msg=key)


def test_save_then_load_round_trips_bitwise(tmp_path):
    _, adapter = _trained()
    loaded = load_adapter(save_adapter(adapter, tmp_path / "a"))
    assert loaded.signature == adapter.signature
    assert loaded.blocks.keys() == adapter.blocks.keys()
    for key, blk in adapter.blocks.items():
        got = loaded.blocks[key]
        assert (got.axis, got.shape) == (blk.axis, blk.shape)
        np.testing.assert_array_equal(got.indices, blk.indices)
        np.testing.assert_array_equal(got.delta, blk.delta)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.json", "adapter.safetensors"]


def _split(adapter: S2FTAdapter, rng) -> tuple[S2FTAdapter, S2FTAdapter]:
    """Two adapters on disjoint halves of each block's indices."""
    parts: tuple[dict, dict] = ({}, {})
    for key, b in adapter.blocks.items():
        mask = rng.random(len(b.indices)) < 0.5
        for part, m in zip(parts, (mask, ~mask), strict=True):
            delta = b.delta[:, m] if b.axis == "columns" else b.delta[m]
            part[key] = AdapterBlock(b.axis, b.indices[m], delta, b.shape)
    return S2FTAdapter(parts[0], adapter.signature), S2FTAdapter(parts[1], adapter.signature)


def test_disjoint_adapters_fuse_additively():
    _, adapter = _trained()
    a, b = _split(adapter, np.random.default_rng(0))
    fused, separate = _base(), _base()
    merge_adapter(fused, fuse_adapters([a, b], [1.0, 1.0]))
    merge_adapter(separate, a)
    merge_adapter(separate, b)
    for key, w in _weights(fused).items():
        np.testing.assert_array_equal(w, _weights(separate)[key], err_msg=key)


def _dense_delta(adapter: S2FTAdapter, key: str) -> np.ndarray:
    b = adapter.blocks[key]
    d = np.zeros(b.shape)
    if b.axis == "columns":
        d[:, b.indices] = b.delta
    else:
        d[b.indices] = b.delta
    return d


def test_overlapping_adapters_fuse_to_the_weighted_sum():
    (_, a), (_, b) = _trained(seed=0), _trained(seed=1)
    fused = fuse_adapters([a, b], [0.7, -0.2])
    for key in a.blocks.keys() | b.blocks.keys():
        want = sum(lam * _dense_delta(x, key) for x, lam in ((a, 0.7), (b, -0.2)) if key in x.blocks)
        assert_close(_dense_delta(fused, key), want, rtol=1e-15, atol=1e-15, what=key)


@settings(max_examples=8)
@given(st.lists(st.integers(-1, 3), min_size=1, max_size=5), st.integers(0, 2**16))
@example([0, 1, -1, 2, 3], 0)
def test_a_batch_with_one_adapter_per_request_equals_each_request_on_its_own_merged_model(assignment, seed):
    s2ft_cols = _trained(S2FTConfig(heads=2, channels=3), seed=seed)[1]  # O and Down: column blocks
    s2ft_rows = _trained(ALL, seed=seed + 1)[1]  # also Q, K, V, Gate, Up: row blocks
    adapters = [s2ft_cols, s2ft_rows, _lora(seed), _lora(seed + 1, targets=("k", "o", "up"))]
    base = _base()
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (len(assignment), 4))
    before = _weights(base)
    logits = batched_forward(base, tokens, adapters, assignment)
    for b, k in enumerate(assignment):
        own = copy.deepcopy(base)
        if k >= 0:
            merge_adapter(own, adapters[k])
        want, _ = model_forward(own, tokens[b : b + 1], train=False)
        assert_close(logits[b : b + 1], want, rtol=1e-10, atol=1e-11, what=f"request {b} (adapter {k})")
    for key, w in _weights(base).items():  # serving never modifies the shared base
        np.testing.assert_array_equal(w, before[key])


def test_lora_factors_of_a_lora_model_served_on_the_base_equal_the_lora_model():
    model = apply_lora(_base(), LoRAConfig(r=2, targets=("q", "v", "down")), np.random.default_rng(0))
    for slot in (s for _, s in lora.low_rank_slots(model)):
        slot.B += np.random.default_rng(1).standard_normal(slot.B.shape)  # as if trained
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 4))
    want, _ = model_forward(model, tokens, train=False)
    got = batched_forward(_base(), tokens, [lora_factors(model)], [0, 0])
    assert_close(got, want, rtol=1e-10, atol=1e-11, what="logits")


def test_an_adapter_for_another_model_is_a_checkpoint_error():
    _, adapter = _trained()
    other = init_model(
        ModelConfig(
            vocab_size=11,
            hidden_size=6,
            intermediate_size=10,
            n_layers=2,
            n_heads=6,
            n_kv_heads=3,
            head_dim=2,
        ),
        np.random.default_rng(0),
    )
    with pytest.raises(CheckpointError, match="made for a model with"):
        merge_adapter(other, adapter)
    unsigned = S2FTAdapter(adapter.blocks, {})
    with pytest.raises(CheckpointError, match="shape"):
        merge_adapter(other, unsigned)
    with pytest.raises(CheckpointError, match="names no dense slot"):
        merge_adapter(_base(), S2FTAdapter({"blocks.7.o": adapter.blocks["blocks.0.o"]}, {}))
    with pytest.raises(CheckpointError, match="do not fit"):
        merge_adapter(_base(), {"blocks.0.o": _lora(0)["blocks.0.q"]})


def test_serving_on_a_permuted_model_is_a_checkpoint_error():
    trained, adapter = _trained()
    with pytest.raises(CheckpointError, match="unpermute it"):
        merge_adapter(trained, adapter)


def test_bad_indices_or_files_are_checkpoint_errors_naming_the_problem(tmp_path):
    _, adapter = _trained()
    blk = adapter.blocks["blocks.0.o"]
    bad = AdapterBlock(blk.axis, blk.indices + 100, blk.delta, blk.shape)
    with pytest.raises(CheckpointError, match="within"):
        merge_adapter(_base(), S2FTAdapter({"blocks.0.o": bad}, adapter.signature))
    path = save_adapter(adapter, tmp_path / "a")
    index = json.loads((path / "adapter.json").read_text())
    index["blocks"]["blocks.0.o"]["axis"] = "rows"
    (path / "adapter.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.o.*delta has shape"):
        load_adapter(path)
    with pytest.raises(CheckpointError, match=r"adapter\.json"):
        load_adapter(tmp_path / "missing")
    (path / "adapter.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors"):
        load_adapter(path)


def test_a_request_assignment_that_does_not_fit_the_batch_is_a_shape_error():
    with pytest.raises(ShapeError, match="assignment"):
        batched_forward(_base(), np.zeros((2, 3), dtype=np.int64), [], [0, -1])


def test_the_signature_names_the_sizes_an_adapter_depends_on():
    assert model_signature(CFG) == {
        "n_layers": 2,
        "hidden_size": 8,
        "intermediate_size": 10,
        "n_heads": 6,
        "n_kv_heads": 3,
        "head_dim": 2,
    }


def test_on_every_array_module_batched_serving_equals_merged_models(xp):
    _, cols = _trained(S2FTConfig(heads=2, channels=3))
    _, rows = _trained(ALL, seed=1)
    base = to_device(_base(), "cpu" if xp is np else "cuda")
    tokens = xp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 4)))
    adapters = [cols, rows, _lora(0)]
    logits = batched_forward(base, tokens, adapters, [2, 0, 1])
    for b, k in enumerate([2, 0, 1]):
        own = copy.deepcopy(base)
        merge_adapter(own, adapters[k])
        want, _ = model_forward(own, tokens[b : b + 1], train=False)
        assert_close(logits[b : b + 1], want, rtol=1e-10, atol=1e-11, what=f"request {b}")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ix: ix.update(blocks=[]), r"'blocks' must map slot keys to \{axis, shape\}"),
        (lambda ix: ix.update(model=[1, 2]), r"'model' must map sizes to integers"),
        (lambda ix: ix["blocks"].update({"blocks.0.o": "columns"}), r"block 'blocks\.0\.o' needs 'axis'"),
    ],
)
def test_a_malformed_adapter_index_is_a_checkpoint_error_naming_it(tmp_path, edit, message):
    _, adapter = _trained()
    path = save_adapter(adapter, tmp_path / "a")
    index = json.loads((path / "adapter.json").read_text())
    edit(index)
    (path / "adapter.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"adapter\.json: {message}"):
        load_adapter(path)
