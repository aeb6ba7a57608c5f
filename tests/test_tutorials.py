"""The tutorials are executable lessons: each one and each exercise solution runs as a script, and
every ``minift.<name>`` it mentions, in code or prose, exists.

A tutorial's own ``assert`` statements and ``check_grad`` calls are the pass criteria, so every claim
its prose makes ("the gradients match", "the merged model is identical") is executed here.
"""

from __future__ import annotations

import importlib
import re
import runpy
from pathlib import Path
from types import ModuleType

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
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


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=_id)
def test_the_script_runs_to_completion_and_its_asserts_hold(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # plots and checkpoints land in a scratch folder
    monkeypatch.setenv("MPLBACKEND", "Agg")  # never open a window
    runpy.run_path(str(path), run_name="__main__")


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
