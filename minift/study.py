"""``minift study``: the headline claims of the S2FT and SORSA papers, measured in miniature.

On the embedded base model and tasks (``minift.pretrain``, ``minift.data.tasks``) the study trains every
method by one protocol and reports what the papers claim, next to what was measured:

S2FT (Yang et al. 2024, Sec. 5, Tables 1–2, Fig. 2, Table 4, Table 5)
  - in-domain accuracy close to full FT and LoRA; **better near-OOD generalisation and far-OOD
    retention** (less forgetting of the pretraining skills) than both;
  - the selection-strategy ablation of Table 4: random, weight, activation, weight × activation and
    gradient scores, each at the large and the small end (the paper found "smallest activation" best);
  - adapter fusion (Table 5): two S2FT adapters trained on different tasks and merged by
    W = W₀ + λ₁Δ₁ + λ₂Δ₂, on the same channels (overlapping) or on disjoint ones, against fused LoRA.
    Overlap is controlled without a new selection rule: the weight score does not depend on the task,
    so weight-large on both tasks selects the same heads and channels, and weight-large on one task
    with weight-small on the other selects disjoint ones. Both pairings of each kind are averaged, so
    the comparison does not favour one end of the score.
SORSA (Cao et al. 2024, abstract; analysis §5 of the reference notes)
  - **faster convergence than PiSSA and LoRA**: optimizer steps until the smoothed training loss first
    reaches a target, the highest final smoothed loss of any run in the comparison (so every run
    reaches it);
  - smaller singular-value and singular-vector deviation (ΔΣ, ΔD; ``minift.methods.svd_analysis``) of
    the adapted weights than full FT, LoRA and SORSA without its regularizer (γ = 0).

Protocol. One task, ``min``, which every method learns in the steps given (``shift``, harder, is the
second adapter of the fusion experiment), the same steps, batch size, warm-up and linear decay (the
S2FT paper's schedule), AdamW with betas (0.9, 0.95) and no weight decay, clipping at 1.0. LoRA,
PiSSA and SORSA have rank R and scaling 1 on the S2FT paper's LoRA targets (q, k, v, up, down), built
as ``minift finetune`` builds them (``minift.finetune``); S2FT trains O heads and Down channels with
LoRA's parameter count (``match_lora_budget``, half to heads); SORSA trains R more (its singular
values); full FT trains everything. Each method's learning rate is chosen from a small grid by
validation exact match (validation perplexity breaks ties) with seed 0; then seeds 1 … n−1 run at that
learning rate, and every table shows mean ± sample standard deviation over the n seeds. Variants (the
other selection strategies, SORSA γ = 0, the second task) reuse their method's learning rate. Data
splits are fixed; a seed changes the adapter initialisation, the random selection and the batch order.
A sweep table shows what each learning rate buys in-domain and costs in retention.

Every run is independent and deterministic under its seed, so runs go to worker processes (``jobs``),
each with one BLAS thread; rerunning with the same settings gives the same numbers. Outputs: a
Markdown report (tables and the verdict on each claim), JSON with every run, and PNG plots when
matplotlib is installed.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from minift.backend import get_xp, single_threaded_blas_children
from minift.data.datasets import BatchStream, encode_example
from minift.data.tasks import TaskSplits, evaluate, perplexity, task_splits, task_tokenizer
from minift.errors import ConfigError, TrainingError
from minift.finetune import MethodSpec, apply_method, save_adapter, trainable_count
from minift.hub import load_pretrained, model_state, save_pretrained
from minift.methods.lora import low_rank_slots
from minift.methods.peft_io import load_peft_adapter
from minift.methods.s2ft import load_adapter
from minift.methods.svd_analysis import SVDTrajectory
from minift.model import Model, init_model
from minift.serving import LoraFactors, fuse_adapters, merge_adapter
from minift.train import TrainConfig, train

METHODS = ("full", "lora", "s2ft", "pissa", "sorsa")  # the methods whose learning rate is swept
LABELS = {"full": "full FT", "lora": "LoRA", "pissa": "PiSSA", "sorsa": "SORSA", "s2ft": "S2FT"}
# Table 4 of the S2FT paper: (strategy, end) for random and the four scores at both ends
ABLATION = (
    ("random", "large"),
    *((s, v) for s in ("weight", "activation", "product", "gradient") for v in ("large", "small")),
)
ABLATION_LABELS = {"random": "R", "weight": "W", "activation": "A", "product": "S", "gradient": "G"}


@dataclass(frozen=True)
class StudyConfig:
    """Everything that determines the study's numbers (besides the base model)."""

    task: str = "min"  # the fine-tuning task of every comparison
    second_task: str = "shift"  # the other adapter of the fusion experiment
    seeds: int = 5  # n ≥ 1; mean ± std over seeds 0 … n−1
    steps: int = 300  # optimizer steps per run
    batch_size: int = 16
    warmup_steps: int = 30
    betas: tuple[float, float] = (0.9, 0.95)  # the S2FT scripts' AdamW betas
    rank: int = 4  # R of LoRA, PiSSA and SORSA; S2FT gets LoRA's parameter count
    targets: tuple[str, ...] = ("q", "k", "v", "up", "down")  # the S2FT paper's LoRA targets
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "full": (1e-4, 3e-4, 1e-3),
            "lora": (7e-4, 2e-3, 6e-3),
            "s2ft": (1e-2, 3e-2, 1e-1),
            "pissa": (3e-4, 1e-3, 3e-3),
            "sorsa": (3e-4, 1e-3, 3e-3),
        }
    )
    gamma: float = 4e-4  # SORSA's γ (the paper's Llama-2 value)
    fusion_weights: tuple[float, float] = (1.0, 1.0)  # λ₁, λ₂: W₀ + λ₁Δ₁ + λ₂Δ₂
    calib_batches: int = 2  # calibration batches of the data-driven S2FT selection strategies
    n_train: int = 2000  # examples per split (see ``task_splits``)
    n_eval: int = 100  # validation, in-domain test and near-OOD examples
    n_retention: int = 20  # held-out pretraining prompts per skill (7 skills)
    smooth: int = 10  # trailing window of the smoothed training loss
    svd_every: int = 25  # steps between ΔΣ/ΔD records

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise ConfigError("study: seeds, steps, batch_size and rank must all be ≥ 1")
        missing = [m for m in METHODS if not self.lrs.get(m)]
        if missing:
            raise ConfigError(f"study: no learning rates for {missing}")
        if self.task == self.second_task:
            raise ConfigError("study: the fusion experiment needs two different tasks")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


QUICK = StudyConfig(
    seeds=2,
    steps=4,
    batch_size=4,
    warmup_steps=1,
    rank=2,
    n_train=32,
    n_eval=4,
    n_retention=1,
    smooth=2,
    svd_every=4,
    calib_batches=1,
    lrs={m: (1e-3, 1e-2) for m in METHODS},
)


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
        save_adapter(model, adapter_dir / spec.key)
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


# ----------------------------------------------------------------------------------------------------
# the study


def choose_lr(results: Sequence[RunResult]) -> float:
    """The learning rate of the best run by validation exact match, then validation perplexity; runs
    that diverged are never chosen."""
    ok = [r for r in results if not r.diverged]
    if not ok:
        raise TrainingError(f"study: {results[0].spec.name} diverged at every learning rate of its grid")
    return min(ok, key=lambda r: (-r.validation, r.validation_ppl)).spec.lr


def _seeds(config: StudyConfig, first: int = 0) -> range:
    return range(first, config.seeds)


def sweep_specs(config: StudyConfig) -> list[RunSpec]:
    """Seed 0 at every learning rate of every method."""
    return [
        RunSpec(m, config.task, lr, 0, svd=m != "s2ft", keep=m == "lora")
        for m in METHODS
        for lr in config.lrs[m]
    ]


def follow_up_specs(config: StudyConfig, lr: dict[str, float]) -> list[RunSpec]:
    """Everything after the sweep, at each method's chosen learning rate."""
    specs = [
        RunSpec(m, config.task, lr[m], s, svd=m != "s2ft", keep=m == "lora")
        for m in METHODS
        for s in _seeds(config, 1)
    ]
    specs += [RunSpec("sorsa", config.task, lr["sorsa"], s, gamma=0.0, svd=True) for s in _seeds(config)]
    specs += [
        RunSpec("s2ft", config.task, lr["s2ft"], s, strategy, variant, keep=strategy == "weight")
        for strategy, variant in ABLATION[1:]
        for s in _seeds(config)
    ]
    specs += [
        RunSpec("s2ft", config.second_task, lr["s2ft"], s, "weight", variant, keep=True)
        for variant in ("large", "small")
        for s in _seeds(config)
    ]
    specs += [RunSpec("lora", config.second_task, lr["lora"], s, keep=True) for s in _seeds(config)]
    return specs


def base_metrics(base: Model, config: StudyConfig) -> dict[str, Any]:
    """The base model before fine-tuning, on the same splits."""
    tok = task_tokenizer()
    out: dict[str, Any] = {}
    for task in (config.task, config.second_task):
        sp = splits(config, task)
        out[task] = {
            "test": evaluate(base, tok, sp.test)["all"],
            "near_ood": evaluate(base, tok, sp.near_ood)["all"],
        }
    out["retention"] = evaluate(base, tok, splits(config, config.task).retention)
    return out


def _fused(base: Model, adapters: Sequence[Any], weights: Sequence[float]) -> Model:
    model = copy.deepcopy(base)
    if all(not isinstance(a, dict) for a in adapters):  # S2FT: one fused adapter, one scatter-add each
        merge_adapter(model, fuse_adapters(list(adapters), list(weights)))
    else:
        for adapter, lam in zip(adapters, weights, strict=True):
            merge_adapter(model, adapter, lam)
    return model


def _lora_adapter(base: Model, folder: Path) -> dict[str, LoraFactors]:
    """A LoRA adapter folder as ``serving`` factors, by slot key."""
    model = load_peft_adapter(copy.deepcopy(base), folder)
    return {path: LoraFactors(s.A, s.B, s.scaling) for path, s in low_rank_slots(model)}


def _overlap(a: Any, b: Any) -> float:
    """Mean Jaccard overlap of two S2FT adapters' index sets, over their common matrices."""
    keys = sorted(set(a.blocks) & set(b.blocks))
    scores = []
    for k in keys:
        x, y = set(a.blocks[k].indices.tolist()), set(b.blocks[k].indices.tolist())
        scores.append(len(x & y) / max(len(x | y), 1))
    return statistics.fmean(scores) if scores else 0.0


def fusion_results(
    base: Model, config: StudyConfig, final: Sequence[RunResult], adapter_dir: Path
) -> list[dict[str, Any]]:
    """Per seed and pairing: each adapter alone on its own task, the fused model on both, retention.

    ``final`` holds the runs at the chosen learning rates; the adapters are those it kept.
    """
    tok = task_tokenizer()
    t1, t2 = config.task, config.second_task
    kept = {(r.spec.name, r.spec.task, r.spec.seed): r for r in final if r.spec.keep}
    pairings = {
        "lora": [("lora", "lora")],
        "s2ft-overlapping": [("s2ft-weight-large",) * 2, ("s2ft-weight-small",) * 2],
        "s2ft-disjoint": [
            ("s2ft-weight-large", "s2ft-weight-small"),
            ("s2ft-weight-small", "s2ft-weight-large"),
        ],
    }
    out = []
    for seed in _seeds(config):
        for kind, pairs in pairings.items():
            for n1, n2 in pairs:
                singles = [kept[(n1, t1, seed)], kept[(n2, t2, seed)]]
                folders = [adapter_dir / r.spec.key for r in singles]
                if kind == "lora":
                    adapters: list[Any] = [_lora_adapter(base, f) for f in folders]
                    overlap = None
                else:
                    adapters = [load_adapter(f) for f in folders]
                    overlap = _overlap(*adapters)
                fused = _fused(base, adapters, config.fusion_weights)
                out.append(
                    {
                        "kind": kind,
                        "seed": seed,
                        "adapters": [n1, n2],
                        "overlap": overlap,
                        "single": {t1: singles[0].test, t2: singles[1].test},
                        "fused": {
                            t1: evaluate(fused, tok, splits(config, t1).test)["all"],
                            t2: evaluate(fused, tok, splits(config, t2).test)["all"],
                        },
                        "retention": evaluate(fused, tok, splits(config, t1).retention)["all"],
                    }
                )
    return out


# ----------------------------------------------------------------------------------------------------
# summaries


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for one value) of one quantity over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        v = [float(x) for x in values]
        if not v:
            return cls(math.nan, math.nan, 0)
        return cls(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))

    def pct(self) -> str:
        return f"{100 * self.mean:.1f} ± {100 * self.std:.1f}"

    def num(self, fmt: str = ".3g") -> str:
        return f"{self.mean:{fmt}} ± {self.std:{fmt}}"


def smoothed(losses: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (fewer at the start)."""
    return [statistics.fmean(losses[max(0, t - window + 1) : t + 1]) for t in range(len(losses))]


def steps_to(losses: Sequence[float], target: float, window: int) -> int | None:
    """The first optimizer step (1-based) at which the smoothed loss is ≤ ``target``; None if never."""
    return next((t + 1 for t, v in enumerate(smoothed(losses, window)) if v <= target), None)


def _group(final: Sequence[RunResult], name: str, task: str) -> list[RunResult]:
    return [r for r in final if r.spec.name == name and r.spec.task == task]


def _row(runs: Sequence[RunResult], config: StudyConfig) -> dict[str, Any]:
    """The quantities every table draws from, as JSON-ready Stats."""
    return {
        "runs": len(runs),
        "trainable": runs[0].trainable,
        "lr": runs[0].spec.lr,
        "test": asdict(Stat.of(r.test for r in runs)),
        "near_ood": asdict(Stat.of(r.near_ood for r in runs)),
        "retention": asdict(Stat.of(r.retention["all"] for r in runs)),
        "final_loss": asdict(Stat.of(smoothed(r.losses, config.smooth)[-1] for r in runs if r.losses)),
    }


def summarize(
    final: Sequence[RunResult], fusion: Sequence[dict[str, Any]], config: StudyConfig, base: dict[str, Any]
) -> dict[str, Any]:
    """The four tables' rows (JSON-ready) from the runs at the chosen learning rates."""
    task = config.task
    s2ft_rows = {m: _row(_group(final, m, task), config) for m in ("full", "lora", "s2ft")}
    ablation = {}
    for strategy, variant in ABLATION:
        name = "s2ft" if strategy == "random" else f"s2ft-{strategy}-{variant}"
        ablation[name] = _row(_group(final, name, task), config)
    sorsa_names = ("full", "lora", "pissa", "sorsa", "sorsa-gamma0")
    sorsa_runs = {m: _group(final, m, task) for m in sorsa_names}
    curves = [smoothed(r.losses, config.smooth) for runs in sorsa_runs.values() for r in runs if r.losses]
    target = max(c[-1] for c in curves)
    sorsa_rows = {}
    for m, runs in sorsa_runs.items():
        row = _row(runs, config)
        # every run reaches the target, the highest final smoothed loss, at its last step at the latest
        steps = [steps_to(r.losses, target, config.smooth) for r in runs if r.losses]
        row["steps_to_target"] = asdict(Stat.of(s for s in steps if s is not None))
        row["delta_sigma"] = asdict(Stat.of(r.svd[-1][1] for r in runs if r.svd))
        row["delta_d"] = asdict(Stat.of(r.svd[-1][2] for r in runs if r.svd))
        sorsa_rows[m] = row
    fusion_rows = {}
    for kind in ("lora", "s2ft-overlapping", "s2ft-disjoint"):
        rows = [f for f in fusion if f["kind"] == kind]
        tasks = (config.task, config.second_task)
        fusion_rows[kind] = {
            "pairs": len(rows),
            "overlap": None if kind == "lora" else asdict(Stat.of(f["overlap"] for f in rows)),
            **{f"single_{t}": asdict(Stat.of(f["single"][t] for f in rows)) for t in tasks},
            **{f"fused_{t}": asdict(Stat.of(f["fused"][t] for f in rows)) for t in tasks},
            "drop": asdict(
                Stat.of(statistics.fmean(f["fused"][t] - f["single"][t] for t in tasks) for f in rows)
            ),
            "retention": asdict(Stat.of(f["retention"] for f in rows)),
        }
    return {
        "base": base,
        "s2ft": s2ft_rows,
        "ablation": ablation,
        "sorsa": sorsa_rows,
        "target_loss": target,
        "fusion": fusion_rows,
    }


def _stat(d: dict[str, Any]) -> Stat:
    return Stat(d["mean"], d["std"], d["n"])


def verdict(better: Stat, worse: Stat, *, higher_is_better: bool = True) -> str:
    """Whether ``better`` beats ``worse`` by more than their combined seed variation √(s₁² + s₂²)."""
    diff = (better.mean - worse.mean) * (1 if higher_is_better else -1)
    noise = math.hypot(better.std, worse.std)
    if diff > noise:
        return "reproduced"
    return "not reproduced: the opposite holds" if diff < -noise else "not reproduced: within seed variation"


def claims(tables: dict[str, Any]) -> list[dict[str, str]]:
    """Each headline claim, what was measured, and the verdict (see ``verdict``)."""
    out = []
    s2, sor, fu, ab = tables["s2ft"], tables["sorsa"], tables["fusion"], tables["ablation"]

    def add(
        claim: str, a: dict[str, Any], b: dict[str, Any], fmt: Callable[[Stat], str], higher: bool = True
    ) -> None:
        sa, sb = _stat(a), _stat(b)
        out.append(
            {
                "claim": claim,
                "measured": f"{fmt(sa)} vs {fmt(sb)}",
                "verdict": verdict(sa, sb, higher_is_better=higher),
            }
        )

    def pct(s: Stat) -> str:
        return s.pct()

    s2ft_test, best_other = (
        _stat(s2["s2ft"]["test"]),
        max((_stat(s2[m]["test"]) for m in ("full", "lora")), key=lambda s: s.mean),
    )
    gap = best_other.mean - s2ft_test.mean
    close = gap <= max(0.05, math.hypot(s2ft_test.std, best_other.std))
    out.append(
        {
            "claim": "S2FT in-domain accuracy is close to full FT's and LoRA's (within 5 points "
            "or the seed variation of the better one)",
            "measured": f"S2FT {s2ft_test.pct()} vs best of full FT/LoRA {best_other.pct()}",
            "verdict": "reproduced" if close else "not reproduced: S2FT is further behind",
        }
    )
    for metric, what in (("near_ood", "near-OOD generalisation"), ("retention", "far-OOD retention")):
        for other in ("lora", "full"):
            add(f"S2FT has better {what} than {LABELS[other]}", s2["s2ft"][metric], s2[other][metric], pct)
    a_small = ab["s2ft-activation-small"]["test"]
    rest = max((r["test"] for n, r in ab.items() if n != "s2ft-activation-small"), key=lambda s: s["mean"])
    add(
        "S2FT selection: smallest activation is the best strategy (in-domain; vs the best other)",
        a_small,
        rest,
        pct,
    )
    add(
        "S2FT fusion: disjoint channels lose less than overlapping ones (mean fused − single)",
        fu["s2ft-disjoint"]["drop"],
        fu["s2ft-overlapping"]["drop"],
        pct,
    )
    add(
        "S2FT fusion (disjoint) loses less than LoRA fusion",
        fu["s2ft-disjoint"]["drop"],
        fu["lora"]["drop"],
        pct,
    )
    for other in ("pissa", "lora"):
        add(
            f"SORSA converges faster than {LABELS[other]} (steps to the target loss)",
            sor["sorsa"]["steps_to_target"],
            sor[other]["steps_to_target"],
            lambda s: s.num(".1f"),
            False,
        )
    for metric, sym in (("delta_d", "ΔD"), ("delta_sigma", "ΔΣ")):
        for other, label in (("full", "full FT"), ("lora", "LoRA"), ("sorsa-gamma0", "SORSA (γ = 0)")):
            add(
                f"SORSA has a smaller {sym} than {label}",
                sor["sorsa"][metric],
                sor[other][metric],
                lambda s: s.num(".2e"),
                False,
            )
    return out


# ----------------------------------------------------------------------------------------------------
# the report


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _p(d: dict[str, Any] | None) -> str:
    return "—" if d is None else _stat(d).pct()


def render_markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: setting, four tables, and the verdict on each claim."""
    cfg, t, base = report["config"], report["tables"], report["tables"]["base"]
    task, task2 = cfg["task"], cfg["second_task"]
    n = cfg["seeds"]
    lr = report["lr"]
    out = [
        "# minift study: the S2FT and SORSA claims in miniature",
        "",
        f"Base model: {report['base_model']}. Task `{task}` (second adapter: `{task2}`); "
        f"{cfg['steps']} steps of {cfg['batch_size']} examples, linear schedule with {cfg['warmup_steps']} "
        f"warm-up steps; rank {cfg['rank']} on {', '.join(cfg['targets'])}; mean ± std over {n} seeds. "
        "Learning rates chosen on the validation split (seed 0) from "
        + "; ".join(
            f"{LABELS[m]} {', '.join(f'{x:g}' for x in cfg['lrs'][m])} → **{lr[m]:g}**" for m in METHODS
        )
        + f". Exact match in %. Wall time {report['wall_s'] / 60:.1f} min with {report['jobs']} worker(s).",
        "",
        f"## S2FT vs LoRA vs full FT (`{task}`)",
        "",
        _table(
            ["method", "trainable", "lr", "in-domain", "near-OOD", "retention (far-OOD)", "final train loss"],
            [
                [
                    "base model",
                    "—",
                    "—",
                    f"{100 * base[task]['test']:.1f}",
                    f"{100 * base[task]['near_ood']:.1f}",
                    f"{100 * base['retention']['all']:.1f}",
                    "—",
                ]
            ]
            + [
                [
                    LABELS[m],
                    f"{r['trainable']:,}",
                    f"{r['lr']:g}",
                    _p(r["test"]),
                    _p(r["near_ood"]),
                    _p(r["retention"]),
                    _stat(r["final_loss"]).num(".3f"),
                ]
                for m, r in t["s2ft"].items()
            ],
        ),
        "",
        "## S2FT selection strategies (paper Table 4; R = random, W = weight, A = activation, "
        "S = weight × activation, G = gradient)",
        "",
        _table(
            ["strategy", "in-domain", "near-OOD", "retention"],
            [
                [_ablation_label(name), _p(r["test"]), _p(r["near_ood"]), _p(r["retention"])]
                for name, r in t["ablation"].items()
            ],
        ),
        "",
        f"## Adapter fusion (`{task}` + `{task2}`, W = W₀ + {cfg['fusion_weights'][0]:g}·Δ₁ + "
        f"{cfg['fusion_weights'][1]:g}·Δ₂; paper Table 5)",
        "",
        _table(
            [
                "adapters",
                "index overlap",
                f"{task}: alone",
                f"{task}: fused",
                f"{task2}: alone",
                f"{task2}: fused",
                "mean change",
                "retention (fused)",
            ],
            [
                [
                    _fusion_label(k),
                    "—" if r["overlap"] is None else f"{_stat(r['overlap']).mean:.2f}",
                    _p(r[f"single_{task}"]),
                    _p(r[f"fused_{task}"]),
                    _p(r[f"single_{task2}"]),
                    _p(r[f"fused_{task2}"]),
                    _p(r["drop"]),
                    _p(r["retention"]),
                ]
                for k, r in t["fusion"].items()
            ],
        ),
        "",
        f"## SORSA vs PiSSA vs LoRA: convergence and SVD deviation (`{task}`)",
        "",
        f"Target training loss {t['target_loss']:.4f} (the highest final smoothed loss of these runs; "
        f"window {cfg['smooth']} steps). ΔΣ and ΔD: mean over the {', '.join(cfg['targets'])} projections "
        "of every layer, final weights against the initial ones.",
        "",
        _table(
            ["method", "trainable", "lr", "steps to target", "final train loss", "in-domain", "ΔΣ", "ΔD"],
            [
                [
                    _sorsa_label(m),
                    f"{r['trainable']:,}",
                    f"{r['lr']:g}",
                    _stat(r["steps_to_target"]).num(".1f"),
                    _stat(r["final_loss"]).num(".3f"),
                    _p(r["test"]),
                    _stat(r["delta_sigma"]).num(".2e"),
                    _stat(r["delta_d"]).num(".2e"),
                ]
                for m, r in t["sorsa"].items()
            ],
        ),
        "",
        "## Learning-rate sweep (seed 0): what each rate buys in-domain and costs in retention",
        "",
        _table(
            ["method", "lr", "validation", "in-domain", "near-OOD", "retention"],
            [
                [
                    LABELS[r["spec"]["method"]]
                    + (" (chosen)" if r["spec"]["lr"] == lr[r["spec"]["method"]] else ""),
                    f"{r['spec']['lr']:g}",
                    f"{100 * r['validation']:.1f}",
                    f"{100 * r['test']:.1f}",
                    f"{100 * r['near_ood']:.1f}",
                    f"{100 * r['retention']['all']:.1f}",
                ]
                for r in report["sweep_runs"]
            ],
        ),
        "",
        *_diverged_note(report),
        "## Claims",
        "",
        "A claim is *reproduced* when the measured difference is in the claimed direction and larger than "
        "the combined seed standard deviation √(s₁² + s₂²).",
        "",
        _table(
            ["claim", "measured", "verdict"],
            [[c["claim"], c["measured"], c["verdict"]] for c in report["claims"]],
        ),
        "",
    ]
    return "\n".join(out)


def _diverged_note(report: dict[str, Any]) -> list[str]:
    runs = [r for r in report["final_runs"] + report["sweep_runs"] if r["diverged"]]
    if not runs:
        return []
    keys = ", ".join(sorted({RunSpec(**r["spec"]).key for r in runs}))
    return [f"Diverged (exact match counted as zero; no loss or SVD statistics): {keys}.", ""]


def _ablation_label(name: str) -> str:
    if name == "s2ft":
        return "S2FT-R"
    _, strategy, variant = name.split("-")
    return f"S2FT-{ABLATION_LABELS[strategy]} {variant}"


def _fusion_label(kind: str) -> str:
    return {
        "lora": "LoRA",
        "s2ft-overlapping": "S2FT, same channels",
        "s2ft-disjoint": "S2FT, disjoint channels",
    }[kind]


def _sorsa_label(name: str) -> str:
    return "SORSA (γ = 0)" if name == "sorsa-gamma0" else LABELS[name]


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """convergence.png, svd_deviation.png and s2ft.png; none when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cfg, t = report["config"], report["tables"]
    runs = [RunResult.from_dict(d) for d in report["final_runs"]]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in t["sorsa"]:
        curves = [smoothed(r.losses, cfg["smooth"]) for r in _group(runs, m, cfg["task"]) if r.losses]
        if not curves:
            continue
        ax.plot(
            range(1, len(curves[0]) + 1),
            [statistics.fmean(c) for c in zip(*curves, strict=True)],
            label=_sorsa_label(m),
        )
    ax.axhline(t["target_loss"], color="gray", linestyle=":", label="target")
    ax.set(
        xlabel="step",
        ylabel=f"training loss ({cfg['smooth']}-step mean)",
        yscale="log",
        title=f"convergence on {cfg['task']} (mean of {cfg['seeds']} seeds)",
    )
    ax.legend()
    written.append(_save(fig, folder / "convergence.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in t["sorsa"]:
        curves = [r.svd for r in _group(runs, m, cfg["task"]) if r.svd]
        if not curves:
            continue
        ax.plot(
            [statistics.fmean(c[j][1] for c in curves) for j in range(len(curves[0]))],
            [statistics.fmean(c[j][2] for c in curves) for j in range(len(curves[0]))],
            marker="o",
            markersize=3,
            label=_sorsa_label(m),
        )
    ax.set(
        xlabel="ΔΣ",
        ylabel="ΔD",
        title="singular value and vector deviation during training",
    )
    ax.legend()
    written.append(_save(fig, folder / "svd_deviation.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    metrics = (("test", "in-domain"), ("near_ood", "near-OOD"), ("retention", "retention"))
    rows = t["s2ft"]
    width = 0.8 / len(rows)
    for i, (m, r) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(
            xs,
            [100 * r[k]["mean"] for k, _ in metrics],
            width,
            yerr=[100 * r[k]["std"] for k, _ in metrics],
            label=LABELS[m],
            capsize=3,
        )
    base = t["base"]
    for j, v in enumerate(
        (base[cfg["task"]]["test"], base[cfg["task"]]["near_ood"], base["retention"]["all"])
    ):
        ax.hlines(
            100 * v,
            j - width / 2,
            j + 0.8 - width / 2,
            colors="black",
            linestyles=":",
            label="base model" if j == 0 else None,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [label for _, label in metrics])
    ax.set(ylabel="exact match (%)", ylim=(0, 120), title=f"S2FT vs LoRA vs full FT on {cfg['task']}")
    ax.legend(loc="upper center", ncol=4, fontsize=8)
    written.append(_save(fig, folder / "s2ft.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# entry points


def describe(model: Model) -> str:
    c = model.config
    n = sum(int(a.size) for a in model_state(model).values())
    source = model.meta.get("source") or "in memory"
    return (
        f"{c.arch}, C={c.hidden_size}, L={c.n_layers}, H={c.n_heads}, K={c.n_kv_heads}, "
        f"F={c.intermediate_size}, V={c.vocab_size}, {n:,} parameters ({source})"
    )


def run_study(
    config: StudyConfig, base: Model, *, jobs: int = 1, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the whole study on ``base`` and return the JSON-ready report (``render_markdown`` shows it).

    ``jobs`` worker processes train the runs (0: this process does).
    """
    t0 = time.perf_counter()
    log(f"minift study: {describe(base)}")
    with tempfile.TemporaryDirectory(prefix="minift-study-") as tmp:
        runner = Runner(base, config, Path(tmp), jobs, log)
        try:
            log("base model")
            base_eval = base_metrics(base, config)
            log(f"learning-rate sweep ({sum(len(config.lrs[m]) for m in METHODS)} runs, seed 0)")
            sweep = runner.run(sweep_specs(config))
            lr = {m: choose_lr([r for r in sweep if r.spec.method == m]) for m in METHODS}
            log("chosen: " + ", ".join(f"{LABELS[m]} {lr[m]:g}" for m in METHODS))
            follow = follow_up_specs(config, lr)
            log(f"seeds, variants and the second task ({len(follow)} runs)")
            final = [r for r in sweep if r.spec.lr == lr[r.spec.method]] + runner.run(follow)
            log("fusion")
            fusion = fusion_results(base, config, final, runner.adapters)
        finally:
            runner.close()
    tables = summarize(final, fusion, config, base_eval)
    report = {
        "config": config.to_dict(),
        "base_model": describe(base),
        "jobs": jobs,
        "lr": lr,
        "tables": tables,
        "claims": claims(tables),
        "fusion_pairs": fusion,
        "final_runs": [r.to_dict() for r in final],
        "sweep_runs": [r.to_dict() for r in sweep],
        "wall_s": time.perf_counter() - t0,
    }
    return json.loads(json.dumps(report))  # JSON types throughout (tuples become lists)


def write_report(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """results.md, results.json and the plots into ``folder`` (created if needed)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(render_markdown(report), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return [out / "results.md", out / "results.json", *write_plots(report, out)]


def load_base(source: str | None) -> Model:
    """The study's base model: the embedded one (None), a Hugging Face folder, or ``"random"``: a
    randomly initialised model of the embedded base's shape, for smoke tests (its numbers mean nothing)."""
    from minift.pretrain import BASE_CONFIG, EMBEDDED

    if source == "random":
        model = init_model(BASE_CONFIG, np.random.default_rng(0))
        model.meta["source"] = "random initialisation"
        return model
    if source is None and not (EMBEDDED / "config.json").is_file():
        raise ConfigError(f"no embedded base model in {EMBEDDED}: run `minift pretrain` or pass --base PATH")
    return load_pretrained(EMBEDDED if source is None else source)


def cmd_study(args: Any) -> int:
    """``minift study``: run, print the Markdown report, and write it (``--out``, ``--json``)."""
    config = QUICK if args.quick else StudyConfig()
    overrides = {k: getattr(args, k) for k in ("seeds", "steps") if getattr(args, k) is not None}
    config = replace(config, **overrides)
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else min(2, os.cpu_count() or 1))
    if jobs < 0:
        raise ConfigError(f"study --jobs must be ≥ 0 (0: no worker processes), got {jobs}")
    report = run_study(config, load_base(args.base), jobs=jobs)
    print(render_markdown(report))
    if args.out:
        for path in write_report(report, args.out):
            print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
