"""The README's Layout section names the tree as it is: every module of connector/ is in it, and every file
it names exists (a newcomer finds the room for a concern from that list)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_every_module_of_connector_is_in_the_layout() -> None:
    named = set(re.findall(r"[\w-]+\.py\b", layout_block()))
    modules = {path.name for path in (ROOT / "connector").rglob("*.py")}
    missing = sorted(modules - named)
    assert not missing, f"README Layout does not name: {missing}"


def test_every_file_the_layout_names_exists() -> None:
    block = layout_block()
    files = {
        path.name for path in ROOT.rglob("*") if ".venv" not in path.parts and ".cache" not in path.parts
    }
    named = set(re.findall(r"[\w-]+\.(?:py|md|yaml|service)\b", block))
    assert not sorted(named - files), f"README Layout names files that do not exist: {sorted(named - files)}"
    directories = set(re.findall(r"^\s*([\w.]+)/", block, flags=re.MULTILINE))
    for directory in directories:
        assert any(path.is_dir() for path in ROOT.rglob(directory) if ".venv" not in path.parts), directory
