"""Check an implementation's outputs against the minift spec's test vectors (NumPy + safetensors only).

``minift spec export DIR`` writes one folder per case: ``case.json`` (the property, the interface call,
scalars, and each expected output's tolerance) and ``arrays.safetensors`` (``input/*`` and
``expected/*``, float64; tokens and targets int64). An implementation, in any language, computes every
expected output from the case's inputs alone and writes it under the same name, without the
``expected/`` prefix, into ``actual.safetensors`` beside them. Then

    python check.py DIR

compares every output elementwise, |actual − expected| ≤ atol + rtol · |expected|, with that output's
own atol and rtol from ``case.json``, prints one line per failing output and exits 1 if any failed
(2 if an output is missing). This file is copied into DIR by the export; it needs only NumPy and safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def check_case(folder: Path, actual: dict[str, np.ndarray]) -> list[str]:
    """The failures of one case's ``actual`` outputs (names without ``expected/``), one line each."""
    case = json.loads((folder / "case.json").read_text())
    arrays = load_file(str(folder / "arrays.safetensors"))
    failures = []
    for name, tol in case["tolerance"].items():
        expected = arrays[f"expected/{name}"]
        if name not in actual:
            failures.append(f"{case['name']}: {name} is missing")
            continue
        got = np.asarray(actual[name], dtype=np.float64)
        if got.shape != expected.shape:
            failures.append(f"{case['name']}: {name} has shape {got.shape}, expected {expected.shape}")
            continue
        excess = np.abs(got - expected) - (tol["atol"] + tol["rtol"] * np.abs(expected))
        if not np.all(excess <= 0):  # NaN fails too
            worst = np.unravel_index(np.nanargmax(np.where(np.isnan(excess), np.inf, excess)), excess.shape)
            failures.append(
                f"{case['name']}: {name}[{', '.join(map(str, worst))}] = {got[worst]!r}, expected "
                f"{expected[worst]!r} (atol {tol['atol']:g}, rtol {tol['rtol']:g})"
            )
    return failures


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python check.py DIR", file=sys.stderr)
        return 2
    root, failures, missing = Path(argv[0]), [], []
    cases = sorted(p.parent for p in root.glob("*/case.json"))
    for folder in cases:
        if not (folder / "actual.safetensors").is_file():
            missing.append(folder.name)
            continue
        failures += check_case(folder, load_file(str(folder / "actual.safetensors")))
    for line in failures:
        print(line)
    if missing:
        print(f"no actual.safetensors in: {', '.join(missing)}")
    print(f"{len(cases) - len(missing)} of {len(cases)} cases checked, {len(failures)} failing outputs")
    return 2 if missing else int(bool(failures))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
