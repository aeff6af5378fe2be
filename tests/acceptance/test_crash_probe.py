"""SIGKILL of `pop-connector sync` in the idle probe, with full polls of other accounts mid-delivery.

The crash suites (test_crash.py, test_crash_random.py) kill full polls; here `sync` is killed in the
probe (connector/poll/probe.py): before its batch write of idle polls (connector/ledger/idle.py, the
transaction not begun), inside it (its statements executed, not committed), just after its commit (the
observers not told yet), and at a session's UIDL reply (the probe's other sessions in flight, no QUIT
sent). Six accounts on Dovecot, one destination (probe_rig.py): three idle ones (`keep`) that the probe
records, two with new mail that it hands over to the full poll, and one with more mail that is polled in
full from the start (its last poll delivered mail). At each kill every full poll is stalled after its first
APPEND (the message stored, its `delivered` record not written, its lease held): see crash_driver.py.
test_crash_probe_run.py kills `run` the same way, after some of its cycles.

After the kill: nothing lost, nothing twice, nothing gone from the POP3 server that is not in the
destination; the probe's batch is in the ledger whole or not at all; every lease still held is the dead
process's (free at once on this host: docs/reliability.md, "Two processes on one account") and ends within
`lease_ttl`. Then `sync` again: no account skipped as busy, each stalled message recovered (found, not
appended again), everything delivered exactly once; and once more: every account idle.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli
from tests.acceptance.probe_rig import Rig, check_reruns, ids, kill_at, probe_rig
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance


@pytest.fixture
def rig(
    request: pytest.FixtureRequest, tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers
) -> Iterator[Rig]:
    with probe_rig(request.param, tmp_path, dovecot, mail_users) as made:
        yield made


@pytest.mark.parametrize(
    ("point", "rig"),
    [
        ("before-idle-record", "sqlite"),
        ("inside-idle-record", "sqlite"),
        ("after-idle-record", "sqlite"),
        ("probe-after-uidl", "sqlite"),
        # Where the database matters: PostgreSQL must roll back the dead connection's transaction (and
        # free its rows' locks) by itself.
        ("inside-idle-record", "postgresql"),
    ],
    indirect=["rig"],
)
def test_killed_in_the_idle_probe_then_rerun_delivers_exactly_once(
    rig: Rig, run_cli: RunCli, point: str
) -> None:
    done = kill_at(run_cli, rig, point, 1, "sync")
    before, found, after, names = done.before, done.found, done.after, done.names

    # The probe's batch: in the ledger whole, or not at all.
    if point == "probe-after-uidl":
        batch: set[str] = set()
        # The first UIDL reply: the sessions started with it (max_workers, 4) have not reached theirs.
        flight = re.search(r"; (\d+) probe sessions in flight", found)
        assert flight is not None and int(flight.group(1)) >= 2, found
    else:
        batch = {names[account_id] for account_id in ids(found, "accounts")}
        assert batch and batch <= {a.name for a in rig.of("idle")}, found
    if point == "inside-idle-record":
        assert f"; {len(batch)} lease rows taken, not committed" in found, found
    committed = batch if point == "after-idle-record" else set()
    if committed:
        assert "; busy ;" in found, found  # no lease changed since the read: every poll written
    for name in batch:
        row, was = after[name], before[name]
        if name in committed:
            assert row["last_poll_finished_at"] >= done.started and row["last_result"] == "ok"
            assert row["lease"]["generation"] == was["lease"]["generation"] + 1
            lease = row["lease"]
            assert lease["pid"] == done.pid and lease["expires_at"] == lease["acquired_at"]
        else:
            assert row["last_poll_finished_at"] == was["last_poll_finished_at"]
            assert row["lease"] == was["lease"]

    check_reruns(run_cli, rig, done.unrecorded, done.killed_at)
