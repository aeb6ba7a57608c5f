"""The README's promises: its first block is the two-command quickstart that .ci/run executes, and
every `minift <command>` it mentions exists."""

import re
from pathlib import Path

from minift.tools.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_first_block_is_two_commands_one_runs_the_demo_one_the_tests():
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    assert README.index(block.group(0)) < README.index("\n## "), "the quickstart comes before any section"
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("pip install -e . && minift demo")
    assert lines[1].startswith("pip install -e '.[test")
    assert "pytest" in lines[1]


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "grep -m1 '^pip install -e .*pytest' README.md" in ci
    assert 'eval "$test_command"' in ci


def test_every_minift_command_the_readme_mentions_exists():
    in_code = re.findall(r"```(?:bash)?\n(.*?)```", README, re.S)
    mentioned = set(re.findall(r"`minift ([a-z]+)", README))
    mentioned |= {m for block in in_code for m in re.findall(r"(?:^|&& )minift ([a-z]+)", block, re.M)}
    assert mentioned, "the README shows commands"
    assert mentioned <= set(COMMANDS), f"unknown commands: {mentioned - set(COMMANDS)}"
