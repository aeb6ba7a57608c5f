"""The package's layering, read from the source: imports go only downward through a declared rank
table, there are no import cycles, and no module imports another module's private (``_x``) names.

The ranks are the architecture map of the README ("Architecture"): the textbook core at the bottom
(errors/backend/config, then the ops, slots, the model, the optimizer, the methods), file formats
above it, then training/generation/serving/data, then the specification and testing helpers, and the
tools at the top. A module may import from its own rank or any lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import minift

PACKAGE = Path(minift.__file__).parent

# (module prefix, rank): the longest matching prefix gives a module its rank.
RANKS: dict[str, int] = {
    "minift.errors": 0,
    "minift.backend": 0,
    "minift.config": 0,
    "minift.io.safetensors_io": 1,
    "minift.io.jsonio": 1,
    "minift.io.atomic": 1,
    "minift.io.hf_names": 1,
    "minift.layers": 2,
    "minift.slots": 3,
    "minift.optim": 3,  # the optimizer sees arrays only, never the model
    "minift.model": 4,
    "minift": 4,  # the package itself re-exports the model's names
    "minift.methods": 5,
    "minift.io.provenance": 1,
    "minift.io.hfconfig": 1,
    "minift.io.hub": 6,
    "minift.io.s2ft_peft": 6,
    "minift.io.peft": 6,
    "minift.io.checkpoint": 6,
    "minift.train": 7,
    "minift.generate": 7,
    "minift.serving": 7,
    "minift.data": 7,
    "minift.device": 7,
    "minift.methods.registry": 7,  # binds each method to its adapter format (io.peft) and merge (serving)
    "minift.spec": 8,
    "minift.testing": 8,
    "minift.tools": 9,
    "minift.__main__": 9,  # ``python -m minift``: the command line
}

# Private imports tolerated across modules: none.
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    prefixes = [p for p in RANKS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} has no rank in RANKS: give it one"
    return RANKS[max(prefixes, key=len)]


def imports() -> dict[str, list[tuple[str, str, int]]]:
    """Each module's imports of minift modules as (imported module, name or '', line)."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        found = out.setdefault(name, [])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("minift")]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minift"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    # ``from minift.methods import lora`` imports the module minift.methods.lora
                    edge = (sub, "", node.lineno) if sub in modules else (node.module, a.name, node.lineno)
                    found.append(edge)
    return out


def test_every_module_has_a_rank() -> None:
    for module in imports():
        rank(module)


def test_imports_go_only_downward() -> None:
    upward = [
        f"{src}:{line} imports {dst} (rank {rank(src)} < {rank(dst)})"
        for src, edges in imports().items()
        for dst, name, line in edges
        if rank(dst) > rank(src) and (src, dst, name) not in KNOWN_PRIVATE
    ]
    assert not upward, "\n".join(upward)


def test_no_private_names_imported_from_another_module() -> None:
    private = {
        (src, dst, name)
        for src, edges in imports().items()
        for dst, name, _ in edges
        if name.startswith("_") and dst != src
    }
    assert private <= KNOWN_PRIVATE, sorted(private - KNOWN_PRIVATE)


def test_no_import_cycles() -> None:
    graph = {src: {dst for dst, _, _ in edges if dst != src} for src, edges in imports().items()}
    # a package's __init__ importing its own submodules is not a cycle through the submodule
    graph = {src: {d for d in dsts if not src.startswith(d + ".")} for src, dsts in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
