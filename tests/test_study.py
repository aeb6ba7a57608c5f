"""``minift study``: its bookkeeping (smoothing, steps to a target, verdicts, learning-rate choice, the
runs it schedules), determinism under a seed, and a ``--quick`` run end to end through the command line
(report, JSON and plots). No accuracy is asserted: a smoke run's numbers mean nothing."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest

from minift.errors import ConfigError, TrainingError
from minift.io.hub import save_pretrained
from minift.model import init_model
from minift.tools.cli import main
from minift.tools.study.config import ABLATION, METHODS, QUICK, StudyConfig
from minift.tools.study.experiments import choose_lr, follow_up_specs, sweep_specs
from minift.tools.study.report import Stat, render_markdown, smoothed, steps_to, verdict
from minift.tools.study.runs import Runner, RunResult, RunSpec, execute
from tests.toy import task_world_config


def _result(method: str, lr: float, validation: float, ppl: float) -> RunResult:
    spec = RunSpec(method, "shift", lr, 0)
    return RunResult(spec, 1, [1.0], validation, ppl, 0.0, 0.0, {"all": 0.0}, [], 0.0)


def test_the_smoothed_loss_is_the_trailing_mean_and_steps_to_finds_the_first_step_at_or_below_target():
    losses = [4.0, 2.0, 3.0, 1.0, 1.0]
    assert smoothed(losses, 2) == [4.0, 3.0, 2.5, 2.0, 1.0]
    assert steps_to(losses, 2.5, 2) == 3  # 1-based: the third step's mean is the first ≤ 2.5
    assert steps_to(losses, 0.5, 2) is None


@pytest.mark.parametrize(
    ("better", "worse", "higher", "expected"),
    [
        (Stat(0.9, 0.01, 3), Stat(0.8, 0.01, 3), True, "reproduced"),
        (Stat(0.9, 0.1, 3), Stat(0.8, 0.1, 3), True, "not reproduced: within seed variation"),
        (Stat(0.7, 0.01, 3), Stat(0.8, 0.01, 3), True, "not reproduced: the opposite holds"),
        (Stat(10.0, 1.0, 3), Stat(20.0, 1.0, 3), False, "reproduced"),  # fewer steps is better
        (Stat(1.0, 0.0, 3), Stat(1.0, 0.0, 3), True, "not reproduced: within seed variation"),
    ],
)
def test_a_claim_is_reproduced_only_when_it_holds_beyond_the_combined_seed_variation(
    better, worse, higher, expected
):
    assert verdict(better, worse, higher_is_better=higher) == expected


def test_the_learning_rate_is_chosen_by_validation_exact_match_then_by_validation_perplexity():
    runs = [_result("lora", 1e-3, 0.5, 2.0), _result("lora", 3e-3, 0.9, 3.0), _result("lora", 1e-2, 0.9, 2.5)]
    assert choose_lr(runs) == 1e-2


def test_the_sweep_and_follow_ups_cover_every_method_seed_strategy_and_the_fusion_adapters():
    config = replace(QUICK, seeds=3)
    sweep = sweep_specs(config)
    assert {(s.method, s.lr) for s in sweep} == {(m, lr) for m in METHODS for lr in config.lrs[m]}
    assert {s.seed for s in sweep} == {0}
    lr = {m: config.lrs[m][-1] for m in METHODS}
    follow = follow_up_specs(config, lr)
    assert all(s.lr == lr[s.method] for s in follow)  # variants reuse their method's learning rate
    main_runs = [s for s in follow if s.task == config.task and s.name in METHODS]
    assert sorted((s.name, s.seed) for s in main_runs) == sorted((m, k) for m in METHODS for k in (1, 2))
    ablation = {
        (s.strategy, s.variant) for s in follow if s.name.startswith("s2ft-") and s.task == config.task
    }
    assert ablation == set(ABLATION[1:])
    kept = {(s.name, s.task, s.seed) for s in follow if s.keep}
    for k in range(3):
        for task in (config.task, config.second_task):
            assert {("s2ft-weight-large", task, k), ("s2ft-weight-small", task, k)} <= kept
        assert ("lora", config.second_task, k) in kept
    assert {s.seed for s in follow if s.name == "sorsa-gamma0"} == {0, 1, 2}
    assert len({s.key for s in sweep + follow}) == len(sweep) + len(follow)  # adapter folders are distinct


def test_a_study_config_refuses_one_task_for_both_fusion_adapters():
    with pytest.raises(ConfigError, match="two different tasks"):
        StudyConfig(task="min", second_task="min")


@pytest.fixture(scope="module")
def tiny():
    config = task_world_config()
    return init_model(config, np.random.default_rng(0), std=0.1)


@pytest.mark.parametrize(
    "spec",
    [RunSpec("s2ft", "shift", 1e-2, 1, "activation", "small"), RunSpec("sorsa", "shift", 1e-2, 1, svd=True)],
)
def test_a_run_is_deterministic_under_its_seed_and_leaves_the_base_model_unchanged(tiny, spec):
    before = tiny.blocks[0].o.weight.copy()
    first, second = execute(spec, tiny, QUICK), execute(spec, tiny, QUICK)
    assert np.array_equal(tiny.blocks[0].o.weight, before)
    assert first.losses == second.losses
    assert first.svd == second.svd
    assert (first.test, first.near_ood, first.retention) == (second.test, second.near_ood, second.retention)


def test_a_quick_study_writes_the_report_json_and_plots_and_the_report_is_a_function_of_the_json(
    tiny, tmp_path, capsys
):
    out = tmp_path / "study"
    base = save_pretrained(tiny, tmp_path / "base")
    assert main(["study", "--quick", "--base", str(base), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text(encoding="utf-8")
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert md in printed
    assert render_markdown(report) == md
    for heading in (
        "## S2FT vs LoRA vs full FT",
        "## S2FT selection strategies",
        "## Adapter fusion",
        "## SORSA vs PiSSA vs LoRA",
        "## Claims",
    ):
        assert heading in md
    t = report["tables"]
    assert len(report["claims"]) == 16
    assert all(c["verdict"].startswith(("reproduced", "not reproduced")) for c in report["claims"])
    # matched budgets: S2FT within one FFN channel per layer of LoRA; SORSA adds R singular values per slot
    lora, s2ft = t["s2ft"]["lora"]["trainable"], t["s2ft"]["s2ft"]["trainable"]
    assert abs(s2ft - lora) <= tiny.config.hidden_size * tiny.config.n_layers
    n_slots = tiny.config.n_layers * len(QUICK.targets)
    assert t["sorsa"]["sorsa"]["trainable"] == t["sorsa"]["lora"]["trainable"] + QUICK.rank * n_slots
    # the fusion experiment's control: the weight score's two ends are disjoint, one end twice identical
    assert t["fusion"]["s2ft-overlapping"]["overlap"]["mean"] == 1.0
    assert t["fusion"]["s2ft-disjoint"]["overlap"]["mean"] == 0.0
    assert {r["runs"] for r in t["ablation"].values()} == {QUICK.seeds}
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("convergence.png", "svd_deviation.png", "s2ft.png"):
            assert (out / name).stat().st_size > 0


def test_a_missing_base_model_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["study", "--quick", "--base", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err
    assert "Traceback" not in err


def test_a_diverging_run_is_flagged_evaluated_and_never_chosen_as_the_learning_rate(tiny):
    diverged = execute(RunSpec("full", "shift", 1e12, 0), tiny, QUICK)
    assert diverged.diverged is not None
    assert "diverged" in diverged.diverged
    assert diverged.losses == []
    fine = _result("full", 1e-3, 0.0, 50.0)
    assert choose_lr([diverged, fine]) == 1e-3
    with pytest.raises(TrainingError, match="every learning rate"):
        choose_lr([diverged])


def test_worker_processes_give_the_same_runs_as_this_process(tiny, tmp_path):
    specs = [
        RunSpec("lora", "min", 1e-2, 1, svd=True),
        RunSpec("s2ft", "shift", 1e-2, 0, "gradient", "large"),
    ]

    def runs(jobs: int) -> list[dict]:
        runner = Runner(tiny, QUICK, tmp_path / f"jobs{jobs}", jobs, log=lambda line: None)
        try:
            return [r.to_dict() | {"wall_s": None} for r in runner.run(specs)]
        finally:
            runner.close()

    assert runs(2) == runs(0)
