"""Thousands of hostile-input cases (``tests/fuzz_formats.py``), outside the test suite: run by hand,
e.g. ``python tests/fuzz_many.py --cases 5000 --seed 7``. Prints the outcome counts per format and
every crash, hang and silently accepted invalid value, and exits 1 if there was any."""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz_formats import FORMATS, Outcome, build_templates, load_originals, run_case, run_cli_case


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    p.add_argument("--formats", nargs="+", default=[*FORMATS, "cli"])
    p.add_argument("--show-changed", action="store_true")
    args = p.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad: list[Outcome] = []
    with tempfile.TemporaryDirectory() as tmp:
        templates = build_templates(Path(tmp) / "templates")
        originals = load_originals(templates)
        for i in range(args.cases):
            fmt = args.formats[i % len(args.formats)]
            seed = args.seed * 1_000_003 + i
            signal.setitimer(signal.ITIMER_REAL, args.timeout)
            try:
                if fmt == "cli":
                    out = run_cli_case(templates, seed, Path(tmp) / "case")
                else:
                    out = run_case(templates, originals, fmt, seed, Path(tmp) / "case")
            except Hang:
                out = Outcome("hang", f"{fmt} seed {seed}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[fmt][out.kind] += 1
            if out.kind in ("crash", "hang", "accepted") or (args.show_changed and out.kind == "changed"):
                bad.append(out)
                print(f"{out.kind.upper():8s} seed={seed} {out.what} -> {out.detail}", flush=True)
    total = collections.Counter()
    for fmt, c in counts.items():
        total.update(c)
        print(f"{fmt:11s} " + " ".join(f"{k}={c[k]}" for k in ("error", "same", "changed", "crash", "hang",
                                                                 "accepted")))
    print("total       " + " ".join(f"{k}={total[k]}" for k in ("error", "same", "changed", "crash", "hang",
                                                                 "accepted")))
    return 1 if any(total[k] for k in ("crash", "hang", "accepted")) else 0


if __name__ == "__main__":
    sys.exit(main())
