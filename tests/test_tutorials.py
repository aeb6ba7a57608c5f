"""The tutorials are executable lessons: each one and each exercise solution runs as a script, each
tutorial runs as a notebook and shows its pictures inline, none leaves a file behind, and every
``minift.<name>`` it mentions, in code or prose, exists.

A tutorial's own ``assert`` statements and ``check_grad`` calls are the pass criteria, so every claim
its prose makes ("the gradients match", "the merged model is identical") is executed here.

Scripts run from the repository root and notebooks from ``tutorials/`` (the two places a reader
starts them), each followed by a check that the checkout holds no new or changed file, so every
tutorial runs twice in the same checkout and must clean up after itself.
"""

from __future__ import annotations

import importlib
import os
import re
import runpy
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
LESSONS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
SOLUTIONS = sorted((TUTORIALS / "solutions").glob("[0-9][0-9]_*.py"))
NAME = re.compile(r"\bminift(?:\.[A-Za-z_]\w*)+")


def _id(path: Path) -> str:
    return str(path.relative_to(TUTORIALS))


def _resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted``, then getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError names the missing attribute
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_tutorial_folder_is_found_and_not_empty():
    assert LESSONS, f"no tutorials found under {TUTORIALS}"


def _checkout_state() -> tuple[str, frozenset[str]]:
    """What a tutorial could leave behind: ``git status`` (new or changed files, ignored ones
    included) where the tests run from a git checkout, and the entries of the root and of
    ``tutorials/`` either way. Bytecode caches are Python's, not the tutorial's."""
    status = ""
    if (ROOT / ".git").exists():
        status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
        status = "\n".join(line for line in status.splitlines()
                           if "__pycache__" not in line and ".hypothesis" not in line)
    entries = frozenset(str(p.relative_to(ROOT)) for folder in (ROOT, TUTORIALS, TUTORIALS / "solutions")
                        for p in folder.iterdir() if p.name not in {"__pycache__", ".hypothesis"})
    return status, entries


@pytest.fixture
def leaves_the_checkout_clean():
    before = _checkout_state()
    yield
    after = _checkout_state()
    assert after == before, f"the tutorial left files behind:\n{after[0]}\n{sorted(after[1] - before[1])}"


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=_id)
def test_the_script_runs_to_completion_and_its_asserts_hold(path, monkeypatch, leaves_the_checkout_clean):
    monkeypatch.chdir(ROOT)  # as `python tutorials/NN_name.py` from the repository root
    monkeypatch.setenv("MPLBACKEND", "Agg")  # never open a window
    runpy.run_path(str(path), run_name="__main__")


PLOTTING = {p for p in LESSONS if "plt.subplots" in p.read_text(encoding="utf-8")}


@pytest.mark.parametrize("path", LESSONS, ids=_id)
def test_the_notebook_executes_and_shows_its_pictures_inline(path, monkeypatch, leaves_the_checkout_clean):
    """The tutorial as a reader opens it: converted by jupytext, executed cell by cell in a Jupyter
    kernel started in ``tutorials/``; a tutorial that plots must show at least one inline PNG."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = jupytext.read(path)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(TUTORIALS)}}).execute()
    pictures = sum("image/png" in out.get("data", {})
                   for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    if path in PLOTTING:
        assert pictures >= 1, f"{_id(path)} plots but showed no inline picture"
    else:
        assert pictures == 0


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=_id)
def test_every_minift_name_the_script_mentions_exists(path):
    names = sorted(set(NAME.findall(path.read_text(encoding="utf-8"))))
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, f"{_id(path)} mentions names that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", LESSONS, ids=_id)
def test_the_tutorial_opens_with_prose_and_ends_with_exercises_that_have_solutions(path):
    cells = re.split(r"^# %%", path.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]
    assert cells[0].startswith(" [markdown]"), "the first cell must be a markdown cell stating the goal"
    assert "**Library functions explained here.**" in cells[0], "the opening cell must name them"
    assert cells[-1].startswith(" [markdown]"), "the tutorial must end with its Exercises cell"
    assert re.search(r"^# ## Exercises", cells[-1], flags=re.MULTILINE), "no '## Exercises' at the end"
    assert (TUTORIALS / "solutions" / path.name).exists(), f"solutions/{path.name} is missing"


@pytest.mark.parametrize("path", LESSONS, ids=_id)
def test_the_tutorial_opens_as_a_notebook_of_markdown_and_code_cells(path):
    jupytext = pytest.importorskip("jupytext")
    cells = jupytext.read(path).cells
    kinds = {c.cell_type for c in cells}
    assert kinds == {"markdown", "code"}, f"expected markdown and code cells, got {kinds}"
    assert cells[0].cell_type == "markdown"
    assert cells[-1].cell_type == "markdown"


def test_the_name_checker_rejects_a_name_that_does_not_exist():
    with pytest.raises(AttributeError):
        _resolve("minift.testing.no_such_function")
    assert isinstance(_resolve("minift.testing"), ModuleType)
