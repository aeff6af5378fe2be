"""The poll lease on real databases: taken in one write transaction, fencing every write of its poll."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from connector import cli
from connector.ledger.database import open_database
from connector.ledger.lease import LeaseLostError, PollLease
from connector.ledger.models import LeaseRow
from connector.ledger.store import Ledger
from connector.ops.logs import ContextFilter, log_context
from connector.policies.lease import LeaseHeld
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration

TTL = timedelta(minutes=2)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))
    engine = open_database(url)
    yield engine
    engine.dispose()


def _account(ledger: Ledger, request: pytest.FixtureRequest) -> int:
    # Tests share the session's PostgreSQL database: an account of their own.
    account_id = ledger.account_id(f"lease-{request.node.name}-{os.urandom(3).hex()}")
    assert account_id is not None
    return account_id


def _expire(engine: Engine, account_id: int) -> None:
    """What a stall longer than the lease's time to live looks like to the others."""
    with engine.begin() as connection:
        connection.execute(
            update(LeaseRow)
            .where(LeaseRow.account_id == account_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_one_poll_holds_the_lease_the_next_gets_it_after_the_release(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    first, second = Ledger(engine), Ledger(engine)
    account_id = _account(first, request)
    lease = first.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(lease, PollLease) and lease.generation == 1
    busy = second.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(busy, LeaseHeld)
    assert busy.pid == os.getpid() and busy.host == first.leases.host
    assert f"being polled by PID {os.getpid()} on host {busy.host} since " in busy.describe("alice")
    lease.close()
    after = second.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(after, PollLease) and after.generation == 2
    after.close()


def test_a_poll_whose_lease_was_taken_over_writes_nothing_more(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    stalled, other = Ledger(engine), Ledger(engine)
    account_id = _account(stalled, request)
    lease = stalled.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(lease, PollLease)
    stalled.record_pending(account_id, "U1", pop_size=10, size=10, message_id=None, sha256=None)
    stalled.record_delivered(account_id, "U1", "ref-1", defer=True)

    _expire(engine, account_id)
    takeover = other.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(takeover, PollLease) and takeover.generation == lease.generation + 1

    # The deferred "delivered" and a new "pending" are both refused, and rolled back.
    with pytest.raises(LeaseLostError, match="lost its lease"):
        stalled.record_pending(account_id, "U2", pop_size=10, size=10, message_id=None, sha256=None)
    with pytest.raises(LeaseLostError):
        stalled.flush(account_id)  # the check before a DELE
    with pytest.raises(LeaseLostError):
        lease.confirm()  # the check before QUIT
    known = other.known_messages(account_id)
    assert set(known) == {"U1"} and known["U1"].state.value == "pending"
    lease.close()  # releases nothing: the lease is the other poll's
    # The new holder's writes go through, and its lease is untouched by the stalled poll's close.
    other.record_delivered(account_id, "U1", "ref-1")
    assert other.known_messages(account_id)["U1"].state.value == "delivered"
    assert isinstance(Ledger(engine).leases.take_for_poll(account_id, "alice", TTL), LeaseHeld)
    takeover.close()


def test_the_flush_before_a_dele_checks_the_lease_even_with_nothing_deferred(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    ledger, other = Ledger(engine), Ledger(engine)
    account_id = _account(ledger, request)
    lease = ledger.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(lease, PollLease)
    ledger.flush(account_id)
    _expire(engine, account_id)
    takeover = other.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(takeover, PollLease)
    with pytest.raises(LeaseLostError):
        ledger.flush(account_id)
    lease.close()
    takeover.close()


def test_the_renewer_keeps_the_lease_of_a_poll_that_writes_nothing(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    """A long RETR writes nothing to the ledger: the lease must outlive its first time to live."""
    ledger = Ledger(engine)
    account_id = _account(ledger, request)
    ttl = timedelta(seconds=3)
    lease = ledger.leases.take_for_poll(account_id, "alice", ttl)
    assert isinstance(lease, PollLease)
    deadline = time.monotonic() + 2 * ttl.total_seconds()
    while time.monotonic() < deadline:
        assert isinstance(Ledger(engine).leases.take_for_poll(account_id, "alice", ttl), LeaseHeld)
        time.sleep(0.5)
    ledger.record_pending(account_id, "U1", pop_size=1, size=1, message_id=None, sha256=None)
    lease.close()


def test_the_lease_of_a_process_gone_from_this_host_is_free_at_once(
    engine: Engine, request: pytest.FixtureRequest
) -> None:
    ledger = Ledger(engine)
    account_id = _account(ledger, request)
    lease = ledger.leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(lease, PollLease)
    lease._stop_renewer()  # as a SIGKILL would: the row stays, nobody renews or releases it
    with engine.begin() as connection:
        # A PID that no process has: beyond the kernel's pid_max.
        connection.execute(update(LeaseRow).where(LeaseRow.account_id == account_id).values(pid=2**30))
    takeover = Ledger(engine).leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(takeover, PollLease) and takeover.generation == 2
    takeover.close()


def test_a_busy_account_is_skipped_untouched_and_not_counted_as_a_failure(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    config, engine = make_sync()
    account = config.accounts[0]
    other = Ledger(engine.ledger.engine)
    account_id = other.account_id(account.name)
    assert account_id is not None
    holding = other.leases.take_for_poll(account_id, account.name, TTL)
    assert isinstance(holding, PollLease)
    try:
        result = engine.poll(account)
    finally:
        holding.close()
    assert result.status == "busy" and result.error is not None
    assert result.error.startswith(f"account {account.name} is being polled by PID {os.getpid()} on host ")
    assert result.next_poll_at is not None
    assert dovecot.maildir_count(mail_users.source.name) == 3
    assert dovecot.imap_messages(mail_users.destination.name) == []
    status = next(s for s in other.statuses() if s.name == account.name)
    assert (status.last_result, status.consecutive_failures) == (None, 0)
    # Released: the next poll takes the lease and does the work.
    assert engine.poll(account).delivered == 3


def test_a_poll_taken_over_mid_way_sends_no_dele_and_no_quit(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    """After the 2nd delivery record another process takes the account over (this poll stalled past its
    lease): the next write is refused, and the server deletes nothing this poll asked for."""
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(5)])
    config, engine = make_sync()
    account = config.accounts[0]
    ledger = engine.ledger
    original = ledger.record_delivered
    calls = 0
    takeover: list[PollLease] = []

    def taken_over_after_second(account_id: int, *args: Any, **kwargs: Any) -> datetime:
        nonlocal calls
        calls += 1
        recorded = original(account_id, *args, **kwargs)
        if calls == 2:
            _expire(ledger.engine, account_id)
            lease = Ledger(ledger.engine).leases.take_for_poll(account_id, account.name, TTL)
            assert isinstance(lease, PollLease)
            takeover.append(lease)
        return recorded

    ledger.record_delivered = taken_over_after_second  # type: ignore[method-assign]
    try:
        result = engine.poll(account)
    finally:
        for lease in takeover:
            lease.close()
    assert result.status == "lease_lost", result
    assert result.error is not None and "lost its lease (generation 1) to another poll" in result.error
    assert result.deleted == 0
    # The stale poll's last deliveries stay ``pending``: the next poll looks for them before delivering.
    states = {m.state.value for m in ledger.known_messages(ledger.account_id(account.name) or 0).values()}
    assert "pending" in states
    assert dovecot.maildir_count(mail_users.source.name) == 5  # no DELE took effect: no QUIT was sent
    status = next(s for s in ledger.statuses() if s.name == account.name)
    assert status.last_result is None  # the poll that took over records the result, not this one


def test_baseline_waits_its_turn_while_a_poll_holds_the_account(
    dovecot: Dovecot,
    mail_users: MailUsers,
    make_sync: SyncFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync()
    account = config.accounts[0]
    account_id = engine.ledger.account_id(account.name)
    assert account_id is not None
    holding = engine.ledger.leases.take_for_poll(account_id, account.name, TTL)
    assert isinstance(holding, PollLease)
    try:
        code = cli.main(["--config", str(tmp_path / "config.toml"), "baseline", "--account", account.name])
    finally:
        holding.close()
    assert code == 1
    assert f"account {account.name} is being polled by PID {os.getpid()}" in capsys.readouterr().err
    assert engine.ledger.known_messages(account_id) == {}


def test_the_renewers_lines_name_the_account_of_the_poll(
    engine: Engine, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """The renewer is a thread of its own: what it logs must still say which account it is about."""
    ledger = Ledger(engine)
    account_id = _account(ledger, request)
    caplog.handler.addFilter(ContextFilter())
    with log_context("alice"):
        lease = ledger.leases.take_for_poll(account_id, "alice", timedelta(seconds=1.5))
    assert isinstance(lease, PollLease)
    _expire(engine, account_id)
    takeover = Ledger(engine).leases.take_for_poll(account_id, "alice", TTL)
    assert isinstance(takeover, PollLease)
    deadline = time.monotonic() + 10
    while not lease.lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    lease.close()
    takeover.close()
    [lost] = [
        record
        for record in caplog.records
        if record.name == "connector.lease" and "lease" in record.getMessage()
    ]
    assert getattr(lost, "account", None) == "alice", lost.getMessage()
