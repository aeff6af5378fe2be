"""Distributed workers and the idle probe (connector/service/distributed/worker.py, connector/poll/feeder.py).

A poll job whose account the probe may try hands it to the worker's probe thread and waits, under its
claim, for the verdict: an idle poll is the probe's (no full poll), and is recorded, logged and counted as
a full idle poll is; anything else is polled in full by the job. Against the real Dovecot and PostgreSQL,
with the worker's poll jobs run in this process (``DistributedWorker.poll_account``, as procrastinate
calls it) and the full polls (``SyncEngine.poll``) counted.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from connector.config import Account, load_config
from connector.ledger.database import open_database
from connector.ledger.models import AccountRow, LeaseRow
from connector.ledger.records import utcnow
from connector.poll.engine import SyncEngine
from connector.poll.probe import Done, IdleProbe, Take
from connector.poll.result import PollResult
from connector.service.distributed import ensure_queue_schema, sync_accounts
from connector.service.distributed.worker import DistributedWorker
from tests.distributed_setup import Fleet, config_text, fresh_database, make_fleet, message
from tests.servers.dovecot import Dovecot

pytestmark = pytest.mark.integration

# A poll job that has not ended after this long hangs (it never bounds a duration).
STALL_SECONDS = 120.0


@dataclass
class _Rig:
    """``fleet``'s accounts in a fresh database, their configuration, and the full polls counted."""

    fleet: Fleet
    engine: Engine
    config_file: Path
    full: Counter[str] = field(default_factory=Counter)
    workers: list[DistributedWorker] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [user.name for user in self.fleet.sources]

    def worker(self, probe_type: type[IdleProbe] = IdleProbe) -> DistributedWorker:
        worker = DistributedWorker(load_config(self.config_file), self.engine, probe_type=probe_type)
        self.workers.append(worker)
        return worker

    def poll(self, worker: DistributedWorker, *names: str) -> list[str]:
        """One poll job for each of ``names``, all at once, each account due first; their results."""
        with self.engine.begin() as connection:
            connection.execute(
                update(AccountRow)
                .where(AccountRow.name.in_(names))
                .values(next_poll_at=utcnow() - timedelta(seconds=1))
            )
        with ThreadPoolExecutor(len(names)) as jobs:
            running = [jobs.submit(worker.poll_account, name) for name in names]
            return [job.result(timeout=STALL_SECONDS) for job in running]

    def settle(self, worker: DistributedWorker) -> None:
        """Each account's first poll delivers its mail; the next finds nothing (both in full: an account
        whose last poll delivered is not probed). The next poll is the probe's."""
        for _ in range(2):
            assert self.poll(worker, *self.names) == ["ok"] * len(self.names)
        assert self.full == dict.fromkeys(self.names, 2)

    def seed(self, name: str, n: int) -> None:
        mail = [message(name, n)]
        self.fleet.dovecot.seed(name, mail)
        self.fleet.seeded[name] += mail

    def account_row(self, name: str) -> dict[str, Any]:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(*AccountRow.__table__.columns).where(AccountRow.name == name)
            ).one()
        return dict(row._mapping)

    def lease_row(self, name: str) -> dict[str, Any]:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(*LeaseRow.__table__.columns)
                .join(AccountRow, AccountRow.id == LeaseRow.account_id)
                .where(AccountRow.name == name)
            ).one()
        return dict(row._mapping)

    def assert_delivered_once(self) -> None:
        delivered = Counter(self.fleet.dovecot.imap_messages(self.fleet.destination.name))
        seeded = [mail for messages in self.fleet.seeded.values() for mail in messages]
        assert sum(delivered.values()) == len(seeded)
        for original in seeded:
            assert sum(count for body, count in delivered.items() if original.rstrip() in body) == 1


@pytest.fixture
def make_rig(
    dovecot: Dovecot, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[int], _Rig]]:
    rigs: list[_Rig] = []
    fleets: list[Fleet] = []
    full: Counter[str] = Counter()
    full_poll = SyncEngine.poll

    def counted(self: SyncEngine, account: Account, **kwargs: Any) -> PollResult:
        full[account.name] += 1
        return full_poll(self, account, **kwargs)

    monkeypatch.setattr(SyncEngine, "poll", counted)

    with fresh_database() as url:
        engine = open_database(url)
        ensure_queue_schema(engine)

        def factory(accounts: int) -> _Rig:
            fleet = make_fleet(dovecot, accounts, lambda _index: 1)
            fleets.append(fleet)
            config_file = tmp_path / "config.toml"
            config_file.write_text(config_text(fleet, url, poll_interval="1h"))
            sync_accounts(engine, load_config(config_file).accounts)
            rig = _Rig(fleet, engine, config_file, full)
            rigs.append(rig)
            return rig

        try:
            yield factory
        finally:
            for rig in rigs:
                for worker in rig.workers:
                    worker.stop.set()  # its probe's thread ends
            engine.dispose()
            for fleet in fleets:
                fleet.remove()


class _Refusing(IdleProbe):
    """A probe that tries no account: every poll of its worker is a full one (as before the probe)."""

    def refusal(self, account: Account) -> str | None:
        return "the test polls this worker's accounts in full"


class _Broken(IdleProbe):
    """Takes the first accounts handed to it, then fails: a bug in the probe."""

    def serve(self, take: Take, done: Done, stop: threading.Event | None = None) -> None:
        while not take(10, 0.5):
            pass
        raise RuntimeError("a bug in the probe")


def _times_from_the_end(row: dict[str, Any], *left_out: str) -> dict[str, Any]:
    """An account row with each time as its distance from the poll's end in whole seconds (the clock is
    real, and the full poll reads it more than once), the poll's start only as "not after its end", and
    ``left_out`` left out."""
    finished = row["last_poll_finished_at"]
    assert isinstance(finished, datetime)
    shaped: dict[str, Any] = {}
    for key, value in row.items():
        if key in left_out:
            continue
        if key == "last_poll_started_at":
            value = value <= finished
        elif isinstance(value, datetime):
            value = round((value - finished).total_seconds())
        shaped[key] = value
    return shaped


def test_an_idle_poll_job_is_the_probes_and_writes_logs_and_counts_what_a_full_one_does(
    make_rig: Callable[[int], _Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """Two accounts alike: one polled in full by a worker without the probe, one by a worker with it.
    Their rows are the same but for who they are; the probed one had no full poll."""
    rig = make_rig(2)
    full_worker, probing = rig.worker(_Refusing), rig.worker()
    rig.settle(full_worker)
    in_full, probed = rig.names
    generation = rig.lease_row(probed)["generation"]
    caplog.set_level(logging.INFO, logger="connector.service.distributed.worker")
    caplog.clear()

    assert rig.poll(full_worker, in_full) == ["ok"]
    assert rig.poll(probing, probed) == ["ok"]
    assert rig.full == {in_full: 3, probed: 2}  # the probe's poll was not a full one

    shapes = [
        _times_from_the_end(rig.account_row(name), "id", "name", "created_at") for name in (in_full, probed)
    ]
    assert shapes[0] == shapes[1]
    row = rig.account_row(probed)
    assert (row["last_result"], row["consecutive_failures"], row["last_listed"], row["last_delivered"]) == (
        "ok", 0, 0, 0)  # fmt: skip
    assert row["next_poll_at"] - row["last_poll_finished_at"] == timedelta(hours=1)
    assert row["last_worker"] == probing.name
    # The lease taken (its generation moves on) and released in the same write, as the full poll's.
    leases = [rig.lease_row(name) for name in (in_full, probed)]
    assert leases[1]["generation"] == generation + 1
    assert all(lease["acquired_at"] <= lease["expires_at"] <= utcnow() for lease in leases)
    left_out = ("account_id", "holder", "acquired_at", "expires_at")
    assert [{k: v for k, v in lease.items() if k not in left_out} for lease in leases] == [
        {k: v for k, v in leases[1].items() if k not in left_out}
    ] * 2

    # Logged and counted as every poll of a worker is: the lines the distributed tests read, the poll
    # and its scheduling lag in the worker's metrics, nothing left in progress.
    worker_lines = [record.getMessage() for record in caplog.records if record.name.endswith(".worker")]
    assert f"account {probed}: poll started on worker {probing.name}" in worker_lines
    assert f"account {probed}: poll finished on worker {probing.name}: ok" in worker_lines
    registry = probing.observers.metrics.registry
    assert registry.get_sample_value("pop_connector_polls_total", {"result": "ok"}) == 1
    assert registry.get_sample_value("pop_connector_scheduling_lag_seconds_count") == 1
    assert registry.get_sample_value("pop_connector_polls_in_progress") == 0


def test_new_mail_is_handed_over_and_delivered_once_while_an_idle_account_is_probed(
    make_rig: Callable[[int], _Rig],
) -> None:
    """One worker, two accounts polled at once: the idle one is the probe's, the one with a new message
    goes from the probe to a full poll in its job, which delivers it once; then it is the probe's again."""
    rig = make_rig(2)
    worker = rig.worker()
    rig.settle(worker)
    idle, busy = rig.names
    rig.seed(busy, 7)

    assert rig.poll(worker, idle, busy) == ["ok", "ok"]
    assert rig.full == {idle: 2, busy: 3}
    assert rig.account_row(busy)["last_delivered"] == 1
    rig.assert_delivered_once()
    assert rig.fleet.dovecot.maildir_count(busy) == 0  # retention: deleted once delivered

    # Delivered last time: polled in full once, then the probe's again.
    assert rig.poll(worker, idle, busy) == ["ok", "ok"]
    assert rig.poll(worker, idle, busy) == ["ok", "ok"]
    assert rig.full == {idle: 2, busy: 4}
    rig.assert_delivered_once()


def test_the_accounts_of_a_probe_that_fails_are_polled_in_full_and_so_are_later_polls(
    make_rig: Callable[[int], _Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(3)
    worker = rig.worker(_Broken)
    # The first poll jobs go to the probe (it reads the ledger only after taking them), which fails:
    # those it took and those still queued for it are polled in full, each once.
    assert rig.poll(worker, *rig.names) == ["ok"] * 3
    assert rig.full == dict.fromkeys(rig.names, 1)
    assert caplog.text.count("idle probe failed") == 1
    rig.assert_delivered_once()
    # From then on every poll is a full one, idle ones too, after a reload as well.
    for _ in range(2):
        assert rig.poll(worker, *rig.names) == ["ok"] * 3
    rig.config_file.write_text(rig.config_file.read_text() + "\n")
    worker.watch.refresh()
    assert rig.poll(worker, *rig.names) == ["ok"] * 3
    assert rig.full == dict.fromkeys(rig.names, 4)
    assert caplog.text.count("idle probe failed") == 1


def _probe_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "idle-probe"}


class _Held(IdleProbe):
    """Takes the accounts handed to it and tells nothing until the worker stops (a probe whose sessions
    are still in flight)."""

    taken = threading.Event()

    def serve(self, take: Take, done: Done, stop: threading.Event | None = None) -> None:
        assert stop is not None
        while not take(10, 0.5):
            pass
        self.taken.set()
        stop.wait()


def test_a_stop_ends_the_probe_and_the_jobs_waiting_for_it_without_a_full_poll(
    make_rig: Callable[[int], _Rig],
) -> None:
    rig = make_rig(1)
    others = _probe_threads()  # other workers' of this process
    worker = rig.worker(_Held)
    (name,) = rig.names
    with ThreadPoolExecutor(1) as jobs:
        job = jobs.submit(rig.poll, worker, name)
        assert _Held.taken.wait(STALL_SECONDS)
        (probe,) = _probe_threads() - others
        worker.stop.set()  # as SIGTERM does
        assert job.result(timeout=STALL_SECONDS) == ["stopped"]
    assert rig.full == {}
    probe.join(STALL_SECONDS)  # it ends (a hang would be caught here)
    assert not probe.is_alive()
    # Not polled: still due, for the workers that stay.
    with rig.engine.connect() as connection:
        assert connection.scalar(select(AccountRow.next_poll_at).where(AccountRow.name == name)) < utcnow()


def test_after_a_reload_idle_polls_are_the_new_engines_probes_and_the_old_probe_ends(
    make_rig: Callable[[int], _Rig],
) -> None:
    """A changed configuration file gives the worker a new engine, and the engine a probe thread of its
    own, which probes the idle polls from then on; the old thread ends once its polls are done."""
    rig = make_rig(1)
    others = _probe_threads()  # other workers' of this process
    worker = rig.worker()
    rig.settle(worker)
    (name,) = rig.names
    assert rig.poll(worker, name) == ["ok"]
    (old,) = _probe_threads() - others
    rig.config_file.write_text(rig.config_file.read_text() + "\n# changed\n")
    assert rig.poll(worker, name) == ["ok"]
    assert rig.poll(worker, name) == ["ok"]
    assert rig.full == {name: 2}  # both probed, before the reload and after
    registry = worker.observers.metrics.registry
    assert registry.get_sample_value("pop_connector_polls_total", {"result": "ok"}) == 5
    old.join(STALL_SECONDS)
    assert not old.is_alive()
    (new,) = _probe_threads() - others - {old}
    assert new.is_alive()
