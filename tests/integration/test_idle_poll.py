"""The idle poll (issue 16): what it costs the ledger, counted, and the lease it takes with its first write.

An idle poll reads its account and lease row in one query, lists the server, and writes once: its start,
its result, and its lease taken and released, in one transaction. It starts no thread. A poll that does
write takes the lease with its first write, by compare-and-set on the row it read at its start: another
poll that took the account in between makes that write fail, and the poll is skipped as busy, having
written, delivered and deleted nothing.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from connector.config import Account
from connector.ledger.lease import LeaseBusyError, PollLease
from connector.ledger.models import LeaseRow
from connector.ledger.records import AccountStatus, MessageState
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from tests.integration.conftest import SyncFactory
from tests.ledger_statements import counted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration

TTL = timedelta(minutes=2)


@contextmanager
def threads_started() -> Iterator[list[str]]:
    started: list[str] = []
    original = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        started.append(thread.name)
        original(thread)

    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        yield started
    finally:
        threading.Thread.start = original  # type: ignore[method-assign]


def _idle_after_one_delivery(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> tuple[SyncEngine, Account, AccountStatus]:
    """A keeping account whose one message was delivered by a first poll (which created the account and
    its lease row): its next poll is idle. Also its status after that first poll."""
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"retention": "keep"})
    account = config.accounts[0]
    assert engine.poll(account).delivered == 1
    before = next(s for s in engine.ledger.statuses() if s.name == account.name)
    return engine, account, before


def test_an_idle_poll_reads_its_account_once_and_writes_once_without_a_thread(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    engine, account, before = _idle_after_one_delivery(dovecot, mail_users, make_sync)
    with counted(engine.ledger.engine) as seen, threads_started() as threads:
        result = engine.poll(account)
    assert (result.status, result.delivered, result.deleted) == ("ok", 0, 0)
    assert threads == []
    # One write: the lease taken and released in one statement, the poll's start and result in another.
    assert seen.writes() == [["UPDATE leases SET", "UPDATE accounts SET"]]
    # Before it, the account with its lease row in one query, then the listing's read of the messages.
    first, *listing = seen.reads()
    assert first == ["SELECT accounts.id, accounts.suspended_at,"]
    assert all("leases" not in s for read in listing for s in read)
    assert len(seen.committed) == 2 + len(listing)
    lease = engine.ledger.leases.current(engine.ledger.account_id(account.name) or 0)
    assert lease is not None and lease.generation == 2  # taken by each poll, and released
    assert lease.expires_at <= lease.acquired_at + timedelta(seconds=5)
    status = next(s for s in engine.ledger.statuses() if s.name == account.name)
    assert status.last_poll_started_at is not None and status.last_poll_finished_at is not None
    assert before.last_poll_started_at is not None and before.last_poll_finished_at is not None
    assert before.last_poll_finished_at <= status.last_poll_started_at <= status.last_poll_finished_at


def test_an_idle_poll_logs_nothing_at_info_a_delivering_one_does(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An idle poll's lines are DEBUG (``PollResult.idle``): at INFO, 100,000 idle accounts would log more
    than journald lets through by default."""
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"retention": "keep"})
    account = config.accounts[0]
    with caplog.at_level(logging.DEBUG, logger="connector"):
        delivering = engine.poll(account)
        caplog_delivering = [(r.levelno, r.getMessage()) for r in caplog.records]
        caplog.clear()
        idle = engine.poll(account)
    assert delivering.delivered == 1 and not delivering.idle and idle.idle
    assert (logging.INFO, f"account {account.name}: 1 on server, 1 to deliver (1 new, 0 left for later "
            "polls), 0 to delete, 0 quarantined") in caplog_delivering  # fmt: skip
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert any("1 on server, 0 to deliver" in r.getMessage() for r in caplog.records)  # at DEBUG


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_an_idle_polls_write_alone_commits_without_its_own_fsync(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, database: str
) -> None:
    """Its result and lease record no message's fate: SQLite commits it with synchronous=NORMAL, and the
    connection is back at FULL for every other write (a delivery's, the flush before a DELE)."""
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"retention": "keep"})
    account = config.accounts[0]
    with counted(engine.ledger.engine) as delivering:
        assert engine.poll(account).delivered == 1
    assert "PRAGMA synchronous=NORMAL" not in delivering.sent  # a delivery's commits each fsync
    with counted(engine.ledger.engine) as idle:
        assert engine.poll(account).status == "ok"
    write = idle.sent.index("BEGIN IMMEDIATE")
    assert idle.sent[write - 1 :] == [
        "PRAGMA synchronous=NORMAL",
        "BEGIN IMMEDIATE",
        *idle.sent[write + 1 : write + 3],
        "COMMIT",
        "PRAGMA synchronous=FULL",
    ]
    assert [s.split()[:2] for s in idle.sent[write + 1 : write + 3]] == [
        ["UPDATE", "leases"],
        ["UPDATE", "accounts"],
    ]
    with engine.ledger.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL again


def test_a_delivering_poll_takes_the_lease_with_its_first_write(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"retention": "keep"})
    with counted(engine.ledger.engine) as seen:
        assert engine.poll(config.accounts[0]).delivered == 1
    writes = seen.writes()
    # The account's first poll: its row, then "pending" with the lease's first row and the poll's start,
    # then "delivered" with the result and the lease's release.
    assert writes[0] == ["INSERT INTO accounts"]
    assert writes[1][:2] == ["UPDATE leases SET", "INSERT INTO leases"]
    assert "INSERT INTO messages" in writes[1]
    assert writes[2][0] == "UPDATE leases SET" and len(writes) == 3


def _taken_meanwhile(engine: SyncEngine, name: str) -> list[PollLease]:
    """Another process takes the account after this poll's start read and before its first write."""
    ledger = engine.ledger
    original = ledger.known_to_plan
    taken: list[PollLease] = []

    def take_then_read(account_id: int, *args: Any) -> Any:
        lease = Ledger(ledger.engine).leases.take_for_poll(account_id, name, TTL)
        assert isinstance(lease, PollLease)
        taken.append(lease)
        return original(account_id, *args)

    ledger.known_to_plan = take_then_read  # type: ignore[method-assign]
    return taken


@pytest.mark.parametrize("retention", ["keep", "delete"])
def test_a_poll_whose_account_was_taken_before_its_first_write_does_nothing(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, retention: str
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"retention": retention})
    account = config.accounts[0]
    engine.ledger.account_id(account.name)
    taken = _taken_meanwhile(engine, account.name)
    try:
        result = engine.poll(account)
    finally:
        for lease in taken:
            lease.close()
    assert len(taken) == 1
    assert result.status == "busy" and result.error is not None
    assert result.error.startswith(f"account {account.name} is being polled by PID ")
    assert (result.delivered, result.deleted) == (0, 0)
    assert dovecot.imap_messages(mail_users.destination.name) == []
    assert dovecot.maildir_count(mail_users.source.name) == 1
    # What it deferred (its start) went with it: no later poll of this process writes it late.
    assert not engine.ledger._deferred.get(engine.ledger.account_id(account.name) or 0)
    ledger = Ledger(engine.ledger.engine)
    assert ledger.known_messages(ledger.account_id(account.name) or 0) == {}
    status = next(s for s in ledger.statuses() if s.name == account.name)
    assert (status.last_result, status.last_poll_started_at, status.consecutive_failures) == (None, None, 0)


def test_an_idle_poll_taken_over_before_its_result_writes_nothing(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    engine, account, before = _idle_after_one_delivery(dovecot, mail_users, make_sync)
    taken = _taken_meanwhile(engine, account.name)
    try:
        result = engine.poll(account)
    finally:
        for lease in taken:
            lease.close()
    assert result.status == "busy"
    # Its deferred start went with it: no later poll of this process writes it.
    assert not engine.ledger._deferred.get(engine.ledger.account_id(account.name) or 0)
    after = next(s for s in engine.ledger.statuses() if s.name == account.name)
    assert after.last_poll_finished_at == before.last_poll_finished_at
    assert after.last_poll_started_at == before.last_poll_started_at


def test_the_lease_taken_by_the_first_write_is_renewed_and_released(
    ledger_engine: Engine, request: pytest.FixtureRequest
) -> None:
    ledger, other = Ledger(ledger_engine), Ledger(ledger_engine)
    account_id = ledger.account_id(f"idle-{request.node.name}-{id(ledger)}")
    assert account_id is not None
    state = ledger.poll_start(f"idle-{request.node.name}-{id(ledger)}")
    assert state is not None and state.lease is None
    with threads_started() as threads:
        lease = ledger.leases.reserve_for_poll(account_id, "alice", TTL, state.lease)
        assert isinstance(lease, PollLease)
        # Reserved, not taken: nothing written, nobody kept out, no renewer.
        assert ledger.leases.current(account_id) is None and threads == []
        ledger.record_pending(account_id, "U1", pop_size=1, size=1, message_id="m", sha256="s")
    current = ledger.leases.current(account_id)
    assert current is not None and current.generation == 1
    assert threads == ["lease renewer"]
    assert not isinstance(other.leases.take_for_poll(account_id, "alice", TTL), PollLease)
    ledger.record_delivered(account_id, "U1", "ref")
    lease.close()
    assert ledger.known_messages(account_id)["U1"].state == MessageState.DELIVERED
    after = other.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(after, PollLease) and after.generation == 2
    after.close()


@pytest.mark.parametrize("meanwhile", ["first row inserted", "taken", "renewed by its holder"])
def test_the_first_write_takes_only_the_lease_it_saw_free(
    ledger_engine: Engine, request: pytest.FixtureRequest, meanwhile: str
) -> None:
    """Compare-and-set: anyone who inserted, took or renewed the lease after this poll's start read makes
    the poll's first write fail (``LeaseBusyError``), and that write leaves nothing behind."""
    name = f"idle-{request.node.name}-{id(request)}"
    # Three processes: this poll's, a stalled one's, and another that takes the account over.
    ledger, stalled, other = Ledger(ledger_engine), Ledger(ledger_engine), Ledger(ledger_engine)
    account_id = ledger.account_id(name)
    assert account_id is not None
    if meanwhile != "first row inserted":  # a lease row from an earlier poll, expired (a stalled holder)
        earlier = stalled.leases.take_for_poll(account_id, name, TTL)
        assert isinstance(earlier, PollLease)
        earlier._stop_renewer()
        with ledger_engine.begin() as connection:
            connection.execute(
                update(LeaseRow)
                .where(LeaseRow.account_id == account_id)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
    state = ledger.poll_start(name)
    assert state is not None
    lease = ledger.leases.reserve_for_poll(account_id, name, TTL, state.lease)
    assert isinstance(lease, PollLease)
    if meanwhile == "renewed by its holder":
        earlier.confirm()  # the stalled poll woke up: its lease is live again
    else:
        taken = other.leases.take_for_poll(account_id, name, TTL)
        assert isinstance(taken, PollLease)
    with pytest.raises(LeaseBusyError, match=re.escape(f"account {name} is being polled by PID ")):
        ledger.record_pending(account_id, "U1", pop_size=1, size=1, message_id="m", sha256="s")
    lease.close()
    assert ledger.known_messages(account_id) == {}


def test_two_polls_of_one_process_do_not_both_start(
    ledger_engine: Engine, request: pytest.FixtureRequest
) -> None:
    """The first has not written yet (nothing in the ledger says it polls): the second is busy all the
    same, and the first's writes stay fenced by its own lease."""
    name = f"idle-{request.node.name}-{id(request)}"
    ledger = Ledger(ledger_engine)
    account_id = ledger.account_id(name)
    assert account_id is not None
    first = ledger.leases.reserve_for_poll(account_id, name, TTL, None)
    assert isinstance(first, PollLease)
    for second in (
        ledger.leases.reserve_for_poll(account_id, name, TTL, None),
        ledger.leases.take_for_poll(account_id, name, TTL),
    ):
        assert not isinstance(second, PollLease)
        assert second.pid == os.getpid()
    assert ledger.leases.current(account_id) is None  # the refused take wrote nothing
    ledger.record_pending(account_id, "U1", pop_size=1, size=1, message_id="m", sha256="s")
    current = ledger.leases.current(account_id)
    assert current is not None and current.generation == first.generation == 1
    first.close()
