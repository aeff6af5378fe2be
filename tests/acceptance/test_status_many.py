"""``pop-connector status`` over many accounts (issue 16), on a synthetic ledger: no mail server is needed,
``status`` only reads the ledger.

The summary line comes first, accounts in natural order (a2 before a10), ``--state`` and ``--account``
narrow the listing, and ``status | head -n 3`` ends quietly: before, the closed pipe ended in a
BrokenPipeError traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

from connector.ledger.database import open_database
from connector.ledger.models import AccountRow
from tests.acceptance.conftest import ROOT, RunCli

pytestmark = pytest.mark.acceptance

ACCOUNTS = 3000  # about 12,000 lines: far more than a pipe holds
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _config(tmp_path: Path) -> Path:
    """Every account configured (never contacted: the host does not exist), ``a7`` disabled."""
    lines = [
        f'[service]\ndatabase = "sqlite:///{tmp_path / "state.db"}"\n',
        '[[destinations]]\nname = "imap"\ntype = "imap"\nhost = "imap.invalid"\nusername = "u"\n'
        'password = "Destination-pw-1"\n',
    ]
    for n in range(ACCOUNTS):
        enabled = "false" if n == 7 else "true"
        lines.append(
            f'[[accounts]]\nname = "a{n}"\nhost = "pop.invalid"\nusername = "a{n}"\n'
            f'password = "Source-pw-1"\ndestination = "imap"\nenabled = {enabled}\n'
        )
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines))
    return config


def _row(n: int) -> dict[str, object]:
    """Accounts a0..: every 10th failing authentication, every 10th + 1 backing off, every 100th + 2
    suspended, every 10th + 3 never polled (no row), the rest ok."""
    row: dict[str, object] = {
        "name": f"a{n}",
        "created_at": NOW,
        "last_poll_started_at": NOW,
        "last_poll_finished_at": NOW,
        "last_result": "ok",
        "last_error": None,
        "last_success_at": NOW,
        "consecutive_failures": 0,
        "next_poll_at": NOW + timedelta(minutes=5),
        "suspended_at": None,
        "suspended_reason": None,
    }
    if n % 10 == 0:
        row.update(last_result="auth_error", last_error="-ERR [AUTH] invalid login", consecutive_failures=4)
    elif n % 10 == 1:
        row.update(last_result="error", last_error="connection refused", consecutive_failures=2)
    if n % 100 == 2:
        row.update(suspended_at=NOW, suspended_reason="10 failed polls in a row")
    return row


@pytest.fixture
def config(tmp_path: Path, run_cli: RunCli) -> Path:
    config = _config(tmp_path)
    upgrade = run_cli("--config", str(config), "db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr
    engine = open_database(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with engine.begin() as connection:
            connection.execute(insert(AccountRow), [_row(n) for n in range(ACCOUNTS) if n % 10 != 3])
    finally:
        engine.dispose()
    return config


# 300 failing auth, 300 backing off, 300 never polled; 30 suspended (a2, a102, ...) and a7 disabled.
SUMMARY = (
    "3000 accounts: 2069 ok, 300 backing off, 300 failing auth, 31 suspended, 0 polling now, 300 never polled"
)


def test_status_piped_into_head_ends_quietly(config: Path) -> None:
    reader = subprocess.Popen(
        [sys.executable, "-m", "connector", "--config", str(config), "status"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert reader.stdout is not None and reader.stderr is not None
    head = [reader.stdout.readline().decode() for _ in range(3)]
    reader.stdout.close()  # what `head -n 3` does after its third line
    stderr = reader.stderr.read().decode()
    code = reader.wait(60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert code == 1, stderr  # as Python's docs do it: a quiet exit with status 1
    assert head[0].rstrip("\n") == SUMMARY
    assert head[1].startswith("a0: auth_error")
    assert head[2].startswith("  last poll 2026-03-01T12:00:00+00:00")


def test_status_summary_natural_order_and_filters(config: Path, run_cli: RunCli) -> None:
    full = run_cli("--config", str(config), "status")
    assert full.returncode == 0, full.stderr
    lines = full.stdout.splitlines()
    assert lines[0] == SUMMARY
    heads = [line.split(":")[0] for line in lines if line.startswith("a")]
    assert heads[:12] == [f"a{n}" for n in range(12)]  # a2 before a10
    assert len(heads) == ACCOUNTS

    failing = run_cli("--config", str(config), "status", "--state", "failing", "--account", "a1?")
    assert failing.returncode == 0, failing.stderr
    lines = failing.stdout.splitlines()
    # The summary counts what --account selects (a10..a19); --state narrows the accounts shown.
    assert lines[0] == (
        "10 accounts: 7 ok, 1 backing off, 1 failing auth, 0 suspended, 0 polling now, 1 never polled"
    )
    assert lines[1] == "1 shown"
    assert [line for line in lines if line.startswith("a")] == ["a10: auth_error"]
    assert any("AUTHENTICATION FAILING (4 failed polls in a row)" in line for line in lines)

    chosen = run_cli(
        "--config", str(config), "status", "--json", "--state", "suspended", "--state", "never-polled",
        "--account", "a?", "--account", "a10?",
    )  # fmt: skip
    assert chosen.returncode == 0, chosen.stderr
    records = json.loads(chosen.stdout)  # still the list of records, each with its state now
    assert [(r["account"], r["state"]) for r in records] == [
        ("a2", "suspended"),
        ("a3", "never-polled"),
        ("a7", "suspended"),
        ("a102", "suspended"),
        ("a103", "never-polled"),
    ]
    assert chosen.stderr.strip().endswith(
        "20 accounts: 11 ok, 2 backing off, 2 failing auth, 3 suspended, 0 polling now, 2 never polled"
    )

    wrong = run_cli("--config", str(config), "status", "--state", "broken")
    assert wrong.returncode == 2 and "invalid choice: 'broken'" in wrong.stderr
