"""The training loop (minift.train): the acceptance task, exact resume, interrupts, divergence, hooks."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest

import minift.train
from minift.data import BatchStream, encode_example
from minift.errors import CheckpointError, ConfigError, TrainingError
from minift.generate import generate
from minift.io.checkpoint import load_checkpoint
from minift.model import trainable_parameters
from minift.optim import global_grad_norm
from minift.train import TrainConfig, train
from tests.toy import char_tokenizer, reverse_records, tiny_model

TOK = char_tokenizer()


def _data(max_len: int = 2, batch_size: int = 4, seed: int = 0) -> BatchStream:
    examples = [encode_example(TOK, r) for r in reverse_records(max_len)]
    return BatchStream(examples, batch_size, TOK.pad_id, seed=seed)


def _config(**kw) -> TrainConfig:
    base = {"steps": 8, "lr": 1e-2, "warmup_steps": 2, "accum_steps": 2, "weight_decay": 0.01,
            "progress": False}
    return TrainConfig(**(base | kw))


def _params(model) -> dict[str, np.ndarray]:
    return {k: p.copy() for k, p in trainable_parameters(model).items()}


def _same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# acceptance


def test_a_tiny_model_learns_to_reverse_strings_and_then_generates_every_reversal():
    records = reverse_records(3)  # all 84 strings over "abcd" of length 1..3
    data = BatchStream([encode_example(TOK, r) for r in records], 16, TOK.pad_id, seed=0)
    model = tiny_model(TOK.vocab_size, seed=0)
    config = TrainConfig(steps=200, lr=1e-2, schedule="cosine", warmup_steps=20, progress=False)
    result = train(model, data, config)
    assert np.mean(result.losses[-10:]) < 0.01
    outputs = generate(model, [TOK.encode(r["prompt"]) for r in records], max_new_tokens=5)
    wrong = [(r["prompt"], TOK.decode(o)) for r, o in zip(records, outputs, strict=True)
             if TOK.decode(o) != r["completion"]]
    assert wrong == []
    assert all(o[-1] == TOK.eos_ids[0] for o in outputs)  # every answer ends with EOS


# ----------------------------------------------------------------------------------------------------
# determinism and resume


def test_the_same_seed_gives_bitwise_identical_losses_and_weights_twice():
    runs = []
    for _ in range(2):
        model = tiny_model(TOK.vocab_size)
        result = train(model, _data(), _config())
        runs.append((result.losses, _params(model)))
    assert runs[0][0] == runs[1][0]
    assert _same_bits(runs[0][1], runs[1][1])


def _uninterrupted():
    model = tiny_model(TOK.vocab_size)
    result = train(model, _data(), _config())
    return result.losses, _params(model)


def test_an_interrupted_then_resumed_run_ends_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    losses, params = _uninterrupted()
    calls = []

    def ctrl_c_during_step_5(model, grads, *, lr_max, accum_steps):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # before the update: steps 1-4 are complete, step 5 is not

    config = _config(checkpoint_dir=str(tmp_path))
    model = tiny_model(TOK.vocab_size)
    with pytest.raises(KeyboardInterrupt):
        train(model, _data(), config, grad_hooks=[ctrl_c_during_step_5])
    assert load_checkpoint(tmp_path).step == 4
    resumed_model = tiny_model(TOK.vocab_size)  # a new process would rebuild the base the same way
    resumed = train(resumed_model, _data(), config, resume=True)
    assert resumed.steps == 8
    assert resumed.losses == losses[4:]
    assert _same_bits(_params(resumed_model), params)


def test_ctrl_c_lets_the_current_step_finish_and_saves_it_before_exiting(tmp_path):
    losses, params = _uninterrupted()
    calls = []

    def press_ctrl_c_in_step_3(model, grads, *, lr_max, accum_steps):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    config = _config(checkpoint_dir=str(tmp_path))
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(TOK.vocab_size), _data(), config, grad_hooks=[press_ctrl_c_in_step_3])
    assert load_checkpoint(tmp_path).step == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    model = tiny_model(TOK.vocab_size)
    resumed = train(model, _data(), config, resume=tmp_path)
    assert resumed.losses == losses[3:]
    assert _same_bits(_params(model), params)


def test_resuming_with_different_training_settings_is_refused_naming_them(tmp_path):
    train(tiny_model(TOK.vocab_size), _data(), _config(steps=2, checkpoint_dir=str(tmp_path)))
    with pytest.raises(CheckpointError, match=r"settings \['lr', 'steps'\] differ"):
        train(tiny_model(TOK.vocab_size), _data(), _config(lr=0.5, checkpoint_dir=str(tmp_path)), resume=True)


# ----------------------------------------------------------------------------------------------------
# divergence


def test_a_nan_loss_stops_training_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    def corrupt_after_step_3(model, step):
        if step == 3:
            model.final_norm.weight[0] = np.nan  # a diverged weight, as a too-high lr would leave
        return None

    config = _config(checkpoint_dir=str(tmp_path), checkpoint_every=2, eval_every=1)
    expected = r"step 4 of 8: the loss is nan.*the last good checkpoint .*step-00000002 is intact"
    with pytest.raises(TrainingError, match=expected):
        train(tiny_model(TOK.vocab_size), _data(), config, eval_fn=corrupt_after_step_3)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 2
    assert all(np.isfinite(a).all() for a in ckpt.params.values())


def test_a_non_finite_gradient_stops_training_naming_the_arrays_it_is_in(monkeypatch):
    import minift.train

    def overflowing(model, micro_batches, *, rng=None, checkpoint=False):
        grads = {k: np.zeros_like(p) for k, p in trainable_parameters(model).items()}
        grads["blocks.0.down.weight"][0, 0] = np.inf  # a finite loss whose gradient overflowed
        return 1.0, grads, 1

    monkeypatch.setattr(minift.train, "accumulate_gradients", overflowing)
    model = tiny_model(TOK.vocab_size)
    before = _params(model)
    with pytest.raises(TrainingError, match=r"not finite \(NaN or inf\) in \['blocks.0.down.weight'\]"):
        train(model, _data(), _config())
    assert _same_bits(_params(model), before)  # nothing was updated


# ----------------------------------------------------------------------------------------------------
# hooks, evaluation, progress


def test_grad_hooks_run_after_clipping_and_before_adamw_with_lr_max_and_accum_steps():
    seen = []

    def record(model, grads, *, lr_max, accum_steps):
        seen.append((global_grad_norm(grads), lr_max, accum_steps))

    config = _config(max_grad_norm=1e-3, accum_steps=3)
    train(tiny_model(TOK.vocab_size), _data(), config, grad_hooks=[record])
    assert len(seen) == 8
    assert all(norm <= 1e-3 for norm, _, _ in seen)  # clipped before the hook
    assert all((lr_max, k) == (1e-2, 3) for _, lr_max, k in seen)

    def zero(model, grads, *, lr_max, accum_steps):
        for g in grads.values():
            g[...] = 0.0

    model = tiny_model(TOK.vocab_size)
    before = _params(model)
    train(model, _data(), _config(weight_decay=0.0), grad_hooks=[zero])
    assert _same_bits(_params(model), before)  # AdamW saw the hook's (zero) gradients


def test_the_eval_hook_runs_every_eval_every_steps_and_at_the_end():
    steps = []

    def evaluate(model, step):
        steps.append(step)
        return {"step_seen": float(step)}

    result = train(tiny_model(TOK.vocab_size), _data(), _config(steps=7, eval_every=3), eval_fn=evaluate)
    assert steps == [3, 6, 7]
    assert result.evals == [(3, {"step_seen": 3.0}), (6, {"step_seen": 6.0}), (7, {"step_seen": 7.0})]


def test_the_progress_bar_shows_loss_lr_and_tokens_per_second_and_ends_with_a_summary(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar is drawn
    result = train(tiny_model(TOK.vocab_size), _data(), _config(steps=3, progress=True))
    err = capsys.readouterr().err
    for word in ("loss=", "lr=", "tok_s=", "steps 3 | tokens", "peak memory"):
        assert word in err
    assert result.tokens == sum(int(_data().batch(i).attention_mask.sum()) for i in range(6))
    assert result.wall_s > 0


def test_a_model_with_nothing_trainable_is_a_config_error():
    with pytest.raises(ConfigError, match="no trainable arrays"):
        train(tiny_model(TOK.vocab_size, trainable=False), _data(), _config())


def test_extending_a_finished_constant_run_continues_bitwise_to_the_longer_run(tmp_path):
    longer = tiny_model(TOK.vocab_size)
    straight = train(longer, _data(), _config(steps=8, schedule="constant"))
    config = _config(steps=5, schedule="constant", checkpoint_dir=str(tmp_path))
    train(tiny_model(TOK.vocab_size), _data(), config)
    model = tiny_model(TOK.vocab_size)
    extended = train(model, _data(), _config(steps=8, schedule="constant", checkpoint_dir=str(tmp_path)),
                     resume=True, extend=True)
    assert extended.losses == straight.losses[5:]
    assert _same_bits(_params(model), _params(longer))


def test_extending_a_decaying_run_follows_the_schedule_replanned_to_the_new_total(tmp_path, monkeypatch):
    """Steps 0-3 ran under total 4; steps 4-7 get the 8-step curve's learning rates."""
    train(tiny_model(TOK.vocab_size), _data(), _config(steps=4, checkpoint_dir=str(tmp_path)))
    with pytest.raises(CheckpointError, match="extend it"):
        train(tiny_model(TOK.vocab_size), _data(), _config(checkpoint_dir=str(tmp_path)), resume=True)
    lrs, step = [], minift.train.train_step

    def recording_step(model, optimizer, micro, lr, **kw):
        lrs.append(lr)
        return step(model, optimizer, micro, lr, **kw)

    monkeypatch.setattr(minift.train, "train_step", recording_step)
    config = _config(checkpoint_dir=str(tmp_path))
    extended = train(tiny_model(TOK.vocab_size), _data(), config, resume=True, extend=True)
    assert extended.steps == 8
    assert lrs == [config.schedule_fn()(s) for s in range(4, 8)]
    with pytest.raises(CheckpointError, match="already at step 8"):
        train(tiny_model(TOK.vocab_size), _data(), config, resume=True, extend=True)


def test_the_memory_figure_is_this_processs_own_peak_not_an_earlier_one(capsys):
    """ru_maxrss keeps the highest RSS ever (a parent's at fork included); the figure after a reset of
    VmHWM does not see a 256 MiB array that was freed before training."""
    if not minift.train.reset_peak_rss():
        pytest.skip("this OS cannot reset the peak-RSS counter")
    big = np.ones(2**25)  # 256 MiB, touched
    with_big, _ = minift.train.peak_memory(True)
    del big
    result = train(tiny_model(TOK.vocab_size), _data(), _config(steps=2))
    assert "VmHWM" in result.peak_memory_what
    assert result.peak_memory_bytes < with_big


def test_a_log_gets_one_summary_line_and_no_progress_bar_redraws(capsys):
    train(tiny_model(TOK.vocab_size), _data(), _config(steps=3, progress=True))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("steps 3 |")
    assert "VmHWM" in lines[0] or "ru_maxrss" in lines[0]
