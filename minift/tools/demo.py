"""``minift demo``: every method fine-tunes the embedded model on one task; one comparison table.

On the embedded base model (``minift.tools.pretrain``), one fine-tuning task of ``minift.data.tasks`` is
learned by each method — full fine-tuning, LoRA, PiSSA, SORSA and S2FT, the adapters at a matched
trainable budget (LoRA rank r on every projection; S2FT with the same parameter count) — and each
result is measured the way the S2FT and SORSA papers measure theirs:

- trainable parameters, mean training-step time, and the memory of a training step above the frozen
  weights (optimizer state + ``tracemalloc``'s traced peak of forward, backward and update);
- exact match on the in-domain test split, on the near-OOD split (unseen lengths) and on the
  retention split (held-out prompts of the pretraining skills: what fine-tuning kept or forgot).

The table, a before/after sample generation and the results JSON (plus a PNG of the loss curves when
matplotlib is installed) are written. A method whose run fails (e.g. diverges) is reported as failed.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minift.backend import single_threaded_blas_children
from minift.data.datasets import BatchStream, encode_example
from minift.data.tasks import TaskExample, TaskSplits, evaluate, generate_answers, task_splits
from minift.data.tokenizer import Tokenizer
from minift.errors import MinIFTError
from minift.methods.registry import MethodSpec, apply_method, method_names
from minift.model import Model
from minift.tools.finetune import load_model, trainable_count
from minift.tools.measure import step_memory
from minift.train import TrainConfig, train

# Per-method peak learning rates, picked once by a small sweep on the "min" task (1e-4 … 1e-2): for each
# method the smallest rate whose in-domain exact match after 300 steps is within a few points of the
# best it reached. Larger rates learn little more and forget much more of the pretraining skills.
LEARNING_RATES = {"full": 3e-4, "lora": 2e-3, "pissa": 1e-3, "sorsa": 1e-3, "s2ft": 5e-3}
DEFAULT_LR = 1e-3  # a method registered without a swept rate


@dataclass(frozen=True)
class DemoConfig:
    task: str = "min"
    rank: int = 4  # the matched budget: LoRA rank r on every projection
    steps: int = 300
    batch_size: int = 16
    n_eval: int = 100  # examples per evaluation split (test, near-OOD)
    n_retention: int = 15  # held-out prompts per pretraining skill
    seed: int = 0
    methods: tuple[str, ...] = field(default_factory=method_names)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smoke run in seconds: few steps, tiny evaluation splits."""
        return cls(**({"steps": 4, "n_eval": 4, "n_retention": 1} | overrides))


def _scores(model: Model, tok: Tokenizer, splits: TaskSplits) -> dict[str, float]:
    return {
        "in_domain": evaluate(model, tok, splits.test)["all"],
        "near_ood": evaluate(model, tok, splits.near_ood)["all"],
        "retention": evaluate(model, tok, splits.retention)["all"],
    }


def run_method(
    method: str, config: DemoConfig, splits: TaskSplits, *, progress: bool = True
) -> tuple[dict[str, Any], Model]:
    """Fine-tune a fresh copy of the embedded model with ``method``; return its row and the model."""
    model, tok = load_model("embedded")
    examples = [encode_example(tok, ex.record) for ex in splits.train]
    data = BatchStream(examples, config.batch_size, tok.pad_id, seed=config.seed)
    calib = [data.batch(i)[:2] for i in range(2)]
    hooks = apply_method(
        model, MethodSpec(method, rank=config.rank), np.random.default_rng(config.seed), calib
    )
    memory = step_memory(model, [data.batch(0)])  # lr 0 and its own optimizer: the weights do not move
    train_config = TrainConfig(
        steps=config.steps,
        lr=LEARNING_RATES.get(method, DEFAULT_LR),
        schedule="linear",
        warmup_steps=min(10, config.steps // 10),
        seed=config.seed,
        progress=progress,
    )
    result = train(model, data, train_config, grad_hooks=hooks)
    row = {
        "method": method,
        "trainable_parameters": trainable_count(model),
        "step_seconds": result.wall_s / max(1, config.steps),
        "step_memory_bytes": memory.optimizer_bytes + memory.step_peak_bytes,
        **_scores(model, tok, splits),
        "losses": result.losses,
    }
    return row, model


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per method: the numbers of the results JSON, for people."""
    names = ("trainable", "step ms", "mem MiB", "in-domain", "near-OOD", "retention")
    head = f"{'method':<8} " + " ".join(f"{n:>{w}}" for n, w in zip(names, (10, 8, 8, 9, 9, 9), strict=True))
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<8} failed: {r['error']}")
            continue
        params = "—" if r["trainable_parameters"] is None else f"{r['trainable_parameters']:,}"
        ms = "—" if r["step_seconds"] is None else f"{1000 * r['step_seconds']:.0f}"
        mem = "—" if r["step_memory_bytes"] is None else f"{r['step_memory_bytes'] / 2**20:.2f}"
        lines.append(
            f"{r['method']:<8} {params:>10} {ms:>8} {mem:>8} "
            f"{r['in_domain']:>9.0%} {r['near_ood']:>9.0%} {r['retention']:>9.0%}"
        )
    return "\n".join(lines)


def plot_losses(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """A PNG of every method's training loss; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("losses"):
            ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _method_job(job: tuple[str, DemoConfig, TaskSplits]) -> tuple[dict[str, Any], str]:
    """One method's row and its answer to the sample prompt (run in a worker process)."""
    method, config, splits = job
    try:
        row, model = run_method(method, config, splits, progress=False)
    except MinIFTError as e:  # e.g. a diverged run: reported as such, never left out silently
        return {"method": method, "error": str(e)}, ""
    _, tok = load_model("embedded")
    return row, generate_answers(model, tok, splits.test[:1])[0]


def run_methods(config: DemoConfig, splits: TaskSplits, jobs: int) -> list[tuple[dict[str, Any], str]]:
    """Every method's (row, sample answer), in ``jobs`` worker processes with one BLAS thread each:
    the matrices are small, so threads only contend, and each method gets a core to itself."""
    ctx = multiprocessing.get_context("spawn")
    work = [(method, config, splits) for method in config.methods]
    results = []
    with single_threaded_blas_children(), ProcessPoolExecutor(max(1, jobs), mp_context=ctx) as pool:
        for row, answer in pool.map(_method_job, work):
            status = (
                row.get("error")
                or f"{row['step_seconds'] * 1000:.0f} ms/step, in-domain {row['in_domain']:.0%}"
            )
            print(f"  {row['method']:<6} done: {status}", flush=True)
            results.append((row, answer))
    return results


def run_demo(config: DemoConfig, out_dir: str | Path, *, jobs: int = 2) -> dict[str, Any]:
    """Run the demo, print the table and the sample, write ``results.json`` (and ``losses.png``)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = task_splits(config.task, config.seed, n_eval=config.n_eval, n_retention=config.n_retention)
    base, tok = load_model("embedded")
    sample: TaskExample = splits.test[0]
    samples = {"base": generate_answers(base, tok, [sample])[0]}
    rows: list[dict[str, Any]] = [
        {"method": "base", "trainable_parameters": None, "step_seconds": None, "step_memory_bytes": None}
        | _scores(base, tok, splits)
    ]
    print(
        f"task {config.task!r}: {len(splits.train)} training examples, e.g. {sample.prompt!r} -> "
        f"{sample.answer!r}; {config.steps} steps of {config.batch_size}; adapters at the budget of "
        f"LoRA rank {config.rank} on every projection; {jobs} worker process(es)"
    )
    for row, answer in run_methods(config, splits, jobs):
        rows.append(row)
        if "error" not in row:
            samples[row["method"]] = answer
    print()
    print(format_table(rows))
    print("  mem MiB: optimizer state + traced peak of one training step, above the frozen weights")
    print(f"\nsample: {sample.prompt!r} (expected {sample.answer!r})")
    for name, answer in samples.items():
        print(f"  {name:<8} {answer!r}")
    report = {"config": config.__dict__ | {"methods": list(config.methods)}, "rows": rows, "samples": samples}
    report["wall_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    png = plot_losses(rows, out / "losses.png")
    print(
        f"\nwrote {out / 'results.json'}" + (f" and {png}" if png else " (install matplotlib for losses.png)")
    )
    print(f"total {report['wall_seconds']:.0f} s")
    return report
