"""Two processes on one account (issue 11.5): `sync` while another `sync` or `run` polls it.

The first process is paused in the middle of its poll (after the 40th APPEND, before its record; its
fetching thread meanwhile RETRs ahead) while the second one starts and runs to its end. Without a lease
both polled the mailbox and the messages fetched by both arrived twice; now the second one skips the
account, says who holds it, and fails only when the account was named on its command line.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.acceptance.conftest import ROOT, RunCli
from tests.configs import config_toml, write_config
from tests.conftest import fresh_postgres_database
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance

MESSAGES = 400
PAUSE_AT = ["-m", "tests.acceptance.pause_driver", "before-delivered-record", "40"]


@contextmanager
def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    with fresh_postgres_database("pop_connector_lease") as url:
        yield url


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"{path.name} never appeared:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("first", "named", "database"),
    [
        ("sync", True, "sqlite"),
        ("sync", False, "postgresql"),
        ("run", True, "postgresql"),
        ("run", False, "sqlite"),
    ],
    ids=["sync-named-sqlite", "sync-all-postgresql", "run-named-postgresql", "run-all-sqlite"],
)
def test_a_second_process_skips_the_account_and_every_message_arrives_once(
    dovecot: Dovecot,
    mail_users: MailUsers,
    run_cli: RunCli,
    tmp_path: Path,
    first: str,
    named: bool,
    database: str,
) -> None:
    seeded = [simple(n) for n in range(MESSAGES)]
    dovecot.seed(mail_users.source.name, seeded)
    with _database(database, tmp_path) as url:
        config = write_config(
            tmp_path / "config.toml",
            config_toml(dovecot, mail_users, url, defaults={"poll_interval": "1h", "poll_jitter": 0}),
        )
        pause = tmp_path / "pause"
        pause.mkdir()
        log = tmp_path / "first.log"
        with log.open("wb") as output:
            holder = subprocess.Popen(
                [sys.executable, *PAUSE_AT, str(pause), "--", "--config", str(config), first],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        try:
            _wait_for(pause / "paused", holder, log)
            second = run_cli("--config", str(config), "sync", *(["--account", "alice"] if named else []))
            status = run_cli("--config", str(config), "status")
            (pause / "go").write_text("go\n")
            if first == "run":
                # The service logs its poll's result line; then it may stop.
                finished = re.compile(r"^\S+ \S+ INFO connector: alice: \w+ delivered=", re.MULTILINE)
                deadline = time.monotonic() + 120
                while not finished.search(log.read_text(errors="replace")) and time.monotonic() < deadline:
                    assert holder.poll() is None, log.read_text()[-3000:]
                    time.sleep(0.2)
                holder.send_signal(signal.SIGTERM)
            first_code = holder.wait(120)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)

    output = second.stdout + second.stderr
    expected = f"account alice is being polled by PID {holder.pid} on host {socket.gethostname()} since "
    assert expected in output and "; skipped" in output, output
    assert "Traceback" not in output
    assert f"being polled now by PID {holder.pid} on host {socket.gethostname()} since" in status.stdout
    assert second.returncode == (1 if named else 0), output

    delivered = Counter(dovecot.imap_messages(mail_users.destination.name))
    assert sum(delivered.values()) == MESSAGES, f"{sum(delivered.values())} delivered"
    assert all(count == 1 for count in delivered.values())
    assert dovecot.maildir_count(mail_users.source.name) == 0
    assert first_code == 0, log.read_text()[-3000:]


def test_dry_run_takes_no_lease_while_a_poll_runs(
    dovecot: Dovecot, mail_users: MailUsers, run_cli: RunCli, tmp_path: Path, sqlite_url: str
) -> None:
    """`sync --dry-run` only reads: it shows its plan even while another process polls the account."""
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(50)])
    config = write_config(tmp_path / "config.toml", config_toml(dovecot, mail_users, sqlite_url))
    pause = tmp_path / "pause"
    pause.mkdir()
    log = tmp_path / "first.log"
    with log.open("wb") as output:
        holder = subprocess.Popen(
            [sys.executable, *PAUSE_AT[:-1], "5", str(pause), "--", "--config", str(config), "sync"],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        _wait_for(pause / "paused", holder, log)
        dry = run_cli("--config", str(config), "sync", "--dry-run", "--account", "alice")
        (pause / "go").write_text("go\n")
        assert holder.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "alice: would deliver" in dry.stdout
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 50
