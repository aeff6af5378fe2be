"""The pure parts of the poll (its plan, its result, the policies and the ledger's records) import no database
code: they are tested, and reasoned about, without SQLAlchemy. Each check runs in a fresh interpreter,
because this one has long imported SQLAlchemy for other tests."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import connector.policies

POLICIES = sorted(
    f"connector.policies.{module.name}" for module in pkgutil.iter_modules(connector.policies.__path__)
)
PURE = ["connector.ledger.records", "connector.poll.plan", "connector.poll.result", *POLICIES]


def imports_sqlalchemy(module: str) -> bool:
    code = f"import sys, {module}; print('sqlalchemy' in sys.modules)"
    # This checkout's package, not whichever one the interpreter would find by itself.
    root = str(Path(connector.policies.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return done.stdout.strip() == "True"


def test_every_policy_module_is_checked() -> None:
    # pkgutil found the package's modules (an empty list would make the test below pass for nothing).
    assert "connector.policies.listing" in POLICIES and "connector.policies.uidl" in POLICIES


@pytest.mark.parametrize("module", PURE)
def test_pure_module_does_not_import_sqlalchemy(module: str) -> None:
    assert not imports_sqlalchemy(module), f"{module} imports SQLAlchemy"


def test_the_command_line_parser_loads_without_the_libraries_of_the_commands() -> None:
    """``pop-connector --help`` and usage errors answer at once: the parser imports none of SQLAlchemy,
    pydantic, the destinations' libraries or the poll (issue 16's start-up goal)."""
    code = (
        "import sys\n"
        "from connector.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = [m for m in ('sqlalchemy', 'pydantic', 'imapclient', 'requests', 'rich', "
        "'connector.config', 'connector.poll.engine') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
