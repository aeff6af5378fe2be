"""The poll lease on real databases: taken in one write transaction, fencing every write of its poll."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, update

from connector.ledger.database import open_database
from connector.ledger.lease import LeaseLostError, PollLease
from connector.ledger.models import LeaseRow
from connector.ledger.store import Ledger
from connector.policies.lease import LeaseHeld

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
