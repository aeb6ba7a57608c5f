"""One run of the study (one arm, one learning rate, one seed: train it and measure it), and running
many, in this process or in worker processes with one BLAS thread each.

A run is evaluated every ``eval_every`` steps on the validation split. The first checkpoint whose
validation exact match reaches ``match_level`` is the run's **matched** checkpoint: there it is also
measured on the test, near-OOD and far-OOD splits and for retention, so arms can be compared at the
same in-domain accuracy (a faster or more aggressive learner is not credited or blamed for being
further along). Every run is measured on everything again at its last step.
"""

from __future__ import annotations

import copy
import functools
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minift.backend import get_xp, single_threaded_blas_children
from minift.data.datasets import BatchStream, encode_example
from minift.data.tasks import task_tokenizer
from minift.errors import TrainingError
from minift.io.hub import load_pretrained, save_pretrained
from minift.methods.registry import MethodSpec, apply_method, get_method
from minift.methods.s2ft import match_lora_budget
from minift.methods.s2ft.budget import lora_parameter_count, s2ft_parameter_count
from minift.methods.svd_analysis import SVDTrajectory
from minift.model import Model
from minift.tools.finetune import trainable_count, write_adapter
from minift.tools.study import world
from minift.tools.study.config import ALL_TARGETS, ARM, S2FT_TARGETS, Arm, StudyConfig
from minift.train import TrainConfig, train

# ----------------------------------------------------------------------------------------------------
# one run


@dataclass(frozen=True)
class RunSpec:
    """One training run: an arm (``config.ARM``) at one learning rate and seed."""

    arm: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm}_lr{self.lr:g}_seed{self.seed}"


@dataclass
class RunResult:
    spec: RunSpec
    trainable: int  # trainable parameters
    setup: str  # what trains: "rank 4 on q, k, v, up, down", "1 heads (o) + 20 channels (down) per layer"
    losses: list[float]  # training loss per step
    curve: list[tuple[int, float]]  # (step, validation exact match) at every checkpoint
    final: dict[str, Any]  # every measure at the last step (``measure``), validation NLL included
    matched: dict[str, Any] | None  # every measure at the matched checkpoint; None: never reached
    svd: list[tuple[int, float, float]]  # (step, ΔΣ, ΔD), means over the trained projections
    wall_s: float
    cpu_s: float  # this process's CPU time: what the run costs on an idle core
    diverged: str | None = None  # why training stopped; such a run has no measures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(
            **(
                d
                | {
                    "spec": RunSpec(**d["spec"]),
                    "svd": [tuple(p) for p in d["svd"]],
                    "curve": [tuple(p) for p in d["curve"]],
                }
            )
        )


def task_splits(config: StudyConfig, task: str) -> world.Splits:
    return world.splits(task, config.n_train, config.n_eval, config.n_retention)


def method_spec(arm: Arm, model: Model, config: StudyConfig) -> MethodSpec:
    """The arm's method at the study's budget (LoRA/PiSSA scaling 1, SORSA scale 1, as ``finetune``)."""
    targets = S2FT_TARGETS if arm.group == "s2ft" else ALL_TARGETS
    rank = max(1, round(config.rank * arm.budget))
    if arm.at_s2ft_budget:  # the rank whose count is closest to S2FT's (O heads + Down channels)
        s2 = s2ft_parameter_count(
            model.config, match_lora_budget(model.config, config.rank, lora_targets=targets)
        )
        rank = max(1, round(s2 / lora_parameter_count(model.config, 1, arm.lora_targets or targets)))
    return MethodSpec(
        arm.method,
        rank=rank,
        targets=arm.lora_targets or targets,
        strategy=arm.strategy,
        variant=arm.variant,
        gamma=config.gamma if arm.gamma is None else arm.gamma,
        head_targets=arm.head_targets,
        channel_targets=arm.channel_targets,
    )


def describe_setup(spec: MethodSpec, model: Model) -> str:
    """What the arm trains, in words: LoRA's rank and targets, S2FT's heads and channels per layer."""
    if spec.method == "full":
        return "every weight"
    if spec.method != "s2ft":
        return f"rank {spec.rank} on {', '.join(spec.targets)}"
    s2 = get_method("s2ft").configure(spec, model.config)
    return (
        f"{s2.heads} heads ({', '.join(s2.head_targets) or '—'}) + {s2.channels} channels "
        f"({', '.join(s2.channel_targets)}) per layer"
    )


def calibration(model: Model, data: BatchStream, n: int) -> list[tuple[Any, Any]]:
    """The first ``n`` training batches as (tokens, targets): S2FT's calibration set."""
    xp = get_xp(model.embed.weight)
    return [(xp.asarray(b.tokens), xp.asarray(b.targets)) for b in map(data.batch, range(n))]


def measure(model: Model, sp: world.Splits) -> dict[str, Any]:
    """In-domain test, near- and far-OOD exact match and retention three ways (``world.retention``)."""
    return {
        "test": world.accuracy(model, sp.test),
        "near_ood": world.accuracy(model, sp.near_ood),
        "far_ood": world.accuracy(model, sp.far_ood) if sp.far_ood else None,
        "retention": world.retention(model, sp.retention),
    }


def training_data(arm: Arm, config: StudyConfig, sp: world.Splits, seed: int) -> BatchStream:
    tok = task_tokenizer()
    examples = list(sp.train)
    if arm.replay:  # replay/(1 − replay) of the task's count again, from the pretraining stream
        examples += world.replay_examples(
            round(len(sp.train) * config.replay / (1 - config.replay)), config.n_retention
        )
    return BatchStream(
        [encode_example(tok, ex.record) for ex in examples], config.batch_size, tok.pad_id, seed=seed
    )


def _svd_curve(traj: SVDTrajectory) -> list[tuple[int, float, float]]:
    """(step, ΔΣ, ΔD) means over the recorded projections, starting at (0, 0, 0)."""
    return [(0, 0.0, 0.0), *((int(s), float(a), float(b)) for s, a, b in traj.mean())]


def execute(spec: RunSpec, base: Model, config: StudyConfig, adapter_dir: Path | None = None) -> RunResult:
    """Train a copy of ``base`` by ``spec`` and evaluate it (``base`` is not changed)."""
    t0, c0 = time.perf_counter(), time.process_time()
    arm = ARM[spec.arm]
    sp = task_splits(config, config.task_of(arm))
    data = training_data(arm, config, sp, spec.seed)
    model = copy.deepcopy(base)
    calib = calibration(model, data, config.calib_batches) if arm.method == "s2ft" else None
    mspec = method_spec(arm, model, config)
    setup = describe_setup(mspec, model)
    hooks = apply_method(model, mspec, np.random.default_rng(spec.seed), calib)
    traj = SVDTrajectory.start(model, every=config.eval_every) if arm.svd else None
    curve: list[tuple[int, float]] = []
    matched: dict[str, Any] | None = None

    def checkpoint(m: Model, step: int) -> None:
        nonlocal matched
        if traj is not None:
            traj.record(m, step)
        v = world.accuracy(m, sp.validation)
        curve.append((step, v))
        if matched is None and v >= config.match_level:
            matched = {"step": step, "validation": v, **measure(m, sp)}

    betas = config.betas if arm.group == "s2ft" else config.sorsa_betas
    train_config = TrainConfig(
        steps=config.steps,
        lr=spec.lr,
        schedule="linear",
        warmup_steps=config.warmup_steps,
        betas=betas,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec.seed,
        eval_every=config.eval_every,
        progress=False,
    )
    trainable = trainable_count(model)
    # A rate too high for the arm blows the weights up before the loss turns non-finite: scoring such a
    # checkpoint overflows (harmlessly: its scores are garbage), and the run is then flagged below.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        try:
            losses = train(model, data, train_config, eval_fn=checkpoint, grad_hooks=hooks).losses
            nll = world.answer_nll(model, sp.validation)
            if not math.isfinite(nll):
                raise TrainingError(f"non-finite validation NLL after {config.steps} steps")
        except (TrainingError, np.linalg.LinAlgError, OverflowError) as e:  # non-finite loss, weights or NLL
            # a learning rate too high for the arm: the run is flagged, and never chosen
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            return RunResult(spec, trainable, setup, [], curve, {}, None, [], wall, cpu, diverged=str(e))
    if arm.keep and adapter_dir is not None:
        write_adapter(model, adapter_dir / spec.key)
    final = {"validation": curve[-1][1], "validation_nll": nll, **measure(model, sp)}
    return RunResult(
        spec=spec,
        trainable=trainable,
        setup=setup,
        losses=[float(x) for x in losses],
        curve=curve,
        final=final,
        matched=matched,
        svd=[] if traj is None else _svd_curve(traj),
        wall_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - c0,
    )


# ----------------------------------------------------------------------------------------------------
# running many: in this process, or in worker processes with one BLAS thread each


@functools.lru_cache(maxsize=1)
def _worker_base(path: str) -> Model:
    return load_pretrained(path)


def _worker(job: tuple[RunSpec, str, StudyConfig, str]) -> dict[str, Any]:
    spec, base_path, config, adapter_dir = job
    return execute(spec, _worker_base(base_path), config, Path(adapter_dir)).to_dict()


class Runner:
    """Runs specs in order, in this process (``jobs == 0``) or in ``jobs`` spawned workers that load
    the base model from a safetensors folder (bit-exact, so both ways give the same runs).

    Workers are the default even for one job: this process's BLAS may run several threads, which on
    these small matrices only contend with each other (and spin) on a busy machine."""

    def __init__(
        self, base: Model, config: StudyConfig, workdir: Path, jobs: int, log: Callable[[str], None]
    ) -> None:
        self.base, self.config, self.log = base, config, log
        self.adapters = workdir / "adapters"
        self.pool = None
        if jobs > 0:
            self.base_path = save_pretrained(base, workdir / "base")
            with single_threaded_blas_children():
                self.pool = multiprocessing.get_context("spawn").Pool(jobs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def run(self, specs: Sequence[RunSpec]) -> list[RunResult]:
        if self.pool is None:
            results: Iterable[RunResult] = (execute(s, self.base, self.config, self.adapters) for s in specs)
        else:
            jobs = [(s, str(self.base_path), self.config, str(self.adapters)) for s in specs]
            results = (RunResult.from_dict(d) for d in self.pool.imap(_worker, jobs))
        out = []
        for r in results:
            out.append(r)
            if r.diverged:
                self.log(f"  {r.spec.key:<40} diverged ({r.wall_s:.0f} s)")
                continue
            f = f"matched@{r.matched['step']}" if r.matched else "not matched"
            self.log(
                f"  {r.spec.key:<40} val {r.final['validation']:6.1%} nll {r.final['validation_nll']:.3f}  "
                f"test {r.final['test']:6.1%}  retention {r.final['retention']['em']:6.1%}  {f}  "
                f"({r.wall_s:.0f} s)"
            )
        return out


def mean_svd(runs: Sequence[RunResult]) -> list[tuple[int, float, float]]:
    """The per-step mean of several runs' (step, ΔΣ, ΔD) curves."""
    curves = [r.svd for r in runs if r.svd]
    if not curves:
        return []
    return [
        (
            curves[0][j][0],
            statistics.fmean(c[j][1] for c in curves),
            statistics.fmean(c[j][2] for c in curves),
        )
        for j in range(min(len(c) for c in curves))
    ]
