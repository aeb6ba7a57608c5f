"""Summaries of the runs (mean ± std over seeds, steps to a target loss, the verdict on each claim) and
the report: Markdown tables, JSON and PNG plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minift.tools.study.config import ABLATION, ABLATION_LABELS, LABELS, METHODS, StudyConfig
from minift.tools.study.runs import RunResult, RunSpec


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


