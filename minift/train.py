"""The training loop, the same for every fine-tuning method: a method only swaps a model's slots, and
the loop trains whatever ``trainable_parameters(model)`` returns.

One optimizer step s (0-based) is:

    micro-batches i = s·k … s·k + k − 1 of the data stream         (k = accum_steps)
    loss, grads = token-weighted accumulation over them             (``accumulate_gradients``)
    stop with TrainingError if the loss or the gradient norm is NaN/inf
    clip the global gradient norm to ``max_grad_norm``
    grad hooks, in order: hook(model, grads, lr_max=<peak lr>, accum_steps=k)
    AdamW with lr = schedule(s)

**Grad hooks** let a method add its own gradient term without a loop of its own (SORSA's orthonormal
regularizer, SORSA §3.3). A hook is any callable ``hook(model, grads, *, lr_max, accum_steps)`` that
mutates the ``grads`` dict in place (same keys as ``trainable_parameters``); it runs after clipping,
so its term is not clipped, and before the optimizer. ``lr_max`` is the schedule's peak learning rate
and ``accum_steps`` the number of micro-batches in the step.

Checkpoints (``minift.io.checkpoint``) are written every ``checkpoint_every`` steps, at the end, and on
Ctrl-C: the first Ctrl-C lets the current step finish, saves, then raises KeyboardInterrupt (a second
one interrupts at once, and a step interrupted half-way through its update is not saved). Resuming
restores weights, optimizer, host RNG and step; the data order is a function of the step, so the
resumed run continues bitwise identically to one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple, Protocol

import numpy as np
from tqdm.auto import tqdm

from minift.backend import Array, get_xp, to_xp
from minift.data.datasets import Batch, BatchStream
from minift.errors import CheckpointError, ConfigError, DataError, TrainingError
from minift.io.checkpoint import latest_checkpoint, load_checkpoint, restore_checkpoint, save_checkpoint
from minift.layers.cross_entropy import IGNORE_INDEX
from minift.model import Model, loss_and_grads, trainable_parameters
from minift.optim import AdamW, Schedule, ScheduleKind, clip_grad_norm
from minift.slots import Grads


class GradHook(Protocol):
    """A method's gradient term: mutates ``grads`` in place, after clipping and before AdamW."""

    def __call__(self, model: Model, grads: Grads, *, lr_max: float, accum_steps: int) -> None: ...


EvalFn = Callable[[Model, int], Mapping[str, float] | None]

# The settings that change the arithmetic of a run: a resume must use the same ones to be exact.
_RESUME_MUST_MATCH = (
    "lr", "schedule", "warmup_steps", "accum_steps", "betas", "eps", "weight_decay", "max_grad_norm",
    "seed", "batch_size", "data_seed",
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Micro-batch size and data order belong to the ``BatchStream``."""

    steps: int  # optimizer steps
    lr: float = 1e-3  # peak learning rate (lr_max of the schedule)
    schedule: ScheduleKind = "linear"
    warmup_steps: int = 0
    accum_steps: int = 1  # micro-batches per optimizer step
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0  # the host RNG handed to slots (e.g. adapter dropout)
    eval_every: int = 0  # 0: evaluate only at the end (when an eval_fn is given)
    checkpoint_every: int = 0  # 0: checkpoint only at the end and on Ctrl-C
    checkpoint_dir: str | None = None  # None: no checkpoints at all
    keep_checkpoints: int = 2
    progress: bool = True  # the tqdm bar and the final summary on stderr
    # Keep only each block's input and rerun its forward in the backward: activation memory falls to
    # one block's worth, for one more forward; the gradients are the same.
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.accum_steps < 1:
            raise ConfigError(f"steps and accum_steps must be >= 1, got {self.steps} and {self.accum_steps}")

    def schedule_fn(self) -> Schedule:
        return Schedule(self.lr, self.steps, self.schedule, self.warmup_steps)


def counted_tokens(targets: Array) -> int:
    """Targets that count in the loss (not IGNORE_INDEX): the weight of a micro-batch."""
    return int((targets != IGNORE_INDEX).sum())


def accumulate_gradients(
    model: Model,
    micro_batches: Sequence[tuple[Array, Array, Array | None]],
    *,
    rng: np.random.Generator | None = None,
    checkpoint: bool = False,
) -> tuple[float, Grads, int]:
    """Loss and gradients of k micro-batches taken together as ONE batch (``checkpoint``: activation
    checkpointing, see ``minift.model.model_forward``).

    The loss is a mean over counted tokens, so micro-batch i (n_i counted tokens, mean loss ℓ_i) enters
    with weight n_i / Σ n: loss = Σ n_i ℓ_i / Σ n and grads = Σ (n_i / Σ n) ∇ℓ_i. This equals the loss and
    gradient of the concatenated batch exactly (up to rounding), whatever the padding of each micro-batch;
    a plain 1/k average would not, whenever micro-batches count different numbers of tokens.

    Args:
        micro_batches: (tokens, targets, attention_mask) triples; targets already shifted.
    Returns:
        (loss, grads, total counted tokens)

    Shapes:
        tokens, targets, attention_mask: (B, T) per micro-batch, T may differ between them
    """
    counts = [counted_tokens(targets) for _, targets, _ in micro_batches]
    total = sum(counts)
    if total == 0:
        raise DataError("a training step's micro-batches have no counted target (all are -100)")
    loss, grads = 0.0, {}
    for (tokens, targets, mask), n in zip(micro_batches, counts, strict=True):
        if n == 0:
            continue  # contributes nothing to the mean
        w = n / total
        part, g = loss_and_grads(
            model, tokens, targets, attention_mask=mask, rng=rng, loss_scale=w, checkpoint=checkpoint
        )
        loss += w * part
        for k, a in g.items():
            grads[k] = grads[k] + a if k in grads else a
    return loss, grads, total


class StepResult(NamedTuple):
    loss: float  # mean over the step's counted target tokens
    grad_norm: float  # before clipping
    tokens: int  # input tokens processed (padding excluded)


def train_step(
    model: Model,
    optimizer: AdamW,
    micro_batches: Sequence[Batch],
    lr: float,
    *,
    max_grad_norm: float | None = 1.0,
    grad_hooks: Sequence[GradHook] = (),
    lr_max: float | None = None,
    rng: np.random.Generator | None = None,
    activation_checkpointing: bool = False,
) -> StepResult:
    """One optimizer step on k micro-batches (see the module docstring for the order of operations).

    Raises:
        TrainingError, before anything is updated, when the loss or a gradient is NaN or infinite.
    """
    # NOTE: a diverged model overflows in exp/matmul; the check below reports it more clearly than
    # NumPy's RuntimeWarnings would.
    xp = get_xp(model.embed.weight)
    on_device = [tuple(to_xp(a, xp) for a in b) for b in micro_batches]  # batches are built on the host
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        loss, grads, _ = accumulate_gradients(model, on_device, rng=rng, checkpoint=activation_checkpointing)
        norm = clip_grad_norm(grads, max_grad_norm)  # scales nothing when the norm is not finite
    if not math.isfinite(loss):
        raise TrainingError(f"the loss is {loss}: training diverged (try a lower learning rate)")
    if not math.isfinite(norm):
        bad = [k for k, g in grads.items() if not math.isfinite(float((g * g).sum()))]
        raise TrainingError(f"the gradient is not finite (NaN or inf) in {bad}: training diverged")
    for hook in grad_hooks:
        hook(model, grads, lr_max=lr if lr_max is None else lr_max, accum_steps=len(micro_batches))
    optimizer.step(grads, lr)
    return StepResult(loss, norm, sum(int(b.attention_mask.sum()) for b in micro_batches))


@dataclass
class TrainResult:
    """What a run did: its summary numbers and per-step history."""

    steps: int  # the step count reached (including steps done before a resume)
    tokens: int  # input tokens processed in this session
    wall_s: float
    peak_memory_bytes: int | None  # peak RSS (see ``peak_memory``; None where the OS does not say)
    losses: list[float] = field(default_factory=list)  # this session's steps
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoint: Path | None = None  # the last checkpoint written (or resumed from)
    peak_memory_what: str = "process RSS"  # what peak_memory_bytes measures

    def summary(self) -> str:
        mem = "n/a" if self.peak_memory_bytes is None else f"{self.peak_memory_bytes / 2**20:.1f} MiB"
        rate = self.tokens / self.wall_s if self.wall_s > 0 else 0.0
        last = f"{self.losses[-1]:.4f}" if self.losses else "n/a"
        return (
            f"steps {self.steps} | tokens {self.tokens} | wall {self.wall_s:.1f} s | {rate:.0f} tok/s | "
            f"final loss {last} | peak memory {mem} ({self.peak_memory_what})"
        )


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux: writing 5 to /proc/self/clear_refs resets VmHWM
    to the current RSS); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory(reset_done: bool) -> tuple[int | None, str]:
    """(bytes, what they measure): the process's own peak RSS since ``reset_peak_rss`` (VmHWM) when the
    reset worked, else ``ru_maxrss``, which on Linux is inherited across fork: a process started by a
    large parent reports at least the parent's peak at the fork. None where neither is available."""
    if reset_done:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak RSS of this process during training, VmHWM"
        except (OSError, ValueError, IndexError):
            pass
    try:
        import resource
    except ImportError:
        return None, "not measured"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes, Linux: KiB
    return peak, "ru_maxrss: process peak, may include a parent's peak at fork"


class _DeferredInterrupt:
    """While active in the main thread, the first Ctrl-C only sets ``requested``; the second raises."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _run_config(config: TrainConfig, data: BatchStream) -> dict[str, Any]:
    """The run's settings as saved in a checkpoint (JSON types: tuples become lists)."""
    d = dataclasses.asdict(config) | {"batch_size": data.batch_size, "data_seed": data.seed}
    return json.loads(json.dumps(d))


def train(
    model: Model,
    data: BatchStream,
    config: TrainConfig,
    *,
    eval_fn: EvalFn | None = None,
    grad_hooks: Sequence[GradHook] = (),
    resume: bool | str | Path = False,
    extend: bool = False,
) -> TrainResult:
    """Train ``model``'s trainable arrays in place for ``config.steps`` optimizer steps.

    Args:
        data: the micro-batch stream; step s reads micro-batches s·k … s·k + k − 1.
        eval_fn: ``eval_fn(model, step)`` every ``eval_every`` steps and at the end; a returned dict
            of numbers is shown and kept in ``TrainResult.evals``.
        grad_hooks: extra gradient terms (see the module docstring).
        resume: True resumes from ``config.checkpoint_dir`` if it holds a checkpoint; a path resumes from
            that run or step folder; False starts afresh.
        extend: with ``resume``, ``config.steps`` may differ from the checkpoint's: a finished run
            trains on to the new total. The steps already taken stay as they were (the state is
            restored bit for bit); the remaining ones follow the schedule re-planned to the new total,
            lr = schedule(step; total = config.steps). A constant schedule is therefore exactly the
            run that was asked for the new total from the start; a decaying one jumps to the new
            curve at the checkpoint (a linear decay that had reached 0 rises again to its value at
            that step of the longer run).
    Raises:
        TrainingError on a NaN/inf loss or gradient; checkpoints already written are left intact.
    """
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("the model has no trainable arrays: apply a fine-tuning method first")
    schedule = config.schedule_fn()
    optimizer = AdamW(params, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    run_config = _run_config(config, data)
    run_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    start, resumed_from = _resume(resume, run_dir, run_config, model, optimizer, rng, extend=extend)
    result = TrainResult(start, 0, 0.0, None, checkpoint=resumed_from)
    k = config.accum_steps

    def save(step: int) -> None:
        if run_dir is not None:
            result.checkpoint = save_checkpoint(
                run_dir, model, optimizer, step=step, rng=rng, train_config=run_config,
                keep=config.keep_checkpoints,
            )

    def evaluate(step: int) -> None:
        if eval_fn is not None:
            metrics = eval_fn(model, step)
            if metrics:
                result.evals.append((step, dict(metrics)))
                bar.write(f"step {step}: " + ", ".join(f"{n} {v:.4g}" for n, v in metrics.items()))

    t0 = time.perf_counter()
    reset_done = reset_peak_rss()
    # In a log (stderr not a terminal) a bar's redraws pile up as lines: the summary line says it all.
    bar = tqdm(total=config.steps, initial=start, disable=not config.progress or not sys.stderr.isatty(),
               unit="step")
    step = start
    try:
        with _DeferredInterrupt() as interrupt:
            for step in range(start, config.steps):
                lr = schedule(step)
                micro = [data.batch(step * k + j) for j in range(k)]
                out = train_step(
                    model, optimizer, micro, lr, max_grad_norm=config.max_grad_norm,
                    grad_hooks=grad_hooks, lr_max=schedule.lr_max, rng=rng,
                    activation_checkpointing=config.activation_checkpointing,
                )
                result.steps, result.tokens = step + 1, result.tokens + out.tokens
                result.losses.append(out.loss)
                elapsed = time.perf_counter() - t0
                rate = result.tokens / elapsed
                bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}", refresh=False)
                bar.update()
                done = step + 1
                if config.eval_every and done % config.eval_every == 0:
                    evaluate(done)
                if config.checkpoint_every and done % config.checkpoint_every == 0:
                    save(done)
                if interrupt.requested:
                    raise KeyboardInterrupt
    except TrainingError as e:
        bar.close()
        kept = f"the last good checkpoint {result.checkpoint} is intact" if result.checkpoint else (
            "no checkpoint was written"
        )
        raise TrainingError(f"step {step + 1} of {config.steps}: {e}; {kept}") from None
    except KeyboardInterrupt:
        bar.close()
        # AdamW counts a step before it touches any array: t == steps done means none is half-updated.
        if optimizer.t == result.steps:
            save(result.steps)
            where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
        else:
            where = "; not saved: interrupted in the middle of an update"
        print(f"minift: interrupted after step {result.steps}{where}", file=sys.stderr)
        raise
    bar.close()
    if config.eval_every == 0 or result.steps % config.eval_every != 0:
        evaluate(result.steps)
    if config.checkpoint_every == 0 or result.steps % config.checkpoint_every != 0:
        save(result.steps)
    result.wall_s = time.perf_counter() - t0
    result.peak_memory_bytes, result.peak_memory_what = peak_memory(reset_done)
    if config.progress:
        print(result.summary(), file=sys.stderr)
    return result


def _resume(
    resume: bool | str | Path,
    run_dir: Path | None,
    run_config: dict[str, Any],
    model: Model,
    optimizer: AdamW,
    rng: np.random.Generator,
    *,
    extend: bool = False,
) -> tuple[int, Path | None]:
    """Restore a checkpoint if asked to; return the step to start from and the checkpoint's folder."""
    if resume is False:
        return 0, None
    if resume is True:
        found = latest_checkpoint(run_dir) if run_dir is not None else None
        if found is None:
            return 0, None
        path = found
    else:
        path = Path(resume)
    ckpt = load_checkpoint(path)
    saved = ckpt.state.get("train_config", {})
    # A decaying schedule depends on the total step count, so extending such a run changes its lr.
    keys = _RESUME_MUST_MATCH + (("steps",) if run_config["schedule"] != "constant" and not extend else ())
    differ = [key for key in keys if saved.get(key) != run_config[key]]
    if differ:
        hint = (" (to train a finished run further, extend it: the schedule is re-planned to the new "
                "total; or start a new run folder)") if differ == ["steps"] else ""
        raise CheckpointError(
            f"{ckpt.path / 'state.json'}: the run's settings {differ} differ from the checkpoint's "
            f"({', '.join(f'{key}={saved.get(key)!r}' for key in differ)}); resume with the same ones{hint}"
        )
    if extend and ckpt.step >= run_config["steps"]:
        raise CheckpointError(
            f"{ckpt.path}: the run is already at step {ckpt.step}; extending needs more steps than that"
        )
    restore_checkpoint(ckpt, model, optimizer, rng)
    return ckpt.step, ckpt.path
