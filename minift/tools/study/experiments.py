"""The study's experiments as lists of runs: learning-rate sweeps and the chosen rate, follow-up seeds,
the selection-strategy ablation, adapter fusion, and the base model's own scores."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minift.data.tasks import evaluate, task_tokenizer
from minift.errors import TrainingError
from minift.io.peft import load_peft_adapter
from minift.methods.lora import low_rank_slots
from minift.methods.s2ft import load_adapter
from minift.model import Model
from minift.serving import LoraFactors, fuse_adapters, merge_adapter
from minift.tools.study.config import ABLATION, METHODS, StudyConfig
from minift.tools.study.runs import RunResult, RunSpec, splits


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


