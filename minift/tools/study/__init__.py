"""``minift study``: the headline claims of the S2FT and SORSA papers, measured in miniature.

On the embedded base model and tasks (``minift.tools.pretrain``, ``minift.data.tasks``) the study trains every
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
SORSA (Cao et al. 2024, abstract and Sec. 5)
  - **faster convergence than PiSSA and LoRA**: optimizer steps until the smoothed training loss first
    reaches a target, the highest final smoothed loss of any run in the comparison (so every run
    reaches it);
  - smaller singular-value and singular-vector deviation (ΔΣ, ΔD; ``minift.methods.svd_analysis``) of
    the adapted weights than full FT, LoRA and SORSA without its regularizer (γ = 0).

Protocol. One task, ``min``, which every method learns in the steps given (``shift``, harder, is the
second adapter of the fusion experiment), the same steps, batch size, warm-up and linear decay (the
S2FT paper's schedule), AdamW with betas (0.9, 0.95) and no weight decay, clipping at 1.0. LoRA,
PiSSA and SORSA have rank R and scaling 1 on the S2FT paper's LoRA targets (q, k, v, up, down), built
as ``minift finetune`` builds them (``minift.tools.finetune``); S2FT trains O heads and Down channels with
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

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from minift.errors import ConfigError
from minift.io.hub import load_pretrained, model_state
from minift.model import Model, init_model
from minift.tools.study.config import LABELS, METHODS, StudyConfig
from minift.tools.study.experiments import (
    base_metrics,
    choose_lr,
    follow_up_specs,
    fusion_results,
    sweep_specs,
)
from minift.tools.study.report import claims, render_markdown, summarize, write_plots
from minift.tools.study.runs import Runner


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
    from minift.tools.pretrain import BASE_CONFIG, EMBEDDED

    if source == "random":
        model = init_model(BASE_CONFIG, np.random.default_rng(0))
        model.meta["source"] = "random initialisation"
        return model
    if source is None and not (EMBEDDED / "config.json").is_file():
        raise ConfigError(f"no embedded base model in {EMBEDDED}: run `minift pretrain` or pass --base PATH")
    return load_pretrained(EMBEDDED if source is None else source)
