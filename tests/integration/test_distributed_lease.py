"""Distributed mode, issue 12.5: the per-account lock lost in the middle of a poll.

Worker w1 polls an account of 400 messages and is held after its 40th APPEND (the pause driver). The
test then ends the PostgreSQL backend that holds w1's advisory lock (as a server restart, a failover,
idle_session_timeout or a transaction-pooling PgBouncer would) and freezes w1 (SIGSTOP: its heartbeats
stop, so its job counts as stalled, as a worker cut off from the database would be). A second worker
takes the job over and polls the account to its end. Then w1 goes on: without a fenced lease it went on
delivering what it had planned and fetched (duplicates); now its first write finds another poll's
generation on the lease, and it stops before any DELE and without QUIT.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from tests.distributed_setup import (
    cli,
    config_text,
    fresh_database,
    make_fleet,
    start_worker,
)
from tests.servers.dovecot import Dovecot

pytestmark = pytest.mark.integration

MESSAGES = 400
# The advisory lock's class (connector/service/distributed/registry.py): its backend is the one to end.
POLL_LOCK_CLASS = 0x504F50
PAUSE_AT = ["-m", "tests.acceptance.pause_driver", "before-delivered-record", "40"]


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _wait(condition: object, what: str, timeout: float, logs: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} did not happen:\n{logs}"
        time.sleep(0.2)


def test_a_poll_whose_lock_was_lost_stops_before_its_next_dele_and_nothing_arrives_twice(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    fleet = make_fleet(dovecot, 1, lambda _index: MESSAGES)
    account = fleet.sources[0].name
    pause = tmp_path / "pause"
    pause.mkdir()
    try:
        with fresh_database() as database:
            config = tmp_path / "config.toml"
            config.write_text(config_text(fleet, database, lease_ttl="3s"))
            assert cli("--config", str(config), "db", "upgrade").returncode == 0
            assert cli("--config", str(config), "accounts", "sync-config").returncode == 0
            prefix = [*PAUSE_AT, str(pause), "--"]
            first = start_worker(config, "w1", tmp_path, prefix)
            second = None
            try:
                _wait(lambda: (pause / "paused").exists(), "w1's pause", 60)
                with psycopg.connect(_libpq(database), autocommit=True) as admin:
                    ended = admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks "
                        "WHERE locktype = 'advisory' AND classid = %s AND granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                        (POLL_LOCK_CLASS,),
                    ).fetchall()
                assert ended == [(True,)], ended
                first.process.send_signal(signal.SIGSTOP)
                second = start_worker(config, "w2", tmp_path)
                _wait(
                    lambda: dovecot.maildir_count(account) == 0,
                    "w2 draining the mailbox",
                    120,
                    logs=second.text()[-3000:] if second else "",
                )
                finished = re.compile(rf"account {account}: poll finished on worker \S+: ok$", re.MULTILINE)
                _wait(lambda: finished.search(second.text()), "w2's poll end", 30)
                first.process.send_signal(signal.SIGCONT)
                (pause / "go").write_text("go\n")
                _wait(
                    lambda: f"account {account}: poll finished" in first.text(),
                    "w1's poll end",
                    60,
                    logs=first.text()[-3000:],
                )
            finally:
                first.process.send_signal(signal.SIGCONT)
                codes = [first.stop(), second.stop() if second is not None else None]
            status = cli("--config", str(config), "status", "--json")
        delivered = Counter(dovecot.imap_messages(fleet.destination.name))
    finally:
        fleet.remove()

    w1, w2 = first.text(), second.text()
    # Both stop cleanly: w1 too, even when w2's start removed it from the queue as stalled while it was
    # frozen (it registers again: test_distributed_pause.py).
    assert codes == [0, 0], w1[-3000:] + w2[-3000:]
    assert sum(delivered.values()) == MESSAGES, f"{sum(delivered.values())} delivered\n{w1[-3000:]}"
    assert all(count == 1 for count in delivered.values())
    # w1 learnt it had lost the account at its first write after the pause, and stopped there.
    assert f"account {account}: poll finished on worker" in w1 and ": lease_lost" in w1, w1[-3000:]
    assert "lost its lease (generation 1) to another poll" in w1
    assert "recovered=1" in w2 or "recovered=1" in w1  # the 40th, appended before the pause
    assert '"last_result": "ok"' in status.stdout
