"""Compute code runs on CuPy too, so it calls ``xp.<function>`` (``xp = get_xp(x)``), never
``np.<function>``.

The allowed ``np.`` calls make no arrays: dtype names and dtype queries, and the host random generator
(random numbers come from an explicit ``numpy.random.Generator``), and ``np.errstate``, which mutes a
warning that a correct overflow raises on the host. Attribute references that are not
calls (``np.ndarray`` in a type hint, ``xp: ModuleType = np`` as a default) are fine. A few functions
work on host arrays by design and are listed, with the reason, in HOST_FUNCTIONS.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPUTE_CODE = ["minift/layers/*.py", "minift/model.py", "minift/slots.py", "minift/methods/**/*.py",
                "minift/optim.py", "minift/generate.py", "minift/serving.py"]
ALLOWED = {
    "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool_",  # dtype names
    "dtype", "finfo", "iinfo", "random.default_rng", "random.Generator",
    "errstate",  # the host's floating-point warnings: CuPy raises none, so it is a no-op there
}
HOST_FUNCTIONS = {  # (file, function): why it may call numpy directly
    ("minift/io/peft.py", "peft_factors"): "builds float64 host arrays for a PEFT file",
    ("minift/methods/svd_analysis.py", "mean"): "summarises Python floats for a plot",
    ("minift/layers/rope.py", "rope_tables"): "one host definition of the angles for every device",
}


def _dotted(node: ast.expr) -> list[str] | None:
    """['np', 'random', 'default_rng'] for ``np.random.default_rng``; None for other expressions."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def bare_numpy_calls(path: Path) -> list[str]:
    """``file:line  np.<attr>(`` for every call of a numpy function outside ALLOWED and HOST_FUNCTIONS."""
    tree = ast.parse(path.read_text(), filename=str(path))
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    aliases = {"numpy"} | {a.asname for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                           if a.name == "numpy" and a.asname}
    offenders = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call) and (name := _dotted(node.func)) and len(name) > 1:
            attr = ".".join(name[1:])
            if name[0] in aliases and attr not in ALLOWED and (shown, function) not in HOST_FUNCTIONS:
                offenders.append(f"{shown}:{node.lineno}  {'.'.join(name)}(")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return offenders


def test_the_scan_finds_a_bare_numpy_call_and_allows_dtype_names(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import numpy as np\nimport numpy\n"
                      "a = np.zeros(3)\nb = numpy.add.at(a, [0], 1)\nc = np.float32(2)\n"
                      "r = np.random.default_rng(0)\nd: np.ndarray = a\ne = xp.zeros(3)\n")
    found = [line.split()[-1] for line in bare_numpy_calls(sample)]
    assert found == ["np.zeros(", "numpy.add.at("]


def test_compute_code_calls_no_numpy_function_directly():
    files = sorted({p for pattern in COMPUTE_CODE for p in ROOT.glob(pattern)})
    assert any(p.name == "model.py" for p in files)
    offenders = [o for p in files for o in bare_numpy_calls(p)]
    assert not offenders, "use xp = get_xp(x) and xp.<function> instead of:\n" + "\n".join(offenders)
