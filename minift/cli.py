"""The ``minift`` command line. Each subcommand's --help says what it does and how to use it."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence

from minift.errors import MinIFTError


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the array backend and the measured BLAS throughput."""
    import numpy as np
    import safetensors
    import scipy
    import tokenizers

    import minift
    from minift.backend import gpu_available
    from minift.measure import gemm_gflops

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
    """Time training steps of every method (and PyTorch's), with peak memory and MFU."""
    from minift.bench import cmd_bench as run_bench

    return run_bench(args)


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="write machine, config, results and ratios as JSON")
    p.add_argument("--quick", action="store_true", help="a tiny model and 2 steps: a smoke run in seconds")
    p.add_argument("--scaling", action="store_true", help="also vary model width and sequence length")
    p.add_argument("--steps", type=int, help="timed steps per method, median reported (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default 1)")
    p.add_argument("--methods", nargs="+", help="some of: full lora pissa sorsa s2ft (default: all)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference even if installed")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model and the batch")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "info": (cmd_info, "print versions, the array backend and the measured BLAS throughput"),
    "bench": (cmd_bench, "time training steps of every method against PyTorch, with memory and MFU"),
}
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"bench": bench_arguments}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minift",
        description="minift: fine-tuning (full, LoRA, PiSSA, SORSA, S2FT) in pure NumPy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if name in ARGUMENTS:
            ARGUMENTS[name](p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MinIFTError as e:
        print(f"minift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
