"""From runs to findings: per-arm summaries (at the last step and at matched accuracy), the
accuracy–retention Pareto front, the claims (paired by seed, Holm-corrected, ``stats``) and controls,
and the report: Markdown tables and PNG plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minift.tools.study import stats
from minift.tools.study.config import ARM, ARMS, StudyConfig
from minift.tools.study.runs import RunResult, mean_svd


def smoothed(losses: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (fewer at the start)."""
    return [statistics.fmean(losses[max(0, t - window + 1) : t + 1]) for t in range(len(losses))]


def steps_to(losses: Sequence[float], target: float, window: int) -> int | None:
    """The first optimizer step (1-based) at which the smoothed loss is ≤ ``target``; None if never."""
    return next((t + 1 for t, v in enumerate(smoothed(losses, window)) if v <= target), None)


# ----------------------------------------------------------------------------------------------------
# what is measured on one run


SORSA_ARMS = ("lora-all", "pissa", "sorsa", "sorsa-g0")


def value(run: RunResult, metric: str, extra: dict[str, Any]) -> float | None:
    """One run's measure by name (None when the run has none: diverged, never matched, no split).

    "test", "near_ood", "far_ood", "retention", "retention_nll", "wrong_format" at the last step;
    the same with "@matched" at the matched checkpoint; "steps" (to ``extra["target"]``), "delta_d",
    "delta_sigma" (at the last step)."""
    if run.diverged:
        return None
    name, _, where = metric.partition("@")
    point = run.final if not where else run.matched
    if point is None:
        return None
    if name == "steps":
        return steps_to(run.losses, extra["target"], extra["smooth"])
    if name in ("delta_d", "delta_sigma"):
        return run.svd[-1][2 if name == "delta_d" else 1] if run.svd else None
    if name.startswith(("retention", "wrong_format")):
        key = {"retention": "em", "retention_nll": "nll", "wrong_format": "wrong_format"}[name]
        return point["retention"][key]
    return point[name]


def target_loss(final: Sequence[RunResult], config: StudyConfig) -> float:
    """The convergence target: the highest last smoothed training loss of the SORSA comparison's runs,
    so that every one of them reaches it."""
    ends = [smoothed(r.losses, config.smooth)[-1] for r in final if r.spec.arm in SORSA_ARMS and r.losses]
    return max(ends) if ends else math.nan


# ----------------------------------------------------------------------------------------------------
# claims and controls


@dataclass(frozen=True)
class Comparison:
    """a vs b on one measure, paired by seed and oriented so that the claim predicts a positive value.

    ``how``: "diff" (a − b, higher is better), "less" (b − a, lower is better), "log_less" (ln(b/a),
    lower is better, for positive quantities compared by ratio: steps, ΔΣ, ΔD)."""

    claim: str
    a: str
    b: str
    metric: str
    how: str
    effect: float  # the paper's effect in the same units
    source: str  # where the paper's effect comes from
    units: str


MATCH = "at matched validation accuracy"
CLAIMS = (
    Comparison(
        "S2FT's in-domain accuracy is at least LoRA's",
        "s2ft",
        "lora",
        "test",
        "diff",
        0.013,
        "S2FT paper, Table 2 and abstract: +1.3 points over LoRA on arithmetic (7-task average)",
        "exact match, S2FT − LoRA",
    ),
    Comparison(
        f"S2FT generalises better near-OOD (unseen lengths) than LoRA, {MATCH}",
        "s2ft",
        "lora",
        "near_ood@matched",
        "diff",
        0.013,
        "S2FT paper, Table 2: +1.3 points over LoRA, average including 4 OOD arithmetic sets",
        "exact match, S2FT − LoRA",
    ),
    Comparison(
        f"S2FT generalises better far-OOD (unseen surface form) than LoRA, {MATCH}",
        "s2ft",
        "lora",
        "far_ood@matched",
        "diff",
        0.08,
        "S2FT paper, Table 3: MT-Bench +0.86 / +0.75 over LoRA on a 10-point scale (≈ 8 points)",
        "exact match, S2FT − LoRA",
    ),
    Comparison(
        f"S2FT generalises better far-OOD (unseen surface form) than full FT, {MATCH}",
        "s2ft",
        "full",
        "far_ood@matched",
        "diff",
        0.054,
        "S2FT paper, Table 3 and abstract: MT-Bench +0.63 / +0.45 over full FT (≈ 5 points; '11.5%')",
        "exact match, S2FT − full FT",
    ),
    Comparison(
        f"S2FT forgets less than LoRA (retention exact match), {MATCH}",
        "s2ft",
        "lora",
        "retention@matched",
        "diff",
        0.23,
        "S2FT paper, Fig. 2 (ratio 1e-3): far-OOD accuracy ≈ 47.5 sparse FT vs ≈ 24.5 LoRA",
        "exact match, S2FT − LoRA",
    ),
    Comparison(
        f"S2FT forgets less than full FT (retention exact match), {MATCH}",
        "s2ft",
        "full",
        "retention@matched",
        "diff",
        0.085,
        "S2FT paper, Fig. 2: far-OOD accuracy ≈ 47.5 sparse FT vs ≈ 39 full FT",
        "exact match, S2FT − full FT",
    ),
    Comparison(
        "S2FT selection: activation-small beats random (in-domain)",
        "s2ft-a-small",
        "s2ft",
        "test",
        "diff",
        0.005,
        "S2FT paper, Table 4 (LLaMA3-8B): +0.7 commonsense, +0.4 arithmetic",
        "exact match, A-small − random",
    ),
    Comparison(
        "S2FT selection: activation-small beats gradient-large (in-domain)",
        "s2ft-a-small",
        "s2ft-g-large",
        "test",
        "diff",
        0.02,
        "S2FT paper, Table 4 (LLaMA3-8B): +1.9 commonsense, +2.2 arithmetic",
        "exact match, A-small − G-large",
    ),
    Comparison(
        "S2FT fusion: disjoint channels lose less than overlapping ones",
        "s2ft-disjoint",
        "s2ft-overlapping",
        "drop",
        "diff",
        0.025,
        "S2FT paper, Table 5: fused drop −2.6/−4.3 (disjoint) vs −4.6/−7.4 (overlapping)",
        "fused − alone, mean of both tasks, disjoint − overlapping",
    ),
    Comparison(
        "S2FT fusion (disjoint) loses less than LoRA fusion",
        "s2ft-disjoint",
        "lora",
        "drop",
        "diff",
        0.01,
        "S2FT paper, Table 5: fused drop −2.6/−4.3 (S2FT disjoint) vs −3.3/−5.6 (LoRA)",
        "fused − alone, mean of both tasks, S2FT − LoRA",
    ),
    Comparison(
        "SORSA converges faster than PiSSA (steps to the target loss)",
        "sorsa",
        "pissa",
        "steps",
        "log_less",
        0.1,
        "SORSA paper, abstract and loss curves (no number: 10% fewer steps taken "
        "as the smallest effect of interest)",
        "ln(steps PiSSA / steps SORSA)",
    ),
    Comparison(
        "SORSA converges faster than LoRA (steps to the target loss)",
        "sorsa",
        "lora-all",
        "steps",
        "log_less",
        0.1,
        "SORSA paper, abstract and loss curves (no number: 10% fewer steps taken "
        "as the smallest effect of interest)",
        "ln(steps LoRA / steps SORSA)",
    ),
    Comparison(
        "SORSA's in-domain accuracy beats PiSSA's",
        "sorsa",
        "pissa",
        "test",
        "diff",
        0.03,
        "SORSA paper, abstract: GSM-8K 56.03 vs 53.07",
        "exact match, SORSA − PiSSA",
    ),
    Comparison(
        "SORSA's in-domain accuracy beats LoRA's",
        "sorsa",
        "lora-all",
        "test",
        "diff",
        0.137,
        "SORSA paper, abstract: GSM-8K 56.03 vs 42.30",
        "exact match, SORSA − LoRA",
    ),
    Comparison(
        "SORSA moves the singular vectors less than LoRA (ΔD)",
        "sorsa",
        "lora-all",
        "delta_d",
        "log_less",
        3.0,
        "SORSA paper, SVD analysis (Sec. 4): ΔD ≈ 0.025 vs ≈ 0.5",
        "ln(ΔD LoRA / ΔD SORSA)",
    ),
    Comparison(
        "SORSA moves the singular vectors less than full FT (ΔD)",
        "sorsa",
        "full",
        "delta_d",
        "log_less",
        3.3,
        "SORSA paper, SVD analysis (Sec. 4): ΔD ≈ 0.025 vs ≈ 0.7",
        "ln(ΔD full FT / ΔD SORSA)",
    ),
    Comparison(
        "SORSA's regularizer lowers ΔD (vs γ = 0)",
        "sorsa",
        "sorsa-g0",
        "delta_d",
        "log_less",
        0.34,
        "SORSA paper, SVD analysis (Sec. 4): ΔD ≈ 0.025 vs ≈ 0.035 without the regularizer",
        "ln(ΔD γ=0 / ΔD SORSA)",
    ),
    Comparison(
        "SORSA's regularizer lowers ΔΣ (vs γ = 0)",
        "sorsa",
        "sorsa-g0",
        "delta_sigma",
        "log_less",
        0.69,
        "SORSA paper, SVD analysis (Sec. 4): ΔΣ ≈ 3e-4 vs ≈ 6e-4 without the regularizer",
        "ln(ΔΣ γ=0 / ΔΣ SORSA)",
    ),
)

# Controls: what explains the claims' outcomes; paired intervals, no paper effect, no verdict.
CONTROLS = (
    ("placement: S2FT vs LoRA on O+Down at the same budget (in-domain)", "s2ft", "lora-od", "test", "diff"),
    ("placement: LoRA on Q/K/V/Up/Down vs LoRA on O+Down (in-domain)", "lora", "lora-od", "test", "diff"),
    ("variant: S2FT Q/K/V heads vs O heads (in-domain)", "s2ft-qkv", "s2ft", "test", "diff"),
    ("variant: S2FT Up rows vs Down columns (in-domain)", "s2ft-up", "s2ft", "test", "diff"),
    ("variant: S2FT Down only vs O+Down (in-domain)", "s2ft-down", "s2ft", "test", "diff"),
    ("budget: S2FT ×4 vs ×1 (in-domain)", "s2ft-x4", "s2ft", "test", "diff"),
    ("budget: S2FT ×0.5 vs ×1 (in-domain)", "s2ft-x0.5", "s2ft", "test", "diff"),
    ("budget: S2FT ×4 vs ×1 (retention, matched)", "s2ft-x4", "s2ft", "retention@matched", "diff"),
    (
        "replay: full FT + replay vs full FT (retention, matched)",
        "full-replay",
        "full",
        "retention@matched",
        "diff",
    ),
    (
        "replay: LoRA + replay vs LoRA (retention, matched)",
        "lora-replay",
        "lora",
        "retention@matched",
        "diff",
    ),
    (
        "replay: S2FT + replay vs S2FT (retention, matched)",
        "s2ft-replay",
        "s2ft",
        "retention@matched",
        "diff",
    ),
    (
        "retention NLL: S2FT vs LoRA (matched; lower NLL is positive)",
        "s2ft",
        "lora",
        "retention_nll@matched",
        "less",
    ),
    (
        "retention NLL: S2FT vs full FT (matched; lower NLL is positive)",
        "s2ft",
        "full",
        "retention_nll@matched",
        "less",
    ),
    (
        "wrong format: S2FT vs LoRA (matched; fewer is positive)",
        "s2ft",
        "lora",
        "wrong_format@matched",
        "less",
    ),
    (
        "wrong format: S2FT vs full FT (matched; fewer is positive)",
        "s2ft",
        "full",
        "wrong_format@matched",
        "less",
    ),
)


def _orient(x: float, y: float, how: str) -> tuple[float, float]:
    """(a', b') with a' − b' the oriented difference."""
    if how == "diff":
        return x, y
    if how == "less":
        return -x, -y
    return -math.log(x), -math.log(y)  # log_less: ln(y/x) = (−ln x) − (−ln y)


def per_seed(
    final: Sequence[RunResult], fusion: Sequence[dict[str, Any]], arm: str, metric: str, extra: dict[str, Any]
) -> dict[int, float]:
    """The measure of every seed where it exists (an arm's runs, or a fusion kind's mean drop)."""
    if metric == "drop":
        rows = [f for f in fusion if f["kind"] == arm and f["learned"]]
        seeds = sorted({f["seed"] for f in rows})
        return {s: statistics.fmean(f["drop"] for f in rows if f["seed"] == s) for s in seeds}
    out = {}
    for r in final:
        if r.spec.arm == arm:
            v = value(r, metric, extra)
            if v is not None and (not metric.startswith(("steps", "delta")) or v > 0):
                out[r.spec.seed] = float(v)
    return out


def compare(
    final: Sequence[RunResult],
    fusion: Sequence[dict[str, Any]],
    a: str,
    b: str,
    metric: str,
    how: str,
    effect: float,
    extra: dict[str, Any],
) -> tuple[stats.Paired, list[int]]:
    """The paired comparison over the seeds both sides have."""
    va, vb = per_seed(final, fusion, a, metric, extra), per_seed(final, fusion, b, metric, extra)
    seeds = sorted(set(va) & set(vb))
    pairs = [_orient(va[s], vb[s], how) for s in seeds]
    return stats.paired([p[0] for p in pairs], [p[1] for p in pairs], effect), seeds


def _why_missing(c: Comparison, final: Sequence[RunResult], fusion: Sequence[dict[str, Any]]) -> str:
    if c.metric == "drop":
        learned = sum(f["learned"] for f in fusion)
        return (
            f"fewer than 2 seeds where both pairings' adapters learned their tasks ({learned} of "
            f"{len(fusion)} adapter pairs reached the validation level); fusing adapters that did not learn "
            "measures nothing about fusion"
        )
    if c.metric.startswith("far_ood") and all(
        r.final.get("far_ood") is None for r in final if not r.diverged
    ):
        return "this task world has no far-OOD split for the task"
    if c.metric.endswith("@matched"):
        return "fewer than 2 seeds where both arms reached the validation level"
    return "fewer than 2 seeds with the measure on both arms"


def claims(
    final: Sequence[RunResult], fusion: Sequence[dict[str, Any]], config: StudyConfig
) -> dict[str, Any]:
    """Every claim that could be measured (≥ 2 paired seeds), judged together (``stats.judge``), and
    those that could not, with why."""
    extra = {"target": target_loss(final, config), "smooth": config.smooth}
    measured, missing = [], []
    for c in CLAIMS:
        result, seeds = compare(final, fusion, c.a, c.b, c.metric, c.how, c.effect, extra)
        if result.n < 2:
            missing.append({"claim": c.claim, "why": _why_missing(c, final, fusion)})
        else:
            measured.append((c, result, seeds))
    judged = stats.judge([m[1] for m in measured])
    out = []
    for (c, r, seeds), (p_holm, pe_holm, v) in zip(measured, judged, strict=True):
        out.append(
            {
                "claim": c.claim,
                "paper_effect": c.effect,
                "paper_source": c.source,
                "units": c.units,
                "measured": r.mean,
                "ci95": list(r.ci95),
                "n": r.n,
                "seeds": seeds,
                "p": r.p,
                "p_holm": p_holm,
                "p_below_effect_holm": pe_holm,
                "verdict": v,
            }
        )
    return {"claims": out, "not_measured": missing}


def controls(final: Sequence[RunResult], config: StudyConfig) -> list[dict[str, Any]]:
    extra = {"target": target_loss(final, config), "smooth": config.smooth}
    out = []
    for what, a, b, metric, how in CONTROLS:
        r, seeds = compare(final, [], a, b, metric, how, 0.0, extra)
        out.append(
            {"control": what, "measured": r.mean, "ci95": list(r.ci95), "n": r.n, "seeds": seeds, "p": r.p}
        )
    return out


# ----------------------------------------------------------------------------------------------------
# per-arm tables


def _mean(values: Iterable[float | None]) -> dict[str, Any]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


FINAL_METRICS = ("test", "near_ood", "far_ood", "retention", "retention_nll", "wrong_format")


def arm_table(final: Sequence[RunResult], lr: dict[str, float], config: StudyConfig) -> dict[str, Any]:
    """Per arm, at the last step: trainable count, rate, mean ± std of every measure, divergences."""
    extra = {"target": target_loss(final, config), "smooth": config.smooth}
    out = {}
    for arm in ARMS:
        runs = [r for r in final if r.spec.arm == arm.name]
        row: dict[str, Any] = {
            "label": arm.label,
            "task": config.task_of(arm),
            "lr": lr[arm.name],
            "seeds": len(runs),
            "diverged": sum(r.diverged is not None for r in runs),
            "trainable": runs[0].trainable if runs else None,
            "setup": runs[0].setup if runs else None,
        }
        for m in (*FINAL_METRICS, "steps", "delta_d", "delta_sigma"):
            row[m] = _mean(value(r, m, extra) for r in runs)
        out[arm.name] = row
    return out


def matched_table(final: Sequence[RunResult], config: StudyConfig) -> dict[str, Any]:
    """Per arm (main task): OOD and retention at the first checkpoint whose validation exact match
    reaches the level, over the seeds that reached it."""
    out = {}
    for arm in ARMS:
        if arm.task != "main":
            continue
        runs = [r for r in final if r.spec.arm == arm.name]
        hit = [r for r in runs if r.matched]
        row: dict[str, Any] = {
            "label": arm.label,
            "level": config.match_level,
            "reached": len(hit),
            "seeds": len(runs),
        }
        row["step"] = _mean(r.matched["step"] for r in hit)  # type: ignore[index]
        row["validation"] = _mean(r.matched["validation"] for r in hit)  # type: ignore[index]
        for m in FINAL_METRICS:
            row[m] = _mean(value(r, f"{m}@matched", {}) for r in hit)
        out[arm.name] = row
    return out


def pareto(rungs: dict[str, list[RunResult]]) -> dict[str, list[dict[str, Any]]]:
    """Per ladder arm, over its learning rates (seed 0, last step): in-domain test accuracy and
    retention exact match, and whether the point is on the front (no other rate is at least as good
    on both and better on one)."""
    out = {}
    for arm, runs in rungs.items():
        pts = [(r.spec.lr, r.final["test"], r.final["retention"]["em"]) for r in runs if not r.diverged]
        out[arm] = [
            {
                "lr": lr,
                "test": a,
                "retention": b,
                "front": not any(x >= a and y >= b and (x, y) != (a, b) for _, x, y in pts),
            }
            for lr, a, b in pts
        ]
    return out


# ----------------------------------------------------------------------------------------------------
# the report


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(d: dict[str, Any]) -> str:
    if d["mean"] is None:
        return "—"
    return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}"


def _num(d: dict[str, Any], fmt: str = ".3g") -> str:
    if d["mean"] is None:
        return "—"
    return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3g}"


MEASURE_COLUMNS = ["near-OOD", "far-OOD", "retention EM", "retention NLL", "wrong format"]


def _measure_cells(r: dict[str, Any]) -> list[str]:
    """The ``MEASURE_COLUMNS`` of an arm's row, at matched accuracy or at the last step."""
    return [_pct(r["near_ood"]), _pct(r["far_ood"]), _pct(r["retention"]), _num(r["retention_nll"]),
            _pct(r["wrong_format"])]


def render_markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: setting, claims, matched accuracy, arms, controls, ladders, fusion."""
    cfg, arms, matched = report["config"], report["arms"], report["matched_accuracy"]
    lines = [
        "# minift study: the S2FT and SORSA claims in miniature",
        "",
        f"Base model: {report['base_model']}. Main task `{cfg['task']}`, second (fusion) task "
        f"`{cfg['second_task']}`; {cfg['steps']} steps of {cfg['batch_size']} examples, linear schedule, "
        f"{cfg['warmup_steps']} warm-up steps; rank {cfg['rank']}. Learning rates from ladders "
        f"(×{cfg['ladder']:g}) extended until the choice (lowest validation answer NLL, seed 0) is "
        "interior; reported seeds "
        f"1–{cfg['seeds']} (selection ablation 1–{cfg['ablation_seeds']}). Matched level: validation exact "
        f"match ≥ {100 * cfg['match_level']:.0f}%, checked every {cfg['eval_every']} steps. "
        f"Wall time {report['wall_s'] / 60:.1f} min with {report['jobs']} worker(s), {report['runs']} runs "
        f"using {report['cpu_s'] / 60:.1f} CPU-minutes.",
        "",
        "## Claims",
        "",
        "Paired by seed; 95% t-interval; Holm-corrected over all claims. *reproduced*: significantly in the "
        "claimed direction; *contradicted*: significantly opposite, or significantly smaller than the "
        "paper's effect; *inconclusive*: the interval covers both zero and the paper's effect.",
        "",
        _table(
            ["claim", "units", "paper", "measured [95% CI]", "n", "p (Holm)", "verdict"],
            [
                [
                    c["claim"],
                    c["units"],
                    _g(c["paper_effect"]),
                    f"{_g(c['measured'])} [{_g(c['ci95'][0])}, {_g(c['ci95'][1])}]",
                    str(c["n"]),
                    f"{c['p_holm']:.3g}",
                    f"**{c['verdict']}**",
                ]
                for c in report["claims"]
            ],
        ),
        "",
    ]
    if report["not_measured"]:
        lines += ["Not measured:", ""]
        lines += [f"- {m['claim']}: {m['why']}." for m in report["not_measured"]]
        lines += [""]
    lines += [
        f"## At matched in-domain accuracy (validation ≥ {100 * cfg['match_level']:.0f}%)",
        "",
        _table(
            [
                "arm",
                "reached",
                "step",
                "validation",
                *MEASURE_COLUMNS,
            ],
            [
                [
                    r["label"],
                    f"{r['reached']}/{r['seeds']}",
                    _num(r["step"], ".0f"),
                    _pct(r["validation"]),
                    *_measure_cells(r),
                ]
                for r in matched.values()
            ],
        ),
        "",
        "## Every arm at its last step",
        "",
        _table(
            [
                "arm",
                "task",
                "trains",
                "trainable",
                "lr",
                "in-domain",
                *MEASURE_COLUMNS,
                "ΔD",
                "ΔΣ",
            ],
            [
                [
                    r["label"] + (f" ({r['diverged']} diverged)" if r["diverged"] else ""),
                    r["task"],
                    r["setup"] or "—",
                    f"{r['trainable']:,}" if r["trainable"] else "—",
                    f"{r['lr']:g}",
                    _pct(r["test"]),
                    *_measure_cells(r),
                    _num(r["delta_d"]),
                    _num(r["delta_sigma"]),
                ]
                for r in arms.values()
            ],
        ),
        "",
        "Base model: "
        + "; ".join(
            f"`{t}` in-domain {100 * b['test']:.1f}, near-OOD {100 * b['near_ood']:.1f}"
            + ("" if b["far_ood"] is None else f", far-OOD {100 * b['far_ood']:.1f}")
            for t, b in report["base"].items()
        )
        + "; retention EM {:.1f}, NLL {:.3g}, wrong format {:.1f}.".format(
            100 * next(iter(report["base"].values()))["retention"]["em"],
            next(iter(report["base"].values()))["retention"]["nll"],
            100 * next(iter(report["base"].values()))["retention"]["wrong_format"],
        ),
        "",
        "## Controls (paired by seed, 95% t-interval, no correction)",
        "",
        _table(
            ["comparison", "measured [95% CI]", "n"],
            [
                [c["control"], f"{_g(c['measured'])} [{_g(c['ci95'][0])}, {_g(c['ci95'][1])}]", str(c["n"])]
                for c in report["controls"]
            ],
        ),
        "",
        "## Learning-rate ladders (seed 0; criterion: validation answer NLL at the last step)",
        "",
        _table(
            ["arm", "grid", "chosen", "at edge"],
            [
                [
                    ARM[a].label,
                    ", ".join(f"{x:g}" for x in c["grid"]),
                    f"{c['chosen']:g}",
                    "yes" if c["at_grid_edge"] else "no",
                ]
                for a, c in report["lr_choice"].items()
            ],
        ),
        "",
        "## Adapter fusion (W = W₀ + Δ₁ + Δ₂; only adapters that reached the validation level)",
        "",
        _table(
            [
                "pairing",
                "seed",
                "validation",
                "learned",
                "overlap",
                "alone",
                "fused",
                "mean change",
                "retention",
            ],
            [
                [
                    f["kind"] + " " + "+".join(f["adapters"]),
                    str(f["seed"]),
                    ", ".join("—" if v is None else f"{100 * v:.0f}" for v in f["validation"]),
                    "yes" if f["learned"] else "no",
                    "—" if f.get("overlap") is None else f"{f['overlap']:.2f}",
                    ", ".join(f"{100 * v:.0f}" for v in f["single"].values()) if f["learned"] else "—",
                    ", ".join(f"{100 * v:.0f}" for v in f["fused"].values()) if f["learned"] else "—",
                    f"{100 * f['drop']:+.1f}" if f["learned"] else "—",
                    f"{100 * f['retention']:.1f}" if f["learned"] else "—",
                ]
                for f in report["fusion"]
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """pareto.png (accuracy vs retention over learning rates), matched.png (retention at matched
    accuracy) and convergence.png; none when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cfg = report["config"]
    written = []

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in ("full", "lora", "s2ft", "lora-od", "s2ft-x4", "lora-all", "pissa", "sorsa"):
        pts = sorted(report["pareto"].get(arm, []), key=lambda p: p["lr"])
        if pts:
            ax.plot(
                [100 * p["test"] for p in pts],
                [100 * p["retention"] for p in pts],
                marker="o",
                label=ARM[arm].label,
            )
            chosen = report["lr_choice"][arm]["chosen"]
            for p in pts:
                if p["lr"] == chosen:
                    ax.plot(100 * p["test"], 100 * p["retention"], marker="*", markersize=12, color="black")
    ax.set(
        xlabel="in-domain exact match (%)",
        ylabel="retention exact match (%)",
        title="accuracy vs retention over learning rates (seed 0; ★ chosen)",
    )
    ax.legend(fontsize=7)
    written.append(_save(fig, folder / "pareto.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in report["matched_accuracy"].values() if r["retention"]["mean"] is not None]
    ax.barh(
        [r["label"] for r in rows],
        [100 * r["retention"]["mean"] for r in rows],
        xerr=[100 * r["retention"]["std"] for r in rows],
        capsize=3,
    )
    ax.set(
        xlabel="retention exact match (%)",
        title=f"retention at validation ≥ {100 * cfg['match_level']:.0f}% (mean ± std over seeds)",
    )
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    written.append(_save(fig, folder / "matched.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    final = [RunResult.from_dict(d) for d in report["final_runs"]]
    for arm in ("lora-all", "pissa", "sorsa", "sorsa-g0"):
        curves = [smoothed(r.losses, cfg["smooth"]) for r in final if r.spec.arm == arm and r.losses]
        if curves:
            ax.plot(
                range(1, len(curves[0]) + 1),
                [statistics.fmean(c) for c in zip(*curves, strict=True)],
                label=ARM[arm].label,
            )
    if report["target_loss"] is not None:
        ax.axhline(report["target_loss"], color="gray", linestyle=":", label="target")
    ax.set(
        xlabel="step",
        ylabel=f"training loss ({cfg['smooth']}-step mean)",
        yscale="log",
        title="convergence (mean over seeds)",
    )
    ax.legend()
    written.append(_save(fig, folder / "convergence.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ("full", "lora-all", "pissa", "sorsa", "sorsa-g0"):
        curve = mean_svd([r for r in final if r.spec.arm == arm])
        if curve:
            ax.plot(
                [c[1] for c in curve], [c[2] for c in curve], marker="o", markersize=3, label=ARM[arm].label
            )
    ax.set(xlabel="ΔΣ", ylabel="ΔD", title="singular value and vector deviation during training")
    ax.legend()
    written.append(_save(fig, folder / "svd_deviation.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
