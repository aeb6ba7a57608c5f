"""The study's experiments as lists of runs: learning-rate ladders extended until the choice is
interior, the reported seeds at the chosen rates, and adapter fusion between adapters that learned."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minift.io.peft import load_peft_adapter
from minift.methods.lora import low_rank_slots
from minift.methods.s2ft import load_adapter
from minift.model import Model
from minift.serving import LoraFactors, fuse_adapters, merge_adapter
from minift.tools.study import world
from minift.tools.study.config import ARM, ARMS, LADDER_ARMS, StudyConfig
from minift.tools.study.runs import RunResult, RunSpec, measure, task_splits

# ----------------------------------------------------------------------------------------------------
# learning-rate ladders


def ladder_rate(config: StudyConfig, arm: str, k: int) -> float:
    """Rung ``k`` of the arm's ladder: center · ladderᵏ, to 6 significant digits."""
    return float(f"{config.lr_centers[arm] * config.ladder**k:.6g}")


def criterion(r: RunResult) -> float:
    """What the choice minimises: the validation answer NLL at the last step (∞ if diverged).

    Validation exact match saturates (every rate that learns scores 100%), NLL does not; the S2FT
    scripts likewise keep the checkpoint of lowest validation loss."""
    return float("inf") if r.diverged else float(r.final["validation_nll"])


def choose(runs: Sequence[RunResult]) -> RunResult:
    """The run of lowest ``criterion``; on a tie the lower rate (the smaller change to the base)."""
    return min(runs, key=lambda r: (criterion(r), r.spec.lr))


def ladder_step(config: StudyConfig, arm: str, rungs: dict[int, RunResult]) -> int | None:
    """The next rung to run, or None when the choice is interior (or the ladder is spent).

    A choice at the lowest rung extends the ladder down, at the highest up; a ladder whose every run
    diverged goes down. A diverged run above the choice counts as evidence that higher rates are
    worse, so the choice is then interior."""
    lo, hi = min(rungs), max(rungs)
    if len(rungs) - 3 >= config.max_extend:
        return None
    if all(r.diverged for r in rungs.values()):
        return lo - 1
    best = next(k for k, r in rungs.items() if r is choose(list(rungs.values())))
    if best == lo:
        return lo - 1
    if best == hi:
        return hi + 1
    return None


def sweep(
    config: StudyConfig, run: Callable[[list[RunSpec]], list[RunResult]], log: Callable[[str], None]
) -> dict[str, dict[int, RunResult]]:
    """Seed 0 along every ladder: the first three rungs of all arms, then one more rung at a time for
    each arm whose choice is at an edge, all arms' extensions in one batch (so the runs, and the result,
    do not depend on how many workers run them)."""
    rungs: dict[str, dict[int, RunResult]] = {a: {} for a in LADDER_ARMS}
    pending = [(a, k) for a in LADDER_ARMS for k in (-1, 0, 1)]
    while pending:
        for (a, k), r in zip(
            pending, run([RunSpec(a, ladder_rate(config, a, k), 0) for a, k in pending]), strict=True
        ):
            rungs[a][k] = r
        pending = [(a, k) for a in LADDER_ARMS if (k := ladder_step(config, a, rungs[a])) is not None]
        if pending:
            log("extending: " + ", ".join(f"{a} → {ladder_rate(config, a, k):g}" for a, k in pending))
    return rungs


def lr_choice(rungs: dict[str, dict[int, RunResult]]) -> dict[str, dict[str, Any]]:
    """Per ladder arm: the grid, the chosen rate, whether it is at the grid's edge, the criterion."""
    out = {}
    for arm, by_k in rungs.items():
        ordered = [by_k[k] for k in sorted(by_k)]
        best = choose(ordered)
        out[arm] = {
            "grid": [r.spec.lr for r in ordered],
            "chosen": best.spec.lr,
            "at_grid_edge": best is ordered[0] or best is ordered[-1],
            "validation_nll": [None if r.diverged else r.final["validation_nll"] for r in ordered],
            "validation": [None if r.diverged else r.final["validation"] for r in ordered],
        }
    return out


def chosen_rates(choice: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every arm's rate: its ladder's choice, or the choice of the arm it takes its rate from."""
    return {a.name: choice[a.lr_from or a.name]["chosen"] for a in ARMS}


def report_specs(config: StudyConfig, lr: dict[str, float]) -> list[RunSpec]:
    """Every arm at its rate, seeds 1 … n (never the sweep's seed 0)."""
    return [RunSpec(a.name, lr[a.name], s) for a in ARMS for s in config.report_seeds(a)]


# ----------------------------------------------------------------------------------------------------
# fusion

PAIRINGS = {
    "lora": (("lora", "lora-2"),),
    "s2ft-overlapping": (("s2ft-wl", "s2ft-wl-2"), ("s2ft-ws", "s2ft-ws-2")),
    "s2ft-disjoint": (("s2ft-wl", "s2ft-ws-2"), ("s2ft-ws", "s2ft-wl-2")),
}


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
    """Per seed and pairing: whether both adapters learned their task (final validation exact match
    ≥ ``match_level``); for those that did, each alone on its own task, the fused model on both, and
    the fused model's retention. Fusing an adapter that never learned its task would measure nothing
    about fusion."""
    t1, t2 = config.task, config.second_task
    by = {(r.spec.arm, r.spec.seed): r for r in final}
    out = []
    for seed in config.report_seeds(ARM["lora"]):
        for kind, pairs in PAIRINGS.items():
            for n1, n2 in pairs:
                singles = [by[(n1, seed)], by[(n2, seed)]]
                learned = all(not r.diverged and r.final["validation"] >= config.match_level for r in singles)
                row: dict[str, Any] = {
                    "kind": kind,
                    "seed": seed,
                    "adapters": [n1, n2],
                    "validation": [None if r.diverged else r.final["validation"] for r in singles],
                    "learned": learned,
                }
                if learned:
                    folders = [adapter_dir / r.spec.key for r in singles]
                    if kind == "lora":
                        adapters: list[Any] = [_lora_adapter(base, f) for f in folders]
                        row["overlap"] = None
                    else:
                        adapters = [load_adapter(f) for f in folders]
                        row["overlap"] = _overlap(*adapters)
                    fused = _fused(base, adapters, config.fusion_weights)
                    s1, s2 = task_splits(config, t1), task_splits(config, t2)
                    row["single"] = {t1: singles[0].final["test"], t2: singles[1].final["test"]}
                    row["fused"] = {t1: world.accuracy(fused, s1.test), t2: world.accuracy(fused, s2.test)}
                    row["drop"] = statistics.fmean(row["fused"][t] - row["single"][t] for t in (t1, t2))
                    row["retention"] = world.retention(fused, s1.retention)["em"]
                out.append(row)
    return out


def base_metrics(base: Model, config: StudyConfig) -> dict[str, Any]:
    """The base model before fine-tuning, on the same splits."""
    return {task: measure(base, task_splits(config, task)) for task in (config.task, config.second_task)}
