"""``minift bench``: the --quick smoke run and the JSON report's schema (FLOPs and memory are
``minift.tools.measure``'s, specified in tests/test_measure.py).

No timing is asserted anywhere: timings depend on the machine and its load.
"""

from __future__ import annotations

import copy
import json

import pytest

from minift.backend import gpu_available
from minift.methods.registry import method_names
from minift.tools.bench import CHECKPOINTED, QUICK, ratios
from minift.tools.cli import main

RESULT_KEYS = {"impl", "method", "step_seconds", "peak_bytes", "trainable_params", "tokens_per_second", "mfu"}
RATIO_KEYS = {
    "s2ft/full_time",
    "s2ft/full_memory",
    "s2ft/lora_time",
    "s2ft/lora_memory",
    "minift/torch_full_time",
    "minift/torch_lora_time",
    "s2ft_ckpt/full_memory",
    "s2ft_ckpt/s2ft_time",
}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--quick", "--steps", "1", "--warmup", "0", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_quick_bench_writes_machine_config_results_and_ratios(quick_report):
    assert quick_report["machine"]["cores"] >= 1
    assert quick_report["machine"]["blas_gflops"] > 0
    assert quick_report["blas_gflops_in_run"] > 0
    assert (quick_report["config"]["batch"], quick_report["config"]["seq"]) == (QUICK.batch, QUICK.seq)
    assert set(quick_report["ratios"]) >= RATIO_KEYS
    for record in quick_report["results"]:
        assert set(record) >= RESULT_KEYS
        assert min(record["step_seconds"], record["trainable_params"]) > 0
        assert (record["mfu"] is None and record["impl"] == "torch") or record["mfu"] > 0
        assert record["tokens_per_second"] == pytest.approx(QUICK.batch * QUICK.seq / record["step_seconds"])


def test_every_registered_method_is_measured(quick_report):
    measured = {r["method"] for r in quick_report["results"] if r["impl"] == "minift"}
    assert measured == set(method_names()) | {m + "_ckpt" for m in CHECKPOINTED}
    for record in quick_report["results"]:
        if record["impl"] == "minift":
            assert record["peak_bytes"] > 0


def test_every_minift_row_has_a_memory_breakdown_that_adds_up_to_its_peak(quick_report):
    by = {r["method"]: r for r in quick_report["results"] if r["impl"] == "minift"}
    assert set(quick_report["memory_breakdown"]) == set(by)
    for method, parts in quick_report["memory_breakdown"].items():
        assert parts["total"] == by[method]["peak_bytes"]
        assert parts["total"] == parts["weights"] + parts["optimizer"] + parts["step_peak"]
        assert parts["activations_total"] == sum(parts["activations"].values())
        # a checkpointed step keeps block inputs instead of the blocks' attention/MLP/norm caches, and
        # S2FT (on O and Down: gate and up frozen) rebuilds its MLP's g and u instead of keeping them
        assert ("checkpoints" in parts["activations"]) == method.endswith("_ckpt")
        assert ("mlp" in parts["activations"]) == (not method.endswith("_ckpt") and method != "s2ft")


def test_a_ratio_is_the_quotient_of_its_two_records_or_none_when_one_is_missing(quick_report):
    by = {(r["impl"], r["method"]): r for r in quick_report["results"]}
    got = quick_report["ratios"]["s2ft/full_time"]
    if ("minift", "s2ft") in by:
        assert got == pytest.approx(
            by["minift", "s2ft"]["step_seconds"] / by["minift", "full"]["step_seconds"]
        )
    else:
        assert got is None
    assert ratios([])["minift/torch_full_time"] is None


def test_serving_times_an_adapter_switch_and_a_batched_forward_of_s2ft_against_lora(quick_report):
    serving = quick_report["serving"]
    assert set(serving["seconds"]) == {"switch/s2ft", "switch/lora", "serve/base", "serve/s2ft", "serve/lora"}
    assert min(serving["seconds"].values()) > 0
    assert serving["ratios"]["s2ft/lora_switch_time"] == pytest.approx(
        serving["seconds"]["switch/s2ft"] / serving["seconds"]["switch/lora"]
    )
    assert set(serving["assignment"]) == {0, 1}  # the batch mixes both adapters


def test_the_served_adapters_change_the_model_and_s2ft_touches_only_its_blocks():
    from minift.serving import merge_adapter
    from minift.tools.bench import serving_adapters

    base, s2ft, lora = serving_adapters(QUICK, seed=0)
    n_weights = sum(int(s.weight.size) for b in base.blocks for _, s in b.slots())
    for adapter, most_changed in ((s2ft[0], 0.2), (lora[0], 1.0)):
        merged = copy.deepcopy(base)
        merge_adapter(merged, adapter)
        changed = sum(
            int((s1.weight != s0.weight).sum())
            for b0, b1 in zip(base.blocks, merged.blocks, strict=True)
            for (_, s0), (_, s1) in zip(b0.slots(), b1.slots(), strict=True)
        )
        assert 0 < changed <= most_changed * n_weights


def test_an_unknown_method_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--quick", "--methods", "dora"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "dora" in err
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# --device: the GPU harness, run here through its CPU path


def test_the_device_bench_times_minift_and_torch_side_by_side_on_one_device():
    from minift.tools.bench_device import run_device

    report = run_device("cpu", {"quick": QUICK}, methods=("full", "lora", "s2ft"), steps=1, warmup=0,
                        log=lambda _: None)
    entry = report["sizes"]["quick"]
    assert entry["gemm_tflops_in_run"] > 0
    got = {(r["impl"], r["method"]) for r in entry["results"]}
    assert {("minift", "full"), ("minift", "lora"), ("minift", "s2ft")} <= got
    by_key = {(r["impl"], r["method"]): r for r in entry["results"]}
    assert entry["ratios"]["s2ft/full_time"] == pytest.approx(
        by_key["minift", "s2ft"]["step_seconds"] / by_key["minift", "full"]["step_seconds"]
    )
    if ("torch", "full") in got:  # the crosscheck extra is installed
        assert entry["ratios"]["minift/torch_full_time"] > 0
    assert entry["ratios"]["minift/torch_full_memory"] is None  # allocator peaks exist on a GPU only


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU")
def test_bench_on_cuda_without_a_gpu_is_a_one_line_error(capsys):
    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "needs CuPy and a CUDA GPU" in err
