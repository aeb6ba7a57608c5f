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


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "info": (cmd_info, "print versions, the array backend and the measured BLAS throughput"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minift",
        description="minift: fine-tuning (full, LoRA, PiSSA, SORSA, S2FT) in pure NumPy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
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
