"""Distributed mode end to end: worker processes on one PostgreSQL database against the real Dovecot.

Every poll a worker makes is logged with its start and finish; the test reads those logs to prove that no
account was ever polled by two workers at once, across a rolling restart (SIGTERM, then a new worker) and
across a worker killed with SIGKILL mid-poll (after an APPEND, before its record).
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.distributed_setup import (
    Fleet,
    WorkerProcess,
    cli,
    config_text,
    fresh_database,
    make_fleet,
    overlaps,
    poll_sessions,
    start_worker,
)
from tests.servers.dovecot import Dovecot

pytestmark = pytest.mark.integration

ACCOUNTS = 200
CRASH_DRIVER = ["-m", "tests.acceptance.crash_driver", "before-delivered-record", "40", "--"]


@pytest.fixture
def fleet(dovecot: Dovecot) -> Iterator[Fleet]:
    fleet = make_fleet(dovecot, ACCOUNTS, lambda index: 2 + index % 3)  # 599 messages in all
    try:
        yield fleet
    finally:
        fleet.remove()


def _wait_until_drained(fleet: Fleet, workers: list[WorkerProcess], timeout: float) -> datetime | None:
    """Until every source mailbox is empty; returns when the first worker was seen dead, if one died."""
    killed_at = None
    deadline = time.monotonic() + timeout
    pending = {user.name for user in fleet.sources}
    while pending and time.monotonic() < deadline:
        if killed_at is None and any(w.process.poll() is not None for w in workers):
            killed_at = datetime.now()
        pending = {name for name in pending if fleet.dovecot.maildir_count(name)}
        time.sleep(0.3)
    logs = "\n".join(w.text()[-3000:] for w in workers)
    assert not pending, f"{len(pending)} accounts still have mail; worker logs end:\n{logs}"
    return killed_at


def _wait_for_repolls(workers: list[WorkerProcess], accounts: int, timeout: float) -> None:
    """Until that many accounts were polled at least twice, so the overlap check has pairs to compare."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sessions = poll_sessions({w.name: w.text() for w in workers})
        if sum(n > 1 for n in Counter(s.account for s in sessions if s.end).values()) >= accounts:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {accounts} accounts were polled a second time")


def _restart(worker: WorkerProcess, config: Path, log_dir: Path) -> WorkerProcess:
    deadline = time.monotonic() + 40
    while worker.text().count("poll finished") < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker.stop() == 0, worker.text()[-3000:]
    return start_worker(config, f"{worker.name}-restarted", log_dir)


@pytest.mark.parametrize(
    ("workers", "kill"), [(2, False), (3, True)], ids=["2-workers-1-restarted", "3-workers-1-killed"]
)
def test_workers_deliver_every_message_once_and_never_poll_an_account_twice_at_once(
    dovecot: Dovecot, fleet: Fleet, postgres_url: str, tmp_path: Path, workers: int, kill: bool
) -> None:
    with fresh_database() as database:
        config = tmp_path / "config.toml"
        # Accounts drained early are polled again while others still deliver: many polls per account.
        config.write_text(config_text(fleet, database, poll_interval="3s"))
        upgraded = cli("--config", str(config), "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        synced = cli("--config", str(config), "accounts", "sync-config")
        assert synced.returncode == 0 and f"{ACCOUNTS} added" in synced.stdout, synced.stderr

        processes = [
            start_worker(config, f"w{index}", tmp_path, CRASH_DRIVER if kill and index == 0 else ())
            for index in range(workers)
        ]
        try:
            if not kill:
                # A rolling restart in the middle: w1 stops gracefully, a new worker takes its place.
                processes.append(_restart(processes[1], config, tmp_path))
            killed_at = _wait_until_drained(fleet, processes, timeout=75)
            _wait_for_repolls(processes, accounts=ACCOUNTS // 8, timeout=30)
        finally:
            codes = [process.stop() for process in processes]
        names = {p.name: f"{socket.gethostname()}:{p.process.pid}" for p in processes}
        logs = {p.name: p.text() for p in processes}
        status = cli("--config", str(config), "status", "--json")

    expected = [0] * len(processes)
    if kill:
        expected[0] = -9
        assert killed_at is not None
    assert codes == expected, "\n".join(text[-2000:] for text in logs.values())

    # Exactly once: every seeded message is in the destination one time, nothing else is.
    delivered = Counter(dovecot.imap_messages(fleet.destination.name))
    seeded = [message for mail in fleet.seeded.values() for message in mail]
    assert sum(delivered.values()) == len(seeded) == 599
    for original in seeded:
        assert sum(count for body, count in delivered.items() if original.rstrip() in body) == 1

    sessions = poll_sessions(logs)
    assert overlaps(sessions, killed_at) == []
    per_worker = Counter(session.worker for session in sessions if session.end is not None)
    assert set(per_worker) == set(names.values()), per_worker  # every worker did its share

    records = {record["account"]: record for record in json.loads(status.stdout)}
    assert all(records[user.name]["last_result"] == "ok" for user in fleet.sources)
    assert {records[user.name]["last_worker"] for user in fleet.sources} <= set(names.values())
    if kill:
        survivors = "\n".join(logs[name] for name in logs if name != "w0")
        assert "of a worker that stopped sending heartbeats: queued again" in survivors
        assert "recovered=1" in survivors  # the message appended just before the kill was not sent twice
        unfinished = [s for s in sessions if s.end is None]
        assert unfinished and all(s.worker == names["w0"] for s in unfinished)
        for session in unfinished:
            # The dead worker's account was polled again, to the end, by a live one.
            later = [s for s in sessions if s.account == session.account and s.start > session.start]
            assert any(s.end is not None and s.worker != names["w0"] for s in later)
            assert records[session.account]["last_worker"] != names["w0"]
