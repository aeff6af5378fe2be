"""Distributed mode, issue 16: a worker paused longer than ``stalled_after`` while another worker starts.

Worker A polls an account of 40 messages and is held after its 10th APPEND (the pause driver: the poll's
thread waits, A's heartbeats go on). Then A is frozen (SIGSTOP: its heartbeats stop) until its heartbeat
is older than ``stalled_after``, and worker B starts: procrastinate deletes A's worker row as stalled, and
B's dispatcher queues A's running job again; B runs it and steps aside (A still holds the account's lock).
Then A goes on (SIGCONT). Before the fix, A's next job fetch failed on the foreign key to its deleted row,
and A stopped taking jobs and exited 1 with a traceback after its poll; the end of its taken-over job was
an ``ERROR asyncio: Task exception was never retrieved``. Now A registers again and goes on polling: after
B has stopped, mail seeded into another account reaches the destination through A alone.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.distributed_setup import (
    cli,
    config_text,
    fresh_database,
    make_fleet,
    message,
    start_worker,
)
from tests.servers.dovecot import Dovecot

pytestmark = pytest.mark.integration

MESSAGES = 40
LATER = 3  # seeded into the second account once only A is left
PAUSE_AT = ["-m", "tests.acceptance.pause_driver", "before-delivered-record", "10"]
STALLED_AFTER = 3  # seconds (tests/distributed_setup.py)


def _wait(condition: Callable[[], object], what: str, timeout: float, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen; log:\n{logs()[-4000:]}"
        time.sleep(0.2)


def _stalled_workers(database: str) -> int:
    """Worker rows whose heartbeat is older than ``stalled_after`` (a little more, against clock steps)."""
    with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute(
            "SELECT count(*) FROM procrastinate.procrastinate_workers "
            "WHERE last_heartbeat < now() - make_interval(secs => %s)",
            (STALLED_AFTER + 1,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_worker_paused_past_stalled_after_registers_again_and_goes_on(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    fleet = make_fleet(dovecot, 2, lambda index: MESSAGES if index == 0 else 0)
    big, other = (user.name for user in fleet.sources)
    pause = tmp_path / "pause"
    pause.mkdir()
    later = [message(other, n) for n in range(LATER)]
    try:
        with fresh_database() as database:
            config = tmp_path / "config.toml"
            config.write_text(config_text(fleet, database, poll_interval="2s"))
            assert cli("--config", str(config), "db", "upgrade").returncode == 0
            assert cli("--config", str(config), "accounts", "sync-config").returncode == 0
            a = start_worker(config, "a", tmp_path, [*PAUSE_AT, str(pause), "--"])
            b = None
            try:
                _wait(lambda: (pause / "paused").exists(), "A's pause in the poll", 60, a.text)
                a.process.send_signal(signal.SIGSTOP)
                _wait(lambda: _stalled_workers(database) == 1, "A's heartbeat going stale", 30, a.text)
                b = start_worker(config, "b", tmp_path)
                skipped = f"account {big}: poll skipped: another worker is polling it"
                _wait(lambda: skipped in b.text(), "B running A's job again", 60, b.text)
                a.process.send_signal(signal.SIGCONT)
                (pause / "go").write_text("go\n")
                _wait(lambda: "Registering again" in a.text(), "A's new registration", 60, a.text)
                _wait(lambda: dovecot.maildir_count(big) == 0, "A's poll of the big account", 60, a.text)
                assert b.stop() == 0, b.text()[-3000:]
                # Only A is left: the new mail reaches the destination only if A takes jobs again.
                dovecot.seed(other, later)
                _wait(lambda: dovecot.maildir_count(other) == 0, "A polling after the pause", 60, a.text)
            finally:
                a.process.send_signal(signal.SIGCONT)
                code_a = a.stop()
                if b is not None:
                    b.stop()
        delivered = Counter(dovecot.imap_messages(fleet.destination.name))
    finally:
        fleet.remove()

    log_a = a.text()
    assert code_a == 0, log_a[-4000:]  # stopped by SIGTERM, cleanly
    assert "Traceback" not in log_a, log_a[-4000:]
    assert "ERROR" not in log_a and "Task exception was never retrieved" not in log_a, log_a[-4000:]
    # The job B ran again ended in the queue before A's poll did: one warning, naming the account.
    taken_over = re.findall(
        rf"^.* WARNING .*: account {big}: poll job was taken over by another worker.*$", log_a, re.M
    )
    assert len(taken_over) == 1, log_a[-4000:]
    assert "stalled_after" in taken_over[0]
    assert re.search(r"WARNING .*the job queue had removed this worker.*Registering again", log_a)
    # A polled after its new registration.
    registered = log_a.index("Registering again")
    assert re.search(rf"account {other}: poll started on worker", log_a[registered:])
    # Exactly once: every message seeded, in the destination one time.
    seeded = [*fleet.seeded[big], *later]
    assert sum(delivered.values()) == len(seeded), log_a[-4000:]
    for original in seeded:
        assert sum(count for body, count in delivered.items() if original.rstrip() in body) == 1
