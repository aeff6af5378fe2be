"""The idle probe's ledger work (connector/ledger/idle.py) on SQLite: one read of a batch of accounts with
the counts the probe's rules need, and one write of their results with each lease passed through."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, update

from connector.ledger.database import open_database
from connector.ledger.idle import IdlePoll
from connector.ledger.models import AccountRow, LeaseRow, MessageRow
from connector.ledger.records import MessageState
from connector.ledger.store import Ledger
from tests.unit.poll.fakes import FakeClock

NOW = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
DELIVERED, PENDING = MessageState.DELIVERED.value, MessageState.PENDING.value


@pytest.fixture
def ledger(sqlite_url: str) -> Iterator[Ledger]:
    engine = open_database(sqlite_url)
    yield Ledger(engine, clock=FakeClock(NOW))
    engine.dispose()


def _account(ledger: Ledger, name: str, **fields: Any) -> int:
    account_id = ledger.account_id(name)
    assert account_id is not None
    if fields:
        with ledger.engine.begin() as connection:
            connection.execute(update(AccountRow).where(AccountRow.id == account_id).values(**fields))
    return account_id


def _messages(ledger: Ledger, account_id: int, *rows: dict[str, Any]) -> None:
    with ledger.engine.begin() as connection:
        for row in rows:
            values = {
                "account_id": account_id,
                "first_seen_at": NOW,
                "updated_at": NOW,
                "state": DELIVERED,
                **row,
            }
            connection.execute(insert(MessageRow).values(**values))


def _lease(
    ledger: Ledger, account_id: int, *, generation: int, host: str, pid: int, expires: datetime
) -> None:
    with ledger.engine.begin() as connection:
        connection.execute(
            insert(LeaseRow).values(
                account_id=account_id, generation=generation, holder=f"{host}:{pid}:abcd", host=host, pid=pid,
                acquired_at=expires - timedelta(minutes=2), expires_at=expires,
            )
        )  # fmt: skip


def _dead_pid() -> int:
    """A process id that no process has now (the probe's own host: a lease it left is free)."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


# --- read ---------------------------------------------------------------------------------------------------


def test_read_counts_each_accounts_messages_in_one_batch(ledger: Ledger) -> None:
    alice = _account(ledger, "alice")
    bob = _account(ledger, "bob", consecutive_failures=2, identity_note="UIDL 'x' twice", baseline_at=NOW)
    carol = _account(ledger, "carol", suspended_at=NOW, suspended_reason="refused")
    old, older = NOW - timedelta(days=3), NOW - timedelta(days=9)
    _messages(
        ledger, alice,
        {"uidl": "a1", "delivered_at": old},
        {"uidl": "a2", "delivered_at": older},
        {"uidl": "a3", "delivered_at": None},  # delivered, time not recorded
        {"uidl": "a4", "delivered_at": old, "missing_since": NOW, "missing_polls": 1},
        {"uidl": "a5", "state": PENDING},
        {"uidl": "a6", "state": MessageState.FAILED.value, "missing_since": NOW, "missing_polls": 2},
    )  # fmt: skip
    _messages(ledger, bob, {"uidl": "b1", "delivered_at": old})
    _messages(ledger, _account(ledger, "erin"), {"uidl": "e1", "delivered_at": old})
    views = ledger.idle.read(["alice", "bob", "carol", "dave"], NOW)
    assert set(views) == {"alice", "bob", "carol"}  # dave is not in the ledger; erin was not asked for
    a, b, c = views["alice"], views["bob"], views["carol"]
    assert (a.account_id, a.delivered, a.others, a.missing, a.undated) == (alice, 4, 2, 2, 1)
    assert a.oldest_delivery == older
    assert a.joined is not None and sorted(a.joined.split("\n")) == ["a1", "a2", "a3", "a4", "a5", "a6"]
    assert (a.suspended, a.noted, a.consecutive_failures, a.baseline_taken) == (False, False, 0, False)
    assert (b.account_id, b.delivered, b.others, b.missing, b.undated, b.joined) == (bob, 1, 0, 0, 0, "b1")
    assert (b.noted, b.consecutive_failures, b.baseline_taken, b.oldest_delivery) == (True, 2, True, old)
    assert (c.account_id, c.suspended, c.delivered, c.others, c.joined, c.oldest_delivery) == (
        carol, True, 0, 0, None, None
    )  # fmt: skip
    assert all(view.lease is None and view.lease_free for view in views.values())


@pytest.mark.parametrize("asked", [1, 2, 4, 5, 16, 17, 100, 101, 250])
def test_read_gives_each_account_asked_for_whatever_their_number(ledger: Ledger, asked: int) -> None:
    """The read's IN lists are compiled for a few lengths and padded to the next (connector/ledger/idle.py):
    every number of accounts up to a batch and beyond reads exactly the accounts asked for, each with its
    own messages; one asked for twice, or not in the ledger, changes nothing."""
    for n in range(0, 260, 2):  # every other account is in the ledger, with one message of its own
        _messages(ledger, _account(ledger, f"a{n}"), {"uidl": f"u{n}", "delivered_at": NOW})
    names = [f"a{n}" for n in range(asked)]
    views = ledger.idle.read([*names, names[0]] if asked > 1 else names, NOW)
    assert sorted(views) == sorted(name for n, name in enumerate(names) if n % 2 == 0)
    assert all(view.joined == "u" + name[1:] and view.delivered == 1 for name, view in views.items())


def test_read_finds_each_lease_and_whether_a_poll_may_take_it(ledger: Ledger) -> None:
    ids = {name: _account(ledger, name) for name in ("held", "expired", "dead", "mine")}
    later, earlier = NOW + timedelta(minutes=1), NOW - timedelta(seconds=1)
    _lease(ledger, ids["held"], generation=4, host="other-host", pid=1, expires=later)
    _lease(ledger, ids["expired"], generation=5, host="other-host", pid=1, expires=earlier)
    _lease(ledger, ids["dead"], generation=6, host=ledger.leases.host, pid=_dead_pid(), expires=later)
    _lease(ledger, ids["mine"], generation=7, host=ledger.leases.host, pid=os.getpid(), expires=later)
    views = ledger.idle.read(list(ids), NOW)
    assert {name: view.lease_free for name, view in views.items()} == {
        "held": False, "expired": True, "dead": True, "mine": False,
    }  # fmt: skip
    held = views["held"].lease
    assert held is not None and (held.account_id, held.generation, held.host, held.expires_at) == (
        ids["held"], 4, "other-host", later
    )  # fmt: skip


# --- record -------------------------------------------------------------------------------------------------


def _poll(ledger: Ledger, name: str, *, listed: int = 3) -> IdlePoll:
    view = ledger.idle.read([name], NOW)[name]
    return IdlePoll(
        view.account_id, view.lease, NOW - timedelta(seconds=2), NOW + timedelta(minutes=5), listed
    )


def test_record_writes_each_result_and_passes_each_lease_through(ledger: Ledger) -> None:
    first = _account(ledger, "first")  # no lease row yet: the write inserts it
    second = _account(ledger, "second")
    _lease(ledger, second, generation=3, host="other-host", pid=1, expires=NOW - timedelta(minutes=1))
    polls = [_poll(ledger, "first", listed=3), _poll(ledger, "second", listed=0)]
    assert ledger.idle.record(polls, NOW) == set()
    statuses = {s.name: s for s in ledger.statuses()}
    for name, listed in (("first", 3), ("second", 0)):
        status = statuses[name]
        assert (status.last_result, status.last_error, status.consecutive_failures) == ("ok", None, 0)
        assert (status.last_delivered, status.last_failed, status.last_deleted, status.last_listed) == (
            0, 0, 0, listed
        )  # fmt: skip
        assert status.last_poll_started_at == NOW - timedelta(seconds=2)
        assert status.last_poll_finished_at == NOW and status.last_success_at == NOW
        assert status.next_poll_at == NOW + timedelta(minutes=5)
    for account_id, generation in ((first, 1), (second, 4)):
        lease = ledger.leases.current(account_id)
        assert lease is not None and lease.generation == generation  # taken...
        assert (
            lease.host == ledger.leases.host and lease.expires_at == lease.acquired_at == NOW
        )  # ...released
    assert all(view.lease_free for view in ledger.idle.read(["first", "second"], NOW).values())


def test_record_skips_an_account_whose_lease_changed_since_the_read_as_busy(ledger: Ledger) -> None:
    taken = _account(ledger, "taken")
    appeared = _account(ledger, "appeared")
    _account(ledger, "quiet")
    _lease(ledger, taken, generation=2, host="other-host", pid=1, expires=NOW - timedelta(minutes=1))
    polls = [_poll(ledger, name) for name in ("taken", "appeared", "quiet")]
    # Meanwhile another poll took "taken" (the next generation) and one created "appeared"'s lease row.
    with ledger.engine.begin() as connection:
        connection.execute(
            update(LeaseRow)
            .where(LeaseRow.account_id == taken)
            .values(generation=3, expires_at=NOW + timedelta(minutes=2))
        )
    _lease(ledger, appeared, generation=1, host="other-host", pid=1, expires=NOW + timedelta(minutes=2))
    assert ledger.idle.record(polls, NOW) == {taken, appeared}
    statuses = {s.name: s for s in ledger.statuses()}
    assert statuses["quiet"].last_result == "ok"
    for name in ("taken", "appeared"):  # no result written: the other poll records its own
        assert (statuses[name].last_result, statuses[name].last_poll_finished_at) == (None, None)
    lease = ledger.leases.current(taken)  # the other poll's, untouched
    assert lease is not None and (lease.generation, lease.expires_at) == (3, NOW + timedelta(minutes=2))
