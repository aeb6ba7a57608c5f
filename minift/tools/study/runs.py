"""One run of the study (one method, one task, one learning rate, one seed: train it and measure it),
and running many, in this process or in worker processes with one BLAS thread each."""

from __future__ import annotations

import copy
import functools
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
from minift.data.tasks import TaskSplits, evaluate, perplexity, task_splits, task_tokenizer
from minift.errors import TrainingError
from minift.io.hub import load_pretrained, save_pretrained
from minift.methods.registry import MethodSpec, apply_method
from minift.methods.svd_analysis import SVDTrajectory
from minift.model import Model
from minift.tools.finetune import trainable_count, write_adapter
from minift.tools.study.config import StudyConfig
from minift.train import TrainConfig, train

# ----------------------------------------------------------------------------------------------------
# one run


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    method: str  # full | lora | pissa | sorsa | s2ft
    task: str
    lr: float
    seed: int
    strategy: str = "random"  # S2FT selection
    variant: str = "large"  # S2FT: the large or the small end of the score
    gamma: float | None = None  # SORSA: γ, None = the study's
    svd: bool = False  # record ΔΣ/ΔD of the target projections
    keep: bool = False  # save the adapter (fusion experiment)

    @property
    def name(self) -> str:
        """e.g. "s2ft-activation-small", "sorsa-gamma0", "lora"."""
        if self.method == "s2ft":
            return "s2ft" if self.strategy == "random" else f"s2ft-{self.strategy}-{self.variant}"
        return "sorsa-gamma0" if self.method == "sorsa" and self.gamma == 0 else self.method

    @property
    def key(self) -> str:
        return f"{self.name}_{self.task}_lr{self.lr:g}_seed{self.seed}"


@dataclass
class RunResult:
    spec: RunSpec
    trainable: int  # trainable parameters
    losses: list[float]  # training loss per step
    validation: float  # exact match on the validation split
    validation_ppl: float | None  # None when the run diverged
    test: float  # in-domain exact match
    near_ood: float
    retention: dict[str, float]  # exact match on held-out pretraining prompts: "all" and per skill
    svd: list[tuple[int, float, float]]  # (step, ΔΣ, ΔD), means over the target projections
    wall_s: float
    diverged: str | None = None  # why training stopped; such a run has no losses and scores zero

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(**(d | {"spec": RunSpec(**d["spec"]), "svd": [tuple(p) for p in d["svd"]]}))


@functools.lru_cache(maxsize=4)
def _splits(task: str, n_train: int, n_eval: int, n_retention: int) -> TaskSplits:
    return task_splits(task, 0, n_train=n_train, n_eval=n_eval, n_retention=n_retention)


def splits(config: StudyConfig, task: str) -> TaskSplits:
    """The task's splits; fixed (split seed 0) whatever the run's seed."""
    return _splits(task, config.n_train, config.n_eval, config.n_retention)


def method_spec(spec: RunSpec, config: StudyConfig) -> MethodSpec:
    """The run's method at the study's budget (LoRA/PiSSA scaling 1, SORSA scale 1, as ``finetune``)."""
    gamma = config.gamma if spec.gamma is None else spec.gamma
    return MethodSpec(
        spec.method,
        rank=config.rank,
        targets=config.targets,
        strategy=spec.strategy,
        variant=spec.variant,
        gamma=gamma,
    )


def calibration(model: Model, data: BatchStream, n: int) -> list[tuple[Any, Any]]:
    """The first ``n`` training batches as (tokens, targets): S2FT's calibration set."""
    xp = get_xp(model.embed.weight)
    return [(xp.asarray(b.tokens), xp.asarray(b.targets)) for b in map(data.batch, range(n))]


def _svd_curve(traj: SVDTrajectory, paths: Sequence[str]) -> list[tuple[int, float, float]]:
    """(step, ΔΣ, ΔD) means over ``paths``, starting at (0, 0, 0)."""
    curve = [(0, 0.0, 0.0)]
    for j, step in enumerate(traj.steps):
        points = [traj.values[p][j] for p in paths]
        curve.append(
            (
                step,
                statistics.fmean(d.delta_sigma for d in points),
                statistics.fmean(d.delta_d for d in points),
            )
        )
    return curve


def execute(spec: RunSpec, base: Model, config: StudyConfig, adapter_dir: Path | None = None) -> RunResult:
    """Train a copy of ``base`` by ``spec`` and evaluate it on every split (``base`` is not changed)."""
    t0 = time.perf_counter()
    tok = task_tokenizer()
    data_splits = splits(config, spec.task)
    examples = [encode_example(tok, ex.record) for ex in data_splits.train]
    data = BatchStream(examples, config.batch_size, tok.pad_id, seed=spec.seed)
    model = copy.deepcopy(base)
    calib = calibration(model, data, config.calib_batches) if spec.method == "s2ft" else None
    hooks = apply_method(model, method_spec(spec, config), np.random.default_rng(spec.seed), calib)
    paths = [f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in config.targets]
    traj = SVDTrajectory.start(model, every=config.svd_every) if spec.svd else None
    train_config = TrainConfig(
        steps=config.steps,
        lr=spec.lr,
        schedule="linear",
        warmup_steps=config.warmup_steps,
        betas=config.betas,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec.seed,
        eval_every=config.svd_every if traj else 0,
        progress=False,
    )
    record = None if traj is None else (lambda m, step: traj.record(m, step))
    try:
        losses = train(model, data, train_config, eval_fn=record, grad_hooks=hooks).losses
    except (TrainingError, np.linalg.LinAlgError) as e:  # non-finite loss or weights (SVD of inf)
        # a learning rate too high for the method: the run scores zero and the sweep goes on
        return RunResult(
            spec,
            trainable_count(model),
            [],
            0.0,
            None,
            0.0,
            0.0,
            {"all": 0.0},
            [],
            time.perf_counter() - t0,
            diverged=str(e),
        )
    if spec.keep and adapter_dir is not None:
        write_adapter(model, adapter_dir / spec.key)
    return RunResult(
        spec=spec,
        trainable=trainable_count(model),
        losses=[float(x) for x in losses],
        validation=evaluate(model, tok, data_splits.validation)["all"],
        validation_ppl=perplexity(model, tok, [ex.record for ex in data_splits.validation]),
        test=evaluate(model, tok, data_splits.test)["all"],
        near_ood=evaluate(model, tok, data_splits.near_ood)["all"],
        retention=evaluate(model, tok, data_splits.retention),
        svd=[] if traj is None else _svd_curve(traj, paths),
        wall_s=time.perf_counter() - t0,
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
            loss = "diverged" if r.diverged else f"loss {r.losses[-1]:.3f}"
            self.log(
                f"  {r.spec.key:<44} val {r.validation:6.1%}  test {r.test:6.1%}  near-OOD "
                f"{r.near_ood:6.1%}  retention {r.retention['all']:6.1%}  {loss}  ({r.wall_s:.0f} s)"
            )
        return out


