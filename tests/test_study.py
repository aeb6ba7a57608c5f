"""``minift study``: its pieces on tiny settings (ladders, the runs it schedules, one run's checkpoints
and measures, claims), determinism under a seed and across worker counts, and a small study end to end
through the command line with the JSON schema the report promises. No accuracy is asserted: a tiny
model's numbers mean nothing."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from minift.errors import ConfigError
from minift.io.hub import save_pretrained
from minift.methods.s2ft import match_lora_budget
from minift.methods.s2ft.budget import lora_parameter_count, s2ft_parameter_count
from minift.model import init_model
from minift.tools.cli import main
from minift.tools.study import config as study_config
from minift.tools.study.config import ARM, ARMS, LADDER_ARMS, QUICK, S2FT_TARGETS, StudyConfig
from minift.tools.study.experiments import (
    choose,
    ladder_rate,
    ladder_step,
    lr_choice,
    report_specs,
    sweep,
)
from minift.tools.study.report import claims, pareto, render_markdown, smoothed, steps_to
from minift.tools.study.runs import Runner, RunResult, RunSpec, execute, method_spec
from minift.tools.study.stats import VERDICTS
from tests.toy import task_world_config

# a study small enough for a test: every arm, two seeds, four steps, four examples per split
TINY = replace(
    QUICK,
    seeds=2,
    ablation_seeds=2,
    steps=4,
    batch_size=4,
    warmup_steps=1,
    eval_every=2,
    n_train=16,
    n_eval=4,
    n_retention=1,
    smooth=2,
    calib_batches=1,
    max_extend=0,
    match_level=0.0,
)


def _fake(arm: str, lr: float, nll: float, diverged: bool = False, test: float = 0.5) -> RunResult:
    final = {"validation": 0.5, "validation_nll": nll, "test": test, "retention": {"em": 1 - test}}
    return RunResult(
        RunSpec(arm, lr, 0),
        1,
        "",
        [1.0],
        [(1, 0.5)],
        {} if diverged else final,
        None,
        [],
        0.0,
        0.0,
        diverged="diverged" if diverged else None,
    )


def test_the_smoothed_loss_is_the_trailing_mean_and_steps_to_finds_the_first_step_at_or_below_target():
    losses = [4.0, 2.0, 3.0, 1.0, 1.0]
    assert smoothed(losses, 2) == [4.0, 3.0, 2.5, 2.0, 1.0]
    assert steps_to(losses, 2.5, 2) == 3  # 1-based: the third step's mean is the first ≤ 2.5
    assert steps_to(losses, 0.5, 2) is None


def test_the_choice_is_the_lowest_validation_nll_never_a_diverged_run_and_the_lower_rate_on_a_tie():
    runs = [_fake("lora", 1e-3, 0.5), _fake("lora", 3e-3, 0.2), _fake("lora", 1e-2, 0.0, diverged=True)]
    assert choose(runs).spec.lr == 3e-3
    assert choose([_fake("lora", 3e-3, 0.2), _fake("lora", 1e-3, 0.2)]).spec.lr == 1e-3


@pytest.mark.parametrize(
    ("nlls", "expected"),
    [
        ({-1: 0.5, 0: 0.3, 1: 0.4}, None),  # interior: done
        ({-1: 0.2, 0: 0.3, 1: 0.4}, -2),  # best at the bottom: one rung down
        ({-1: 0.5, 0: 0.3, 1: 0.1}, 2),  # best at the top: one rung up
        ({-1: 0.5, 0: 0.3, 1: math.inf}, None),  # the rung above diverged: interior
        ({-1: math.inf, 0: math.inf, 1: math.inf}, -2),  # everything diverged: go down
    ],
)
def test_a_ladder_extends_beyond_the_edge_where_its_choice_lies(nlls, expected):
    rungs = {
        k: _fake("lora", ladder_rate(QUICK, "lora", k), v, diverged=v == math.inf) for k, v in nlls.items()
    }
    assert ladder_step(QUICK, "lora", rungs) == expected


def test_a_ladder_stops_after_max_extend_extra_rungs_and_reports_its_choice_at_the_edge():
    config = replace(QUICK, max_extend=2)
    rungs = {k: _fake("lora", ladder_rate(config, "lora", k), 1.0 + k) for k in range(-3, 2)}  # 5 rungs
    assert ladder_step(config, "lora", rungs) is None
    choice = lr_choice({"lora": rungs})["lora"]
    assert choice["chosen"] == ladder_rate(config, "lora", -3)
    assert choice["at_grid_edge"] is True
    assert choice["grid"] == sorted(choice["grid"])


def test_the_sweep_walks_every_ladder_to_an_interior_choice_on_seed_0():
    # a criterion whose optimum lies two rungs above every ladder's first grid
    def run(specs):
        out = []
        for s in specs:
            k = round(math.log(s.lr / QUICK.lr_centers[s.arm]) / math.log(QUICK.ladder))
            out.append(_fake(s.arm, s.lr, (k - 2) ** 2 + 1.0, diverged=k >= 4))
            assert s.seed == 0
        return out

    logged = []
    rungs = sweep(QUICK, run, logged.append)
    choice = lr_choice(rungs)
    assert set(choice) == set(LADDER_ARMS)
    for arm, c in choice.items():
        assert c["chosen"] == ladder_rate(QUICK, arm, 2)
        assert c["at_grid_edge"] is False
        assert len(c["grid"]) == 5  # rungs −1 … 3
    assert len(logged) == 2  # two rounds of extensions, every ladder at once


def test_reported_runs_never_reuse_the_sweep_seed_and_the_ablation_has_its_own_seed_count():
    lr = {a.name: 1e-3 for a in ARMS}
    specs = report_specs(QUICK, lr)
    assert all(s.seed >= 1 for s in specs)
    for arm in ARMS:
        seeds = sorted(s.seed for s in specs if s.arm == arm.name)
        n = QUICK.ablation_seeds if arm.ablation else QUICK.seeds
        assert seeds == list(range(1, n + 1))
    assert {a.name for a in ARMS if a.ablation} == {"s2ft", "s2ft-a-small", "s2ft-g-large"}
    assert StudyConfig().ablation_seeds >= 10
    assert len({s.key for s in specs}) == len(specs)  # adapter folders are distinct


def test_every_arm_reuses_only_a_ladder_arm_and_every_ladder_has_a_first_grid():
    for arm in ARMS:
        assert arm.lr_from is None or ARM[arm.lr_from].lr_from is None
    assert len(QUICK.first_grid("s2ft")) == 3
    with pytest.raises(ConfigError, match="ladder"):
        StudyConfig(lr_centers={"full": 1e-3})
    with pytest.raises(ConfigError, match="two different tasks"):
        StudyConfig(task="min", second_task="min")


@pytest.fixture(scope="module")
def tiny():
    return init_model(task_world_config(), np.random.default_rng(0), std=0.1)


def test_the_controls_have_the_budgets_they_claim(tiny):
    c = tiny.config
    s2ft = s2ft_parameter_count(c, match_lora_budget(c, QUICK.rank, lora_targets=S2FT_TARGETS))
    od = method_spec(ARM["lora-od"], tiny, QUICK)
    assert od.targets == ("o", "down")
    per_rank = lora_parameter_count(c, 1, ("o", "down"))
    assert abs(od.rank * per_rank - s2ft) <= per_rank / 2  # the closest rank to S2FT's count
    assert method_spec(ARM["s2ft-x4"], tiny, QUICK).rank == 4 * QUICK.rank
    assert method_spec(ARM["s2ft-down"], tiny, QUICK).head_targets == ()
    assert method_spec(ARM["sorsa"], tiny, QUICK).targets == ("q", "k", "v", "o", "gate", "up", "down")


@pytest.mark.parametrize("arm", ["s2ft-a-small", "sorsa", "lora-replay"])
def test_a_run_is_deterministic_under_its_seed_measures_every_checkpoint_and_leaves_the_base_unchanged(
    tiny, arm
):
    before = tiny.blocks[0].o.weight.copy()
    spec = RunSpec(arm, 1e-2, 1)
    first, second = execute(spec, tiny, TINY), execute(spec, tiny, TINY)
    assert np.array_equal(tiny.blocks[0].o.weight, before)
    assert first.to_dict() | {"wall_s": 0, "cpu_s": 0} == second.to_dict() | {"wall_s": 0, "cpu_s": 0}
    assert [s for s, _ in first.curve] == [2, 4]
    assert first.matched is not None
    assert first.matched["step"] == 2
    assert set(first.final["retention"]) == {"em", "nll", "wrong_format"}
    assert first.final["validation_nll"] > 0
    assert (first.svd != []) == ARM[arm].svd


def test_a_diverging_run_is_flagged_and_has_no_measures(tiny):
    r = execute(RunSpec("full", 1e12, 0), tiny, TINY)
    assert r.diverged is not None
    assert r.losses == []
    assert r.final == {}


def test_worker_processes_give_the_same_runs_as_this_process(tiny, tmp_path):
    specs = [RunSpec("lora", 1e-2, 1), RunSpec("s2ft-g-large", 1e-2, 2)]

    def runs(jobs: int) -> list[dict]:
        runner = Runner(tiny, TINY, tmp_path / f"jobs{jobs}", jobs, log=lambda line: None)
        try:
            return [r.to_dict() | {"wall_s": None, "cpu_s": None} for r in runner.run(specs)]
        finally:
            runner.close()

    assert runs(2) == runs(0)


def test_the_pareto_front_keeps_the_rates_no_other_rate_beats_on_both_axes():
    runs = [
        _fake("lora", 1e-3, 1, test=0.5),
        _fake("lora", 3e-3, 1, test=0.8),
        _fake("lora", 1e-2, 1, test=0.8),
    ]
    runs[2].final["retention"]["em"] = 0.1  # as accurate as 3e-3, forgets more: dominated
    front = {p["lr"]: p["front"] for p in pareto({"lora": runs})["lora"]}
    assert front == {1e-3: True, 3e-3: True, 1e-2: False}


def test_claims_pair_seeds_and_a_claim_without_two_paired_seeds_is_not_measured():
    def run(arm, seed, test):
        r = _fake(arm, 1e-3, 1.0, test=test)
        r.spec = RunSpec(arm, 1e-3, seed)
        return r

    final = [run("s2ft", s, 0.5 + 0.1 * s) for s in (1, 2, 3)] + [run("lora", s, 0.1 * s) for s in (1, 2)]
    judged = claims(final, [], QUICK)
    (c,) = [c for c in judged["claims"] if c["claim"] == "S2FT's in-domain accuracy is at least LoRA's"]
    assert c["n"] == 2
    assert c["seeds"] == [1, 2]
    assert c["measured"] == pytest.approx(0.5)
    assert c["verdict"] in VERDICTS
    missing = {m["claim"]: m["why"] for m in judged["not_measured"]}
    assert "fusion" in " ".join(missing)
    assert any("learned" in why for why in missing.values())


def test_a_small_study_through_the_command_line_writes_the_promised_json(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study_config, "QUICK", TINY)
    out, js = tmp_path / "study", tmp_path / "study.json"
    base = save_pretrained(tiny, tmp_path / "base")
    argv = ["study", "--quick", "--jobs", "0", "--base", str(base), "--out", str(out), "--json", str(js)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(js.read_text(encoding="utf-8"))
    md = (out / "results.md").read_text(encoding="utf-8")
    assert md in printed
    assert render_markdown(report) == md
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == report
    assert len(report["claims"]) + len(report["not_measured"]) == 18
    assert len(report["claims"]) >= 8
    for c in report["claims"]:
        assert {"claim", "paper_effect", "measured", "ci95", "verdict", "n", "p_holm"} <= set(c)
        assert len(c["ci95"]) == 2
        assert c["verdict"] in VERDICTS
        assert c["n"] >= 2
    assert set(report["matched_accuracy"]) == {a.name for a in ARMS if a.task == "main"}
    for row in report["matched_accuracy"].values():
        assert {"near_ood", "far_ood", "retention", "retention_nll", "wrong_format", "reached"} <= set(row)
    assert set(report["lr_choice"]) == set(LADDER_ARMS)
    for c in report["lr_choice"].values():
        assert {"grid", "chosen", "at_grid_edge"} <= set(c)
        assert c["chosen"] in c["grid"]
    assert all(r["spec"]["seed"] >= 1 for r in report["final_runs"])
    assert all(r["spec"]["seed"] == 0 for r in report["sweep_runs"])
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("pareto.png", "matched.png", "convergence.png", "svd_deviation.png"):
            assert (out / name).stat().st_size > 0
    # the report again from the JSON alone, without training
    assert main(["study", "--report", str(js), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "results.md").read_text(encoding="utf-8") == md
    (tmp_path / "bad.json").write_text("[1,", encoding="utf-8")
    capsys.readouterr()
    assert main(["study", "--report", str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_a_missing_base_model_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["study", "--quick", "--base", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err
    assert "Traceback" not in err
