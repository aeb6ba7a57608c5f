"""``minift study``: the headline claims of the S2FT and SORSA papers, measured in miniature.

On a pretrained base model and the embedded task world (``minift.data.tasks``) the study trains many
*arms* (``config.ARMS``: a method, its targets and budget, a selection strategy, replay or not) by one
protocol and tests what the papers claim:

S2FT (Yang et al. 2024): in-domain accuracy at least LoRA's (Table 2); better near-OOD and far-OOD
generalisation (Tables 2–3) and less forgetting (Fig. 2) than LoRA and full FT; "smallest activation"
as the best selection strategy (Table 4); disjoint-channel fusion losing less than overlapping or LoRA
fusion (Table 5). SORSA (Cao et al. 2024): faster convergence and higher accuracy than PiSSA and LoRA
(abstract), smaller singular-vector and singular-value deviation ΔD, ΔΣ than LoRA, full FT and SORSA
without its regularizer (Sec. 4).

Protocol.

- **Learning rates.** Every arm with a ladder of its own (every method, selection strategy and
  control; replay arms run at their method's rate, since replay changes the data and not the method,
  and the fusion adapters at S2FT's rate on their task) first runs three rates a factor ``ladder``
  apart with seed 0; the rate of lowest validation
  answer NLL at the last step is chosen, and while it is the lowest or the highest rate tried the
  ladder adds the next rate beyond it (at most ``max_extend``). ``lr_choice`` records each grid and
  whether the choice still sits at its edge. Seed 0 is never among the reported seeds.
- **Reported runs.** Seeds 1 … n at the chosen rates (n = ``seeds``; ``ablation_seeds`` for the
  selection ablation). A seed fixes the batch order, the adapter initialisation and the random
  selection, the same for every arm, so arms are compared **paired by seed**.
- **Matched accuracy.** Every ``eval_every`` steps the validation split is scored; OOD and retention
  are compared at the first checkpoint whose validation exact match reaches ``match_level``, so a
  faster or more aggressive learner is neither credited nor blamed for being further along. The
  accuracy–retention **Pareto front** over learning rates (seed 0's ladder runs) shows the trade-off
  each arm's rate choice makes.
- **Retention** three ways (``world``): exact match, teacher-forced answer NLL, wrong-format rate.
- **Statistics** (``stats``): per claim, the per-seed difference's mean, 95% t-interval and p-values
  against zero and against the paper's effect, Holm-corrected across claims; verdicts *reproduced*,
  *contradicted*, *inconclusive*. Controls (placement, variants, budget, replay) are reported with
  paired intervals and no verdict.
- **Fusion** only between adapters that reached the validation level on their own task; a claim with
  fewer than two such seeds is reported as not measured, with why.

Every run is deterministic under its seed; runs go to worker processes (``jobs``) with one BLAS
thread each, and a ladder's extensions are decided between batches, so the result does not depend on
the number of workers. Outputs: a Markdown report, JSON (``claims``, ``matched_accuracy``,
``lr_choice``, every run) and PNG plots when matplotlib is installed.
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
from minift.tools.study.config import StudyConfig
from minift.tools.study.experiments import (
    base_metrics,
    chosen_rates,
    fusion_results,
    lr_choice,
    report_specs,
    sweep,
)
from minift.tools.study.report import (
    arm_table,
    claims,
    controls,
    matched_table,
    pareto,
    render_markdown,
    target_loss,
    write_plots,
)
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

    ``jobs`` worker processes train the runs (0: this process does)."""
    t0 = time.perf_counter()
    log(f"minift study: {describe(base)}")
    with tempfile.TemporaryDirectory(prefix="minift-study-") as tmp:
        runner = Runner(base, config, Path(tmp), jobs, log)
        try:
            log("base model")
            base_eval = base_metrics(base, config)
            log("learning-rate ladders (seed 0)")
            rungs = sweep(config, runner.run, log)
            choice = lr_choice(rungs)
            lr = chosen_rates(choice)
            log("chosen: " + ", ".join(f"{a} {c['chosen']:g}" for a, c in choice.items()))
            specs = report_specs(config, lr)
            log(f"reported seeds ({len(specs)} runs)")
            final = runner.run(specs)
            log("fusion")
            fusion = fusion_results(base, config, final, runner.adapters)
        finally:
            runner.close()
    sweep_runs = [r for by_k in rungs.values() for _, r in sorted(by_k.items())]
    judged = claims(final, fusion, config)
    report = {
        "config": config.to_dict(),
        "base_model": describe(base),
        "jobs": jobs,
        "claims": judged["claims"],
        "not_measured": judged["not_measured"],
        "matched_accuracy": matched_table(final, config),
        "lr_choice": choice,
        "lr": lr,
        "arms": arm_table(final, lr, config),
        "controls": controls(final, config),
        "pareto": pareto({a: [r for _, r in sorted(by_k.items())] for a, by_k in rungs.items()}),
        "fusion": fusion,
        "base": base_eval,
        "target_loss": target_loss(final, config),
        "runs": len(final) + len(sweep_runs),
        "final_runs": [r.to_dict() for r in final],
        "sweep_runs": [r.to_dict() for r in sweep_runs],
        "wall_s": time.perf_counter() - t0,
        "cpu_s": sum(r.cpu_s for r in (*final, *sweep_runs)),  # the runs' CPU time (workers' included)
    }
    # JSON types throughout (tuples become lists), and strict JSON: a non-finite number (the unbounded
    # interval of a comparison with one seed) becomes null
    return json.loads(json.dumps(report), parse_constant=lambda _: None)


def write_report(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """results.md, results.json and the plots into ``folder`` (created if needed)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(render_markdown(report), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return [out / "results.md", out / "results.json", *write_plots(report, out)]


def load_base(source: str | None) -> Model:
    """The study's base model: the shipped study base (None; ``minift pretrain --recipe study`` remakes
    it), the tutorials' base (``"tutorial"``), a Hugging Face folder, or ``"random"``: a randomly
    initialised model of the study base's shape, for smoke tests (its numbers mean nothing)."""
    from minift.tools.pretrain import EMBEDDED, STUDY_CONFIG, STUDY_EMBEDDED

    if source == "random":
        model = init_model(STUDY_CONFIG, np.random.default_rng(0))
        model.meta["source"] = "random initialisation"
        return model
    folder = {None: STUDY_EMBEDDED, "tutorial": EMBEDDED}.get(source, source)
    if source in (None, "tutorial") and not (Path(folder) / "config.json").is_file():
        recipe = "study" if source is None else "base"
        raise ConfigError(
            f"no base model in {folder}: run `minift pretrain --recipe {recipe} --out {folder}` "
            "or pass --base PATH"
        )
    return load_pretrained(folder)
