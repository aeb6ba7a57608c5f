"""The ``minift`` command line. Each subcommand's --help says what it does and how to use it."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from minift.data.tokenizer import UnknownTokenWarning
from minift.errors import ConfigError, MinIFTError
from minift.methods.registry import REGISTRY, method_names

if TYPE_CHECKING:
    from minift.data.tokenizer import Tokenizer
    from minift.methods.registry import MethodSpec
    from minift.model import Model


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the array backend and the measured BLAS throughput."""
    import numpy as np
    import safetensors
    import scipy
    import tokenizers

    import minift
    from minift.backend import gpu_available
    from minift.tools.measure import gemm_gflops

    print(f"minift      {minift.__version__}")
    print(f"python      {platform.python_version()} ({platform.machine()})")
    print(f"numpy       {np.__version__}")
    print(f"scipy       {scipy.__version__}")
    print(f"tokenizers  {tokenizers.__version__}")
    print(f"safetensors {safetensors.__version__}")
    gpu = " + cupy (GPU available)" if gpu_available() else " (no GPU: cupy absent or no device)"
    print(f"backend     numpy{gpu}")
    print(f"BLAS        float32 GEMM {gemm_gflops():.1f} GFLOP/s (1024×1024×1024, best of 5)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Time training steps of every method (and PyTorch's), with peak memory and MFU; ``--device cuda``:
    minift on CuPy against PyTorch on the same GPU (``minift.tools.bench_device``)."""
    import json

    from minift.tools.bench import BENCH, QUICK, print_report, run

    steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    methods = tuple(args.methods) if args.methods else None
    if args.device == "cpu":
        report = run(QUICK if args.quick else BENCH, steps=steps, warmup=warmup, seed=args.seed,
                     with_torch=not args.no_torch, scaling=args.scaling, methods=methods)
        print_report(report)
    else:
        from minift.methods.registry import method_names
        from minift.tools.bench_device import LARGE, print_device_report, run_device

        sizes = {"quick": QUICK} if args.quick else {"bench": BENCH, "large": LARGE}
        report = run_device(args.device, sizes, methods=methods or method_names(), steps=steps,
                            warmup=warmup, seed=args.seed, with_torch=not args.no_torch)
        print_device_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="write machine, config, results and ratios as JSON")
    p.add_argument("--quick", action="store_true", help="a tiny model and 2 steps: a smoke run in seconds")
    p.add_argument("--scaling", action="store_true", help="also vary model width and sequence length")
    p.add_argument("--steps", type=int, help="timed steps per method, median reported (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default 1)")
    p.add_argument("--methods", nargs="+", choices=method_names(), help="default: every method")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference even if installed")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model and the batch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: minift on CuPy against PyTorch on the same GPU, at the bench size and ~10x it")


# ----------------------------------------------------------------------------------------------------
# demo, finetune, eval, generate, export, pretrain (the logic lives in minift.tools.demo/finetune/pretrain)


def cmd_demo(args: argparse.Namespace) -> int:
    """Fine-tune the embedded model with every method and print the comparison table."""
    from minift.tools.demo import DemoConfig, run_demo

    overrides = {
        k: v for k, v in (("task", args.task), ("steps", args.steps), ("rank", args.rank)) if v is not None
    }
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(config, args.out, jobs=args.jobs)
    return 0


def _method_spec(args: argparse.Namespace) -> MethodSpec:
    from minift.methods.registry import MethodSpec

    targets = tuple(t for part in args.targets for t in part.split(",") if t) if args.targets else None
    options: dict[str, tuple[str, ...]] = {"targets": targets} if targets else {}
    for key in ("s2ft_head_targets", "s2ft_channel_targets"):
        if getattr(args, key) is not None:  # "" (empty) trains no matrix on that side
            options[key.removeprefix("s2ft_")] = tuple(t for t in getattr(args, key).split(",") if t)
    return MethodSpec(
        args.method,
        rank=args.rank,
        alpha=args.alpha,
        heads=args.heads,
        channels=args.channels,
        strategy=args.strategy,
        gamma=args.gamma,
        dropout=args.dropout,
        **options,
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a model folder (or the embedded model) on a JSONL file."""
    from minift.tools.finetune import RunConfig, describe_selection, finetune

    spec = _method_spec(args)
    if args.model is None:
        print("no --model given: fine-tuning the embedded base model (a small toy model)", file=sys.stderr)
    run = RunConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_length=args.max_length,
        checkpoint_every=args.checkpoint_every,
        merge=args.merge,
        progress=not args.no_progress,
        activation_checkpointing=args.activation_checkpointing,
    )
    finetune(args.model or "embedded", args.data, spec, args.out, run, resume=args.resume, extend=args.extend)
    record = json.loads(Path(args.out, "finetune.json").read_text(encoding="utf-8"))
    print(f"trainable parameters {record['trainable_parameters']:,}")
    if record.get("s2ft"):
        print("\n".join(describe_selection(record["s2ft"])))
    written = [name for name in ("adapter", "merged") if Path(args.out, name).is_dir()]
    print(f"wrote {args.out} ({', '.join(f'{w}/' for w in [*written, 'checkpoints'])}, finetune.json)")
    return 0


def _model_with_adapter(args: argparse.Namespace) -> tuple[Model, Tokenizer]:
    """--model (default: the adapter's recorded base, else the embedded model) with --adapter on it."""
    from minift.tools.finetune import load_with_adapter

    model, tokenizer, base = load_with_adapter(args.model, args.adapter)
    if args.model is None and args.adapter:
        print(f"base model {base} (recorded by {args.adapter})", file=sys.stderr)
    return model, tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    """Exact match and perplexity of a model (with an adapter) on a task split or a JSONL file."""
    from minift.data.chat import chat_exact_match
    from minift.data.datasets import read_jsonl
    from minift.data.tasks import TaskExample, evaluate, perplexity, pretrain_heldout, task_splits

    model, tokenizer = _model_with_adapter(args)
    if args.data:
        records = read_jsonl(args.data)
        examples = [
            TaskExample(r["prompt"], r["completion"].strip(), "data") for r in records if "prompt" in r
        ]
        what = args.data
    elif args.task == "pretraining":  # --limit counts per skill here
        examples = pretrain_heldout(args.seed, args.limit or 50)
        records, what = [ex.record for ex in examples], "pretraining skills (held-out prompts)"
    else:
        examples = getattr(task_splits(args.task, args.seed), args.split)
        records, what = [ex.record for ex in examples], f"task {args.task!r}, split {args.split!r}"
    if args.limit and (args.data or args.task != "pretraining"):
        examples, records = examples[: args.limit], records[: args.limit]
    print(f"{what}: {len(records)} records")
    print(f"perplexity   {perplexity(model, tokenizer, records):.4f}")
    chats = [r["messages"] for r in records if "messages" in r]
    if chats:  # the reply to each conversation's context, through the chat template
        print(f"exact match  {'chat':<10} {chat_exact_match(model, tokenizer, chats):.1%}")
    if examples:
        scores = evaluate(model, tokenizer, examples)
        if len(scores) == 2:  # one skill: its score is the overall one
            scores = {"all": scores["all"]}
        for name, value in scores.items():
            print(f"exact match  {name:<10} {value:.1%}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue prompts with a model (and an adapter): greedy, or sampled with --temperature."""
    import numpy as np

    from minift.data.chat import chat_prompt_ids, chat_stop_ids
    from minift.data.tasks import answer_stop_ids, format_prompt
    from minift.generate import SamplingConfig, generate

    model, tokenizer = _model_with_adapter(args)
    if args.max_new_tokens > model.config.max_position_embeddings:  # else: hours of generation, by a typo
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is beyond the model's context of "
                          f"{model.config.max_position_embeddings} tokens (max_position_embeddings)")
    if args.chat and (args.prompt or args.question):
        raise ConfigError("generate takes --chat TEXT, or --prompt/--question TEXT, not both")
    if args.chat:
        prompts = list(args.chat)
        ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": c}]) for c in prompts]
        stops = chat_stop_ids(tokenizer)
    else:
        prompts = list(args.prompt or []) + [format_prompt(q) for q in args.question or []]
        ids = [tokenizer.encode(p) for p in prompts]
        stops = answer_stop_ids(tokenizer) if args.question and not args.prompt else tokenizer.eos_ids
    if not prompts:
        raise ConfigError("generate needs at least one --prompt TEXT, --question TEXT or --chat TEXT")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    new = generate(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        eos_ids=stops,
        pad_id=tokenizer.pad_id,
        rng=np.random.default_rng(args.seed),
    )
    for prompt, out in zip(prompts, new, strict=True):
        text = tokenizer.decode(out)
        print(f"user: {prompt}\nassistant: {text}" if args.chat else prompt + text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a fine-tuned adapter as a PEFT folder and/or the merged model as a Hugging Face folder."""
    from minift.io.hub import save_pretrained
    from minift.io.s2ft_peft import export_s2ft_as_peft
    from minift.methods.s2ft import load_adapter as load_s2ft_adapter
    from minift.methods.s2ft.adapter import INDEX as S2FT_INDEX
    from minift.tools.finetune import load_with_adapter, merged_model, record_base, write_adapter

    if not args.peft and not args.merged:
        raise ConfigError("export needs --peft DIR and/or --merged DIR")
    if args.peft and args.adapter is None:
        raise ConfigError("export --peft needs --adapter DIR (the adapter to convert)")
    model, _, base = load_with_adapter(args.model, args.adapter)
    if args.peft:
        if Path(args.adapter, S2FT_INDEX).is_file():  # the exact LoRA form, one rank per module
            folder = export_s2ft_as_peft(
                load_s2ft_adapter(args.adapter), args.peft, base_model_name_or_path=str(base)
            )
            record_base(folder, base)
        else:
            folder = write_adapter(model, args.peft, base=str(base))
        print(f"wrote {folder}")
    if args.merged:
        folder = save_pretrained(merged_model(model), args.merged, tokenizer_path=base)
        print(f"wrote {folder}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Rerun a shipped model's pretraining recipe (the tutorials' base unless --recipe names another)."""
    import dataclasses

    from minift.tools.pretrain import RECIPES, pretrain_single_threaded

    named = RECIPES[args.recipe]
    overrides = {
        k: v
        for k, v in (("seed", args.seed), ("steps", args.steps), ("batch_size", args.batch_size))
        if v is not None
    }
    recipe = dataclasses.replace(named.recipe, **overrides)
    if recipe.warmup_steps > recipe.steps:
        recipe = dataclasses.replace(recipe, warmup_steps=recipe.steps // 10)
    options = {
        "config": named.config,
        "checkpoint_dir": args.checkpoint_dir,
        "resume": args.resume,
        "progress": not args.no_progress,
    }
    steps = pretrain_single_threaded(recipe, args.out, **options)
    print(f"wrote {args.out} ({steps} steps)")
    return 0


def _model_arguments(p: argparse.ArgumentParser, *, adapter: bool = True) -> None:
    default = "the --adapter's recorded base, else 'embedded'" if adapter else "'embedded'"
    p.add_argument(
        "--model",
        metavar="DIR",
        help=f"a Hugging Face model folder, or 'embedded': the shipped base model (default: {default})",
    )
    if adapter:
        p.add_argument(
            "--adapter",
            metavar="DIR",
            help="an adapter folder written by 'minift finetune' (PEFT LoRA or S2FT)",
        )


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("min", "shift"), help="the fine-tuning task (default min)")
    p.add_argument(
        "--methods", nargs="+", choices=method_names(), help="default: every method"
    )
    p.add_argument("--steps", type=int, help="training steps per method (default 300)")
    p.add_argument("--rank", type=int, help="the matched budget: LoRA rank on every projection (default 4)")
    p.add_argument(
        "--out",
        default="minift-demo",
        metavar="DIR",
        help="where results.json and losses.png go (default minift-demo)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds: 4 steps, tiny evaluation")
    p.add_argument(
        "--jobs", type=int, default=2, help="methods trained at once, one process and core each (default 2)"
    )


def _method_option(
    group: argparse._ArgumentGroup, flag: str, *, option: str | None = None, **kwargs: object
) -> None:
    """A method option whose help names the registered methods that read it (``option``: the
    ``MethodSpec`` field it sets, where that is not the flag's own name)."""
    option = option or flag.lstrip("-")
    users = [m.name for m in REGISTRY.values() if option in m.options]
    kwargs["help"] = f"{kwargs.get('help', '')} [used by: {', '.join(users) or 'none'}]"
    group.add_argument(flag, **kwargs)  # type: ignore[arg-type]


def finetune_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p, adapter=False)
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE.jsonl",
        help='one {"prompt": ..., "completion": ...}, {"text": ...} or {"messages": [...]} object per line',
    )
    p.add_argument(
        "--method",
        required=True,
        choices=method_names(),
        help="; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values()),
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the run folder: adapter/, merged/, checkpoints/, finetune.json",
    )
    m = p.add_argument_group("method options")
    _method_option(m,
        "--rank", type=int, default=8, help="LoRA/PiSSA/SORSA rank; S2FT matches its budget (default 8)"
    )
    _method_option(m,
        "--alpha",
        type=float,
        help="LoRA/PiSSA scaling alpha/rank (default alpha = rank); SORSA: default scale 1",
    )
    _method_option(m,
        "--targets", nargs="+", help="projections to adapt: q k v o gate up down, or all (default all)"
    )
    _method_option(m, "--dropout", type=float, default=0.0, help="adapter dropout (LoRA/PiSSA/SORSA)")
    _method_option(m, "--gamma", type=float, default=4e-4, help="SORSA orthonormal regularizer strength")
    _method_option(m, "--heads", type=int, help="S2FT attention heads per layer (default: matched budget)")
    _method_option(m, "--channels", type=int, help="S2FT FFN channels per layer (default: matched budget)")
    _method_option(m,
        "--s2ft-head-targets",
        option="head_targets",
        metavar="LIST",
        help="S2FT matrices whose heads train, some of q,k,v,o (default o); kept with --heads",
    )
    _method_option(m,
        "--s2ft-channel-targets",
        option="channel_targets",
        metavar="LIST",
        help="S2FT matrices whose channels train, some of gate,up,down (default down); kept with --channels",
    )
    _method_option(m,
        "--strategy", default="random", help="S2FT selection: random, weight, activation, product, gradient"
    )
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--schedule", default="linear", choices=("constant", "linear", "cosine"))
    t.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-length", type=int, help="truncate longer examples to this many tokens")
    t.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    t.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="keep only each block's input and rerun its forward in the backward: less memory, same "
        "gradients, about one more forward per step",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints"
    )
    t.add_argument(
        "--extend",
        action="store_true",
        help="resume a finished run and train on to --steps; the lr schedule is re-planned to the new total",
    )
    t.add_argument("--merge", action="store_true", help="also write the merged model to OUT/merged")
    t.add_argument("--no-progress", action="store_true")


def eval_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--data", metavar="FILE.jsonl", help="evaluate on this file instead of an embedded task")
    p.add_argument(
        "--task",
        default="pretraining",
        choices=("pretraining", "shift", "min"),
        help="an embedded task (default: the pretraining skills)",
    )
    p.add_argument(
        "--split", default="test", choices=("train", "validation", "test", "near_ood", "retention")
    )
    p.add_argument("--limit", type=int, help="evaluate at most this many examples (pretraining: per skill)")
    p.add_argument("--seed", type=int, default=0, help="the tasks' seed")


def generate_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a raw prompt (repeatable)")
    p.add_argument(
        "--question",
        action="append",
        metavar="TEXT",
        help="a question in the tasks' format 'Q: TEXT\\nA: ' (repeatable)",
    )
    p.add_argument(
        "--chat",
        action="append",
        metavar="TEXT",
        help="a user message, rendered with the model's chat template; stops at its end of turn (repeatable)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def export_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument(
        "--peft", metavar="DIR", help="write the adapter as a PEFT LoRA folder (S2FT: exact, rank per module)"
    )
    p.add_argument("--merged", metavar="DIR", help="write base + adapter merged, as a Hugging Face folder")


def pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    p.add_argument(
        "--recipe",
        default="base",
        choices=("base", "study"),
        help="base: the tutorials' model (minift/assets/base, the default); "
        "study: minift study's model (minift/assets/study_base, 8 heads)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's, 2500 for base)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 64)")
    p.add_argument("--seed", type=int, help="the recipe's seed (default 0: the shipped model)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="write checkpoints every 500 steps here")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--no-progress", action="store_true")


EXAMPLES = {
    "spec": """examples:
  minift spec export vectors/       decoder, S2FT, LoRA, PiSSA and SORSA cases; vectors/README.md says
                                    what each case's arrays must satisfy

To run the spec itself against your own Python implementation:
  pytest --pyargs minift.spec --impl mypackage.adapter""",
    "demo": """examples:
  minift demo                      every method on the "min" task, one comparison table
  minift demo --task shift --methods lora s2ft --steps 600
  minift demo --quick              a smoke run in seconds""",
    "finetune": """examples:
  minift finetune --data train.jsonl --method lora --rank 8 --out runs/lora
  minift finetune --model ./my-llama --data train.jsonl --method s2ft --heads 1 --channels 64 --out runs/s2ft
  minift finetune --data train.jsonl --method lora --out runs/lora --steps 400 --resume   (after Ctrl-C)
  minift finetune --data train.jsonl --method lora --out runs/lora --steps 600 --extend   (train on)
  minift finetune --model ./smollm2 --data chat.jsonl --method s2ft --out runs/chat
      chat.jsonl lines {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}

Each line of train.jsonl is {"prompt": "Q: reverse abc\\nA: ", "completion": "cba"} (loss on the
completion) or {"text": "..."} (loss on every token). The run folder gets adapter/ (PEFT for
LoRA/PiSSA/SORSA, minift's S2FT adapter for S2FT), checkpoints/, finetune.json and, with --merge or
full fine-tuning, merged/ (a Hugging Face model folder).""",
    "eval": """examples:
  minift eval                                   the embedded model on its pretraining skills
  minift eval --adapter runs/lora/adapter --task shift --split near_ood
  minift eval --model runs/full/merged --data test.jsonl""",
    "generate": """examples:
  minift generate --question "reverse abc"
  minift generate --adapter runs/lora/adapter --question "shift abc"
  minift generate --model ./my-llama --prompt "Once upon a time" --temperature 0.8 --top-p 0.9""",
    "export": """examples:
  minift export --adapter runs/lora/adapter --peft out/peft --merged out/merged
  minift export --adapter runs/s2ft/adapter --peft out/peft       (S2FT as an exact LoRA, rank per module)

Given only --adapter, the base model the adapter records (minift_base.json) is loaded and checked.""",
    "pretrain": """examples:
  minift pretrain --out my-base                 the shipped model's recipe: its weights, byte for byte
  minift pretrain --out tiny --steps 200        a quick, weaker base
  minift pretrain --recipe study --out study    minift study's base model, byte for byte""",
    "study": """examples:
  minift study --out study                  the full study (about 25 min on 2 idle cores, estimated), plots
  minift study --quick --json quick.json    the same protocol, small (under 10 minutes on 2 idle cores)
  minift study --seeds 8 --jobs 4           more seeds, on 4 cores
  minift study --report study/results.json --out study    the report and plots again, from a run's JSON""",
}


def cmd_study(args: argparse.Namespace) -> int:
    """Measure the S2FT and SORSA papers' headline claims on the embedded base model and tasks."""
    import json
    import os
    from dataclasses import replace

    from minift.io.jsonio import read_json_object
    from minift.tools.study import load_base, render_markdown, run_study, write_report
    from minift.tools.study.config import QUICK, StudyConfig

    if args.report:  # re-render a finished run: no training
        report = read_json_object(Path(args.report), error=ConfigError)
        print(render_markdown(report))
        for path in write_report(report, args.out) if args.out else []:
            print(f"wrote {path}")
        return 0
    config = replace(
        QUICK if args.quick else StudyConfig(),
        **{
            k: getattr(args, k)
            for k in ("seeds", "steps", "task", "second_task")
            if getattr(args, k) is not None
        },
    )
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 0:
        raise ConfigError(f"study --jobs must be ≥ 0 (0: no worker processes), got {jobs}")
    report = run_study(config, load_base(args.base), jobs=jobs)
    print(render_markdown(report))
    if args.out:
        for path in write_report(report, args.out):
            print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="the same protocol, small: 100 steps, 3 seeds, small splits"
    )
    p.add_argument(
        "--base",
        help="a Hugging Face model folder, 'tutorial' (the tutorials' base), or 'random' "
        "(default: the shipped study base)",
    )
    p.add_argument(
        "--task", choices=("instruct", "min", "shift"), help="the fine-tuning task (default instruct)"
    )
    p.add_argument(
        "--second-task", choices=("instruct", "min", "shift"), help="the fusion's other task (default min)"
    )
    p.add_argument("--out", metavar="DIR", help="write results.md, results.json and PNG plots into DIR")
    p.add_argument("--json", metavar="FILE", help="write the whole report as JSON: claims, matched_accuracy, "
                   "lr_choice, every run")
    p.add_argument("--seeds", type=int, help="reported seeds per arm (default 5; the ablation has its own)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 200; quick 100)")
    p.add_argument(
        "--report",
        metavar="FILE",
        help="no training: print the report of a run's JSON (with --out: write its results.md and plots)",
    )
    p.add_argument("--jobs", type=int, help="worker processes, one BLAS thread each (default: 2 at most; "
                   "0: none); the results do not depend on it")


def cmd_spec(args: argparse.Namespace) -> int:
    """Write the spec's canonical cases as language-agnostic test vectors."""
    from minift.spec.export import export_vectors

    folders = export_vectors(args.dir)
    print(f"wrote {len(folders)} cases and README.md to {args.dir}")
    return 0


def spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["export"], help="export: write the test vectors")
    p.add_argument("dir", metavar="DIR", help="folder to write (created if missing)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "info": (cmd_info, "print versions, the array backend and the measured BLAS throughput"),
    "bench": (cmd_bench, "time training steps of every method against PyTorch, with memory and MFU"),
    "demo": (cmd_demo, "fine-tune the embedded model with every method and print the comparison table"),
    "finetune": (cmd_finetune, "fine-tune a model on a JSONL file with full, lora, pissa, sorsa or s2ft"),
    "eval": (cmd_eval, "exact match and perplexity of a model (with an adapter) on a task or a JSONL file"),
    "generate": (cmd_generate, "continue prompts with a model (and an adapter)"),
    "export": (
        cmd_export,
        "write an adapter as a PEFT folder and/or the merged model as a Hugging Face folder",
    ),
    "pretrain": (cmd_pretrain, "rerun a shipped base model's pretraining recipe"),
    "study": (cmd_study, "measure the S2FT and SORSA papers' claims in miniature (accuracy, OOD, SVD)"),
    "spec": (cmd_spec, "export the spec's cases as test vectors (safetensors + JSON) for any language"),
}
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "bench": bench_arguments,
    "demo": demo_arguments,
    "finetune": finetune_arguments,
    "eval": eval_arguments,
    "generate": generate_arguments,
    "export": export_arguments,
    "pretrain": pretrain_arguments,
    "study": study_arguments,
    "spec": spec_arguments,
}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (and exit status 2), pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minift",
        description="minift: fine-tuning (full, LoRA, PiSSA, SORSA, S2FT) in pure NumPy.",
        epilog="""start here:
  minift demo                                             every method on the embedded model, one table
  minift finetune --data train.jsonl --method lora --out runs/lora
  minift generate --adapter runs/lora/adapter --question "min 3 1 2"
Each command's --help shows more examples.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        if name in ARGUMENTS:
            ARGUMENTS[name](p)
    return parser


# What each numeric option may be, whatever the subcommand (the same name means the same kind of
# quantity everywhere): argparse's int and float accept -1, 0, nan and inf, which would otherwise run
# zero steps and exit 0, or fail deep inside with a traceback.
_AT_LEAST = {"steps": 1, "batch_size": 1, "max_new_tokens": 1, "checkpoint_every": 1, "rank": 1,
             "limit": 1, "max_length": 2, "seeds": 1, "warmup": 0, "top_k": 0, "jobs": 0, "seed": 0,
             "heads": 0, "channels": 0}
_NUMBER_RANGES = {  # option: (low, high, low included, high included)
    "lr": (0.0, math.inf, False, False), "alpha": (0.0, math.inf, False, False),
    "dropout": (0.0, 1.0, True, False), "gamma": (0.0, math.inf, True, False),
    "weight_decay": (0.0, math.inf, True, False), "temperature": (0.0, math.inf, True, False),
    "top_p": (0.0, 1.0, False, True),
}


def _check_numbers(args: argparse.Namespace) -> str | None:
    """A one-line message for the first numeric option out of its range, or None."""
    for name, lo in _AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < lo:
            return f"--{name.replace('_', '-')} must be an integer >= {lo}, got {value}"
    for name, (lo, hi, lo_in, hi_in) in _NUMBER_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        ok = math.isfinite(value) and (lo <= value if lo_in else lo < value) and (
            value <= hi if hi_in else value < hi)
        if not ok:
            interval = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            return f"--{name.replace('_', '-')} must be a finite number in {interval}, got {value}"
    return None


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    print(f"minift: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_numbers(args)
    if problem:
        parser.error(problem)
    try:
        with warnings.catch_warnings():  # minift's own warnings, one line each, as its errors are
            warnings.simplefilter("always", UnknownTokenWarning)
            warnings.showwarning = _one_line_warning
            return int(args.func(args))
    except MinIFTError as e:
        print(f"minift: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable output folder, a full disk: the user's to fix, in one line
        print(f"minift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
