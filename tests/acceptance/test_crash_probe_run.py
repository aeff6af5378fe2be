"""SIGKILL of `pop-connector run` in the idle probe, after some of its cycles, with full polls of other
accounts mid-delivery.

test_crash_probe.py kills `sync`, whose probe sees each account once. In `run` the probe's thread
(connector/poll/feeder.py) and the pool of full polls work side by side cycle after cycle: the scheduler
hands each due account to the probe, which records the idle ones in batches and hands the others to the
pool. Here every account polls each second (``poll_interval = "1s"``), the accounts and the stalled full
polls are test_crash_probe.py's (probe_rig.py, crash_driver.py), and the service is killed once its probe
has recorded some account twice (so a cycle went round with the full polls stalled): inside a batch write of
idle polls (its statements executed, not committed), and at a probe session's UIDL reply (no QUIT sent).

After the kill: nothing lost, nothing twice; each of the three accounts with new mail has a message stored
by its stalled full poll and not recorded (``pending``); the ledger holds exactly the idle polls whose batch
committed (each lease's generation is one more per poll) and nothing of the killed batch; every lease still
held is the dead process's. Then `sync`: each stalled message recovered (found, not appended again), all
mail delivered exactly once, every lease released.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli
from tests.acceptance.probe_rig import Rig, check_reruns, ids, kill_at, numbers, probe_rig
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance

# The shortest poll_interval the configuration takes: the service's cycles come each second.
POLL_INTERVAL = "1s"


@pytest.fixture
def rig(
    request: pytest.FixtureRequest, tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers
) -> Iterator[Rig]:
    with probe_rig(request.param, tmp_path, dovecot, mail_users, poll_interval=POLL_INTERVAL) as made:
        yield made


@pytest.mark.parametrize(
    ("point", "nth", "rig"),
    [
        # The 5th batch write: the 4 before it committed at least 4 polls of the 3 idle accounts.
        ("inside-idle-record", 5, "sqlite"),
        # The 10th UIDL reply: 5 in the first cycle (the idle and the fresh accounts; the busy one is not
        # probed), then 3 a cycle (the idle ones; the others' full polls are stalled): the third cycle.
        ("probe-after-uidl", 10, "sqlite"),
        # PostgreSQL must roll back the dead connection's transaction (and free its rows' locks) by itself.
        ("inside-idle-record", 5, "postgresql"),
    ],
    indirect=["rig"],
)
def test_run_killed_in_the_idle_probe_then_sync_delivers_exactly_once(
    rig: Rig, run_cli: RunCli, point: str, nth: int
) -> None:
    done = kill_at(run_cli, rig, point, nth, "run")
    before, found, pid, after, names = done.before, done.found, done.pid, done.after, done.names
    unrecorded = done.unrecorded
    idle = {account.name for account in rig.of("idle")}

    # Every account with new mail is mid-delivery: the probe handed the fresh ones over, and each full poll
    # stored a message and stalled, its lease held.
    with_mail = {account.name for account in rig.of("fresh") + rig.of("busy")}
    assert {name for name, count in unrecorded.items() if count} == with_mail, unrecorded
    for name in with_mail:
        assert after[name]["lease"]["pid"] == pid and after[name]["lease"]["expires_at"] > done.killed_at

    # The service's cycles went round before the kill: only idle accounts recorded, one of them twice.
    recorded = {names[account_id]: count for account_id, count in numbers(found, "recorded").items()}
    assert set(recorded) <= idle and max(recorded.values(), default=0) >= 2, found

    # The ledger holds exactly the committed batches: each idle poll recorded passed the lease through
    # (its generation one more, released as taken, by the dead process), the others left nothing.
    for name in idle:
        row, was, count = after[name], before[name], recorded.get(name, 0)
        assert row["lease"]["generation"] == was["lease"]["generation"] + count, (name, count, row)
        if count:
            assert row["last_poll_finished_at"] >= done.started and row["last_result"] == "ok", (name, row)
            assert row["lease"]["pid"] == pid and row["lease"]["expires_at"] == row["lease"]["acquired_at"]
        else:
            assert row["last_poll_finished_at"] == was["last_poll_finished_at"], (name, row)
            assert row["lease"] == was["lease"], (name, row)

    if point == "inside-idle-record":
        # The killed batch: its compare-and-sets made, not committed, so none of it is in the ledger.
        batch = {names[account_id] for account_id in ids(found, "accounts")}
        assert batch and batch <= idle, found
        assert f"; {len(batch)} lease rows taken, not committed" in found, found
        for account_id, generation in numbers(found, "generations").items():
            assert after[names[account_id]]["lease"]["generation"] == generation - 1, (found, after)

    # (The sync after that, every account idle, is test_crash_probe.py's: nothing of it is `run`'s, and it
    # would cost each test here two seconds.)
    check_reruns(run_cli, rig, unrecorded, done.killed_at, once_more=False)
