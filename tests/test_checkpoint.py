"""Training checkpoints (minift.io.checkpoint): round trip, atomic layout, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minift.errors import CheckpointError
from minift.io.checkpoint import latest_checkpoint, load_checkpoint, restore_checkpoint, save_checkpoint
from minift.io.safetensors_io import write_safetensors
from minift.methods.s2ft.slots import block_slot
from minift.model import trainable_parameters
from minift.optim import AdamW
from tests.toy import tiny_model


def _trained(seed: int = 0):
    """A model with an S2FT column block (a view) and a trainable norm, after two AdamW steps."""
    model = tiny_model(9, seed=seed, trainable=False)
    model.blocks[1].o = block_slot("columns", model.blocks[1].o.weight, ((0, 8),))
    model.final_norm.requires_grad = True
    params = trainable_parameters(model)
    opt = AdamW(params, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        opt.step({k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}, lr=1e-2)
    return model, opt, rng


def test_a_checkpoint_holds_exactly_the_trainable_arrays_and_the_optimizer_state(tmp_path):
    model, opt, rng = _trained()
    folder = save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={"lr": 0.01})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == folder
    assert ckpt.step == 2
    params = trainable_parameters(model)
    assert set(ckpt.params) == {"blocks.1.o.weight", "final_norm.weight"}
    for k, p in params.items():
        assert np.array_equal(ckpt.params[k], p)
        assert ckpt.params[k].shape == p.shape  # the (C, 8) block, not the whole o matrix
    for k, a in opt.state_arrays().items():
        assert np.array_equal(ckpt.optimizer[k], a)
    assert ckpt.state["train_config"] == {"lr": 0.01}
    assert ckpt.state["model_config"] == json.loads(json.dumps(model.config.to_dict()))


def test_restoring_into_a_fresh_model_reproduces_weights_views_optimizer_and_rng(tmp_path):
    model, opt, rng = _trained(seed=0)
    save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={})
    fresh, fresh_opt, fresh_rng = _trained(seed=1)  # different values everywhere trainable
    fresh_weight = fresh.blocks[1].o.weight
    restore_checkpoint(load_checkpoint(tmp_path), fresh, fresh_opt, fresh_rng)
    for k, p in trainable_parameters(model).items():
        assert np.array_equal(trainable_parameters(fresh)[k], p)
    assert trainable_parameters(fresh)["blocks.1.o.weight"].base is fresh_weight  # still a view, in place
    for k, a in opt.state_arrays().items():
        assert np.array_equal(fresh_opt.state_arrays()[k], a)
    assert fresh_opt.t == opt.t
    assert fresh_rng.random() == rng.random()


def test_saving_is_atomic_leaves_no_temporary_files_and_keeps_the_newest(tmp_path):
    model, opt, rng = _trained()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, opt, step=step, rng=rng, train_config={}, keep=2)
    save_checkpoint(tmp_path, model, opt, step=3, rng=rng, train_config={}, keep=2)  # same step again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_a_truncated_checkpoint_file_is_a_checkpoint_error_naming_the_file_and_tensor(tmp_path):
    model, opt, rng = _trained()
    folder = save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={})
    file = folder / "trainable.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=rf"{file}: tensor '[a-z_.0-9]+' .*truncated"):
        load_checkpoint(tmp_path)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=str(file)):
        load_checkpoint(tmp_path)


def test_a_corrupt_or_foreign_state_file_is_a_checkpoint_error_naming_it(tmp_path):
    model, opt, rng = _trained()
    folder = save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={})
    state = folder / "state.json"
    state.write_text('{"step": ')
    with pytest.raises(CheckpointError, match=rf"{state}: corrupt"):
        load_checkpoint(folder)
    state.write_text('{"step": 2}')
    with pytest.raises(CheckpointError, match="not a minift training checkpoint"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(tmp_path / "elsewhere")


def test_restoring_into_a_model_with_other_trainable_arrays_names_the_difference(tmp_path):
    model, opt, rng = _trained()
    save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={})
    other = tiny_model(9, trainable=False)
    other.final_norm.requires_grad = True
    other.blocks[0].o.requires_grad = True
    expected = r"missing \['blocks.0.o.weight'\], unexpected \['blocks.1.o.weight'\]"
    with pytest.raises(CheckpointError, match=expected):
        restore_checkpoint(load_checkpoint(tmp_path), other, AdamW(trainable_parameters(other)), rng)


def test_restoring_into_a_model_of_another_config_is_a_checkpoint_error(tmp_path):
    model, opt, rng = _trained()
    save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={})
    other = tiny_model(9, trainable=False, rope_theta=500.0)
    with pytest.raises(CheckpointError, match="model_config differs"):
        restore_checkpoint(load_checkpoint(tmp_path), other, AdamW({}), rng)


def test_saving_an_earlier_step_into_a_run_folder_keeps_the_checkpoint_just_written(tmp_path):
    # A fresh run written into the folder of a longer earlier run: pruning by name alone would delete
    # the new step-00000001 at once (it sorts before the old run's folders) and leave `latest`
    # naming a folder that no longer exists.
    model, opt, rng = _trained()
    for step in (5, 6):
        save_checkpoint(tmp_path, model, opt, step=step, rng=rng, train_config={}, keep=2)
    for step in (1, 2, 3):
        folder = save_checkpoint(tmp_path, model, opt, step=step, rng=rng, train_config={}, keep=2)
        assert folder.is_dir()
        assert load_checkpoint(tmp_path).step == step
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["latest", "step-00000002", "step-00000003", "step-00000005", "step-00000006"]


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda s: s.pop("step"), "step"),
        (lambda s: s.update(step="two"), "step"),
        (lambda s: s.pop("optimizer_t"), "optimizer_t"),
        (lambda s: s.pop("rng"), "rng"),
        (lambda s: s.update(rng={"bit_generator": "PCG64", "state": 3}), "rng"),
    ],
)
def test_a_state_file_with_a_missing_or_bad_entry_is_a_checkpoint_error_naming_the_key(tmp_path, edit, key):
    model, opt, rng = _trained()
    folder = save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={})
    path = folder / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    fresh, fresh_opt, fresh_rng = _trained(seed=1)
    with pytest.raises(CheckpointError, match=rf"{path}: .*{key}"):
        restore_checkpoint(load_checkpoint(folder), fresh, fresh_opt, fresh_rng)


@pytest.mark.parametrize("pointer", [b"", b"\xff\xfe", b"state.json", b"../elsewhere"])
def test_a_latest_file_that_names_no_step_folder_is_a_checkpoint_error_naming_it(tmp_path, pointer):
    model, opt, rng = _trained()
    save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={})
    (tmp_path / "latest").write_bytes(pointer)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'latest'}: .*step folder"):
        latest_checkpoint(tmp_path)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from minift.io import atomic

    target = tmp_path / "latest"
    target.write_text("step-00000001")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic.write_file_atomic(target, b"step-00000002")
    assert target.read_text() == "step-00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_checkpoint_that_fails_half_way_leaves_no_temporary_folder_and_the_last_one_intact(
    tmp_path, monkeypatch
):
    from minift.io import checkpoint

    model, opt, rng = _trained()
    save_checkpoint(tmp_path, model, opt, step=1, rng=rng, train_config={})
    written = []

    def write_then_fail(path, tensors, **kw):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        write_safetensors(path, tensors, **kw)

    monkeypatch.setattr(checkpoint, "write_safetensors", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, model, opt, step=2, rng=rng, train_config={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    assert load_checkpoint(tmp_path).step == 1
