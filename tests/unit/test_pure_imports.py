"""The pure parts of the poll (its plan, its result, the policies and the ledger's records) import no database
code: they are tested, and reasoned about, without SQLAlchemy. Each check runs in a fresh interpreter,
because this one has long imported SQLAlchemy for other tests."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

import connector.policies
from connector.ledger.database import open_database
from tests.configs import write_tables
from tests.servers.scripted_pop3 import ScriptedPop3Server

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


# --- what `status` and an idle `sync` load (issue 16's start-up goal) -----------------------------------

# Loaded by no command that only reads the ledger or polls with nothing new: the destinations' libraries
# (a poll opens a destination only to deliver), the services' scheduler, queue, listener and its pages,
# Alembic for a ledger already up to date, rich when stderr is no terminal.
NEVER_FOR_STATUS_OR_IDLE_SYNC = (
    "alembic",
    "apscheduler",
    "exchangelib",
    "google",
    "googleapiclient",
    "httpx",
    "imapclient",
    "msal",
    "procrastinate",
    "prometheus_client",
    "psycopg",
    "requests",
    "rich",
    "connector.destinations.ews",
    "connector.destinations.gmail",
    "connector.destinations.imap",
    "connector.ops.charts",
    "connector.ops.metrics",
    "connector.ops.status_page",
    "connector.ops.web",
    "connector.service",
    # A SQLite ledger builds no PostgreSQL statement (connector/ledger/postgresql_dml.py).
    "sqlalchemy.dialects.postgresql",
)


def modules_loaded_by(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``pop-connector ARGS`` in a fresh interpreter (stderr no terminal); the modules it had loaded
    when the command returned."""
    loaded = tmp_path / "modules.txt"
    code = (
        "import sys\n"
        "from connector.cli import main\n"
        f"code = main({args!r})\n"
        f"open({str(loaded)!r}, 'w').write('\\n'.join(sys.modules))\n"
        "sys.exit(code)\n"
    )
    root = str(Path(connector.policies.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env, timeout=60
    )
    return done, set(loaded.read_text().split("\n")) if loaded.exists() else set()


def loaded_of(modules: set[str], names: Iterable[str]) -> list[str]:
    """Which of ``names`` (packages count with their submodules) are among ``modules``."""
    return sorted(name for name in names if any(m == name or m.startswith(f"{name}.") for m in modules))


def one_account_config(tmp_path: Path, pop3_port: int) -> Path:
    """One account on 127.0.0.1:``pop3_port`` (the scripted server's user) into an IMAP destination that
    nothing listens on: a poll that opened it would fail. Its ledger is created here, at the newest
    migration: a command that has to migrate it needs Alembic."""
    open_database(f"sqlite:///{tmp_path / 'ledger.db'}").dispose()
    return write_tables(
        tmp_path / "config.toml",
        f"sqlite:///{tmp_path / 'ledger.db'}",
        [
            {
                "name": "imap",
                "type": "imap",
                "host": "127.0.0.1",
                "port": 9,
                "tls": "none",
                "username": "u",
                "password": "p",
            }
        ],
        [
            {
                "name": "alice",
                "host": "127.0.0.1",
                "port": pop3_port,
                "tls": "none",
                "username": "alice",
                "password": "secret",
                "destination": "imap",
            }
        ],
    )


def test_status_loads_neither_the_poll_nor_the_services(tmp_path: Path) -> None:
    config = one_account_config(tmp_path, 9)
    done, modules = modules_loaded_by(["--config", str(config), "status"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 account" in done.stdout and modules
    # Nor the OAuth token fetchers (urllib.request): the configuration validates with oauth_endpoints alone.
    never = [
        *NEVER_FOR_STATUS_OR_IDLE_SYNC,
        "connector.poll",
        "connector.pop3",
        "connector.oauth",
        "urllib.request",
    ]
    assert not loaded_of(modules, never)


def test_an_idle_sync_loads_no_destination_and_none_of_the_services(tmp_path: Path) -> None:
    """connect, log in, UIDL, nothing new, QUIT: no destination session opens, so none of their libraries
    loads, and a sync, which serves no status page or /metrics, loads neither."""
    with ScriptedPop3Server() as server:
        config = one_account_config(tmp_path, server.port)
        done, modules = modules_loaded_by(["--config", str(config), "sync"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "alice: ok delivered=0 " in done.stdout and any(
        c.startswith("UIDL") for c in server.recorded.commands
    )
    assert "connector.poll.engine" in modules  # it did poll
    assert not loaded_of(modules, NEVER_FOR_STATUS_OR_IDLE_SYNC)
    # A login without a token fetches none: no HTTP client, no Gmail token files (connector/oauth_http.py).
    assert not loaded_of(modules, ["urllib.request", "connector.destinations.gmail_tokens"])
