"""The idle probe (connector/poll/probe.py) against real servers: exactly once, and recorded as a full poll.

``poll_round`` probes the accounts the probe may try in one thread and records those whose listing is what
the ledger keeps in one batch write; anything else goes to the full poll (``SyncEngine.poll``). These
tests try to break the two promises that rest on that split: every message is delivered exactly once
whatever the probe saw, and a probed idle poll leaves the ledger (the account's row, its lease row) and the
observers as a full idle poll would. Dovecot (plain and POP3S) and Courier are the POP3 servers; the full
polls are counted through ``poll_round``'s ``full_poll``, and the connections (a login each) through a
proxy in front of the server where a test needs them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import poplib
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select, update

from connector.config import Account, Config, load_config
from connector.ledger.database import open_database
from connector.ledger.lease import PollLease
from connector.ledger.models import AccountRow, LeaseRow, MessageRow
from connector.ledger.records import LedgerView, MessageState
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from connector.poll.events import Finished, Planned, PollEvent, Started
from connector.poll.result import PollResult
from connector.poll.rounds import poll_round
from tests.configs import write_tables
from tests.delivery import assert_exactly_once, assert_nothing_lost
from tests.messages import simple
from tests.servers.courier import Courier
from tests.servers.dovecot import Dovecot, MailUser, MailUsers, make_test_ca
from tests.servers.fault_proxy import FaultProxy
from tests.unit.poll.fakes import FakeClock

pytestmark = pytest.mark.integration

TTL = timedelta(minutes=2)
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
_numbers = itertools.count(1)


class Source(Protocol):
    """The POP3 server's side the tests use: Dovecot or Courier."""

    host: str

    def seed(self, user: str, messages: list[bytes]) -> None: ...

    def maildir_count(self, user: str) -> int: ...


@dataclass
class Events:
    """An observer keeping every event."""

    seen: list[PollEvent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def notify(self, event: PollEvent) -> None:
        with self._lock:
            self.seen.append(event)

    def of(self, account: str) -> list[PollEvent]:
        with self._lock:
            return [event for event in self.seen if event.account == account]


@dataclass
class Rig:
    """Accounts (one POP3 user each) delivering into one Dovecot IMAP user, with a ledger of their own
    in the test's database; ``round`` is ``poll_round`` with the full polls counted in ``full``."""

    source: Source
    users: list[MailUser]
    destination: MailUser
    database: str
    build: Callable[[dict[str, Any]], Config]
    clock: FakeClock | None
    # In front of the POP3 server when the test counts connections (each one login).
    proxy: FaultProxy | None = None
    config: Config = field(init=False)
    engine: SyncEngine = field(init=False)
    events: Events = field(default_factory=Events)
    full: list[str] = field(default_factory=list)
    seeded: list[bytes] = field(default_factory=list)
    _engines: list[Engine] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reconfigure({})

    def reconfigure(self, overrides: dict[str, Any]) -> None:
        """A new configuration (``overrides`` on every account) and engine on the same ledger: a restart
        with a changed configuration."""
        self.config = self.build(overrides)
        self.engine = self.new_engine(observers=True)

    def new_engine(self, *, observers: bool = False) -> SyncEngine:
        """An engine with a ledger (and connection pool) of its own: another process's, to the ledger."""
        engine = open_database(self.database)
        self._engines.append(engine)
        clock = self.clock or (lambda: datetime.now(UTC))
        return SyncEngine(
            self.config,
            Ledger(engine, clock=clock),
            clock=clock,
            observers=[self.events] if observers else [],
        )

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()

    @property
    def accounts(self) -> list[Account]:
        return list(self.config.accounts)

    def name(self, index: int = 0) -> str:
        return self.accounts[index].name

    def round(
        self, accounts: Sequence[Account] | None = None, engine: SyncEngine | None = None
    ) -> list[PollResult]:
        engine = engine or self.engine

        def full_poll(account: Account) -> PollResult:
            self.full.append(account.name)
            return engine.poll(account)

        return poll_round(
            engine, self.accounts if accounts is None else accounts, workers=4, full_poll=full_poll
        )

    def seed(self, index: int = 0, count: int = 1) -> list[bytes]:
        messages = [simple(next(_numbers)) for _ in range(count)]
        self.source.seed(self.users[index].name, messages)
        self.seeded.extend(messages)
        return messages

    def account_id(self, index: int = 0) -> int:
        found = self.engine.ledger.account_id(self.name(index), create=False)
        assert found is not None
        return found

    def account_row(self, index: int = 0) -> dict[str, Any]:
        with self.engine.ledger.engine.connect() as connection:
            row = connection.execute(
                select(*AccountRow.__table__.columns).where(AccountRow.name == self.name(index))
            ).one()
        return dict(row._mapping)

    def lease_row(self, index: int = 0) -> dict[str, Any] | None:
        with self.engine.ledger.engine.connect() as connection:
            row = connection.execute(
                select(*LeaseRow.__table__.columns).where(LeaseRow.account_id == self.account_id(index))
            ).one_or_none()
        return None if row is None else dict(row._mapping)

    def message_rows(self, index: int = 0) -> list[dict[str, Any]]:
        with self.engine.ledger.engine.connect() as connection:
            rows = connection.execute(
                select(*MessageRow.__table__.columns)
                .where(MessageRow.account_id == self.account_id(index))
                .order_by(MessageRow.id)
            ).all()
        return [dict(row._mapping) for row in rows]

    def states(self, index: int = 0) -> dict[str, MessageState]:
        known = self.engine.ledger.known_messages(self.account_id(index))
        return {uidl: message.state for uidl, message in known.items()}


RigFactory = Callable[..., Rig]


def _without(row: dict[str, Any] | None, *names: str) -> dict[str, Any]:
    assert row is not None
    return {key: value for key, value in row.items() if key not in names}


@pytest.fixture
def make_rig(tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, database: str) -> Iterator[RigFactory]:
    """``make_rig(count=1, account={...}, clock=None, proxy=False, tls=False, source=None, each=None)``:
    ``count`` accounts on Dovecot's plain POP3 port (POP3S with ``tls``; or ``source``: ``(server, port,
    new_user)``), through a connection-counting proxy with ``proxy``; ``each``: fields per account."""
    rigs: list[Rig] = []
    users: list[str] = []
    proxies: list[FaultProxy] = []

    def factory(
        count: int = 1,
        account: dict[str, Any] | None = None,
        clock: FakeClock | None = None,
        proxy: bool = False,
        tls: bool = False,
        source: tuple[Source, int, Callable[[], MailUser]] | None = None,
        each: Sequence[dict[str, Any]] | None = None,
    ) -> Rig:
        if source is None:

            def new_user() -> MailUser:
                user = dovecot.new_user("src")
                users.append(user.name)
                return user

            port = dovecot.ports.pop3s if tls else dovecot.ports.pop3
            source = (dovecot, port, new_user)
        server, port, new_user = source
        sources = [new_user() for _ in range(count)]
        host = server.host
        if proxy:
            counting = FaultProxy(server.host, port).start()
            proxies.append(counting)
            host, port = counting.host, counting.port
        destination = {"name": "d", "type": "imap", "host": dovecot.host, "port": dovecot.ports.imap,
                       "tls": "none", "username": mail_users.destination.name,
                       "password": mail_users.destination.password}  # fmt: skip
        fields = {"host": host, "port": port, "tls": "none", "destination": "d", "timeout": "20s"}
        if tls:
            fields.update(tls="implicit", ca_file=str(dovecot.ca_file))
        fields.update(account or {})
        written = itertools.count()

        def build(overrides: dict[str, Any]) -> Config:
            own = each or [{} for _ in sources]
            tables = [
                {"name": user.name, "username": user.name, "password": user.password, **fields, **mine,
                 **overrides}
                for user, mine in zip(sources, own, strict=True)
            ]  # fmt: skip
            path = tmp_path / f"config-{len(rigs)}-{next(written)}.toml"
            return load_config(write_tables(path, database, [destination], tables))

        rig = Rig(
            server, sources, mail_users.destination, database, build, clock, proxies[-1] if proxy else None
        )
        rigs.append(rig)
        return rig

    yield factory
    for rig in rigs:
        rig.close()
    for proxy in proxies:
        proxy.stop()
    for name in users:
        dovecot.remove_user(name)


def _connections(rig: Rig) -> int:
    assert rig.proxy is not None
    return rig.proxy.connections


def _first_polls(rig: Rig) -> None:
    """Each account's first poll, in full: it delivers what was seeded and creates the ledger's rows; then
    a full poll that finds nothing, since an account whose last poll delivered mail is not probed (mail
    comes in bursts: policies/idle.py). The next poll is the probe's."""
    for account in rig.accounts:
        result = rig.engine.poll(account)
        assert result.status == "ok" and result.delivered, result.error
        settled = rig.engine.poll(account)
        assert settled.status == "ok" and settled.idle, settled.error


def _summary(result: PollResult) -> tuple[object, ...]:
    return (
        result.status,
        result.error,
        result.delivered,
        result.deleted,
        result.failed,
        result.listed,
        result.next_poll_at,
        result.idle,
    )


# --- 1. an idle account: recorded as a full idle poll, with no full poll --------------------------------


def test_a_probed_idle_poll_writes_what_a_full_idle_poll_writes(make_rig: RigFactory) -> None:
    """Two accounts alike, polled at the same instant: one in full, one by the probe. Their account rows
    and lease rows must be the same but for who they are (the lease's holder is random per poll)."""
    clock = FakeClock(T0)
    rig = make_rig(
        count=2, account={"retention": "keep", "poll_jitter": 0, "poll_interval": "7m"}, clock=clock
    )
    rig.seed(0)
    rig.seed(1)
    _first_polls(rig)
    # Forgotten (as by a poll that never got to its listing): the next poll's listing count must be written.
    ids = [rig.account_id(0), rig.account_id(1)]
    with rig.engine.ledger.engine.begin() as connection:
        connection.execute(update(AccountRow).values(last_listed=None).where(AccountRow.id.in_(ids)))
    generation = _without(rig.lease_row(1))["generation"]
    clock.advance(timedelta(minutes=10))
    rig.events.seen.clear()
    full = rig.engine.poll(rig.accounts[0])
    (probed,) = rig.round(rig.accounts[1:])
    assert rig.full == []
    assert _summary(probed) == _summary(full)
    assert probed.idle and probed.listed == 1
    assert _without(rig.account_row(1), "id", "name") == _without(rig.account_row(0), "id", "name")
    row = rig.account_row(1)
    assert (row["last_result"], row["last_error"], row["consecutive_failures"], row["last_listed"]) == (
        "ok", None, 0, 1)  # fmt: skip
    assert (row["last_delivered"], row["last_failed"], row["last_deleted"]) == (0, 0, 0)
    assert row["last_poll_started_at"] == row["last_poll_finished_at"] == row["last_success_at"] == clock.now
    assert row["next_poll_at"] == clock.now + timedelta(minutes=7)
    full_lease, probed_lease = rig.lease_row(0), rig.lease_row(1)
    assert _without(probed_lease, "account_id", "holder") == _without(full_lease, "account_id", "holder")
    assert probed_lease is not None
    # Taken (generation + 1) and released at once by the same write: free for the next poll.
    assert probed_lease["generation"] == generation + 1
    assert probed_lease["expires_at"] == probed_lease["acquired_at"] == clock.now
    assert probed_lease["pid"] == os.getpid()
    # The observers hear of it as of the full poll: Started, Planned (nothing), Finished.
    shapes = []
    for index in (0, 1):
        events = rig.events.of(rig.name(index))
        assert [type(event) for event in events] == [Started, Planned, Finished]
        planned, finished = events[1], events[2]
        assert isinstance(planned, Planned) and isinstance(finished, Finished)
        shapes.append(((planned.messages, planned.size, planned.to_delete), finished.planned))
        assert _summary(finished.result) == _summary(full if index == 0 else probed)
    assert shapes[0] == shapes[1] == ((0, 0, 0), 0)


def test_probed_idle_polls_of_many_accounts_with_the_real_clock(make_rig: RigFactory) -> None:
    """Several accounts in one batch: each recorded once, its times in order, no full poll, one
    connection each."""
    rig = make_rig(count=4, account={"retention": "keep"}, proxy=True)
    for index in range(4):
        rig.seed(index)
    _first_polls(rig)
    before = [rig.account_row(index) for index in range(4)]
    leases = [rig.lease_row(index) for index in range(4)]
    connections = _connections(rig)
    results = rig.round()
    assert rig.full == []
    assert _connections(rig) == connections + 4
    assert [result.account for result in results] == [account.name for account in rig.accounts]
    for index, result in enumerate(results):
        assert result.status == "ok" and result.idle and result.listed == 1, result.error
        row, lease, old = rig.account_row(index), rig.lease_row(index), leases[index]
        assert row["last_result"] == "ok" and row["consecutive_failures"] == 0 and row["last_listed"] == 1
        finished = row["last_poll_finished_at"]
        assert before[index]["last_poll_finished_at"] <= row["last_poll_started_at"] <= finished
        assert row["last_success_at"] == finished
        interval, jitter = rig.accounts[index].poll_interval, rig.accounts[index].poll_jitter
        assert finished + interval * (1 - jitter) <= row["next_poll_at"] <= finished + interval * (1 + jitter)
        assert row["next_poll_at"] == result.next_poll_at
        assert lease is not None and old is not None
        assert lease["generation"] == old["generation"] + 1
        # Released by the write that took it: expired already, so free for the next poll.
        assert row["last_poll_started_at"] <= lease["expires_at"] <= datetime.now(UTC)
        assert lease["holder"] != old["holder"]
        events = rig.events.of(rig.name(index))
        assert [type(event) for event in events[-3:]] == [Started, Planned, Finished]


# --- 2. a new message: handed over, delivered once; idle again afterwards -------------------------------


@pytest.mark.parametrize("retention", ["keep", "delete"])
def test_a_new_message_is_handed_over_and_delivered_once(
    make_rig: RigFactory, dovecot: Dovecot, retention: str
) -> None:
    rig = make_rig(account={"retention": retention})
    user = rig.users[0].name
    rig.seed()
    _first_polls(rig)
    assert _rounds_until_probed(rig) == 0
    rig.seed()
    full_before = len(rig.full)
    (result,) = rig.round()
    assert rig.full[full_before:] == [rig.name()]
    assert (result.status, result.delivered) == ("ok", 1), result.error
    assert_exactly_once(rig.seeded, dovecot.imap_messages(rig.destination.name))
    rows = rig.message_rows()
    if retention == "keep":
        assert [row["state"] for row in rows] == ["delivered", "delivered"]
        assert dovecot.maildir_count(user) == 2
    else:
        # Deleted from the server only after its delivery was recorded.
        (row,) = [row for row in rows if row["state"] == "deleted"]
        assert row["delivered_at"] is not None and row["deleted_at"] >= row["delivered_at"]
        assert dovecot.maildir_count(user) == 0
    assert result.deleted == (1 if retention == "delete" else 0)
    # The last poll delivered: one more full poll (which, with "delete", also forgets the deleted row, gone
    # from the listing), then the probe's.
    assert _rounds_until_probed(rig) == 1
    assert_exactly_once(rig.seeded, dovecot.imap_messages(rig.destination.name))


def _rounds_until_probed(rig: Rig, limit: int = 4) -> int:
    """Rounds of full polls (each idle) before a round in which no account is polled in full."""
    for rounds in range(limit):
        before = len(rig.full)
        results = rig.round()
        assert all(result.status == "ok" and result.idle for result in results), results
        if len(rig.full) == before:
            return rounds
    raise AssertionError(f"still polled in full after {limit} rounds")


# --- 3. a kept message removed by another client -------------------------------------------------------


def _dele_first(dovecot: Dovecot, user: MailUser) -> None:
    """Another POP3 client (a mail program with "leave on server" off) deletes the first message."""
    client = poplib.POP3(dovecot.host, dovecot.ports.pop3, timeout=20)
    try:
        client.user(user.name)
        client.pass_(user.password)
        client.dele(1)
    finally:
        client.quit()


def test_a_message_removed_by_another_client_is_counted_missing_as_without_the_probe(
    make_rig: RigFactory, dovecot: Dovecot
) -> None:
    clock = FakeClock(T0)
    rig = make_rig(count=2, account={"retention": "keep", "poll_jitter": 0}, clock=clock)
    for index in (0, 1):
        rig.seed(index, count=2)
    _first_polls(rig)
    for user in rig.users:
        _dele_first(dovecot, user)
    clock.advance(timedelta(minutes=10))
    full = rig.engine.poll(rig.accounts[0])
    (probed,) = rig.round(rig.accounts[1:])
    assert rig.full == [rig.name(1)]  # the listing is not what the ledger keeps: handed over
    assert _summary(probed) == _summary(full)
    assert probed.status == "ok" and probed.listed == 1
    assert _without(rig.account_row(1), "id", "name") == _without(rig.account_row(0), "id", "name")
    # The rows as the full poll left them without the probe; ids and UIDLs are each account's own.
    own = ("id", "account_id", "uidl", "message_id", "sha256", "header_hash", "size", "pop_size",
           "destination_ref")  # fmt: skip
    assert [_without(row, *own) for row in rig.message_rows(1)] == [
        _without(row, *own) for row in rig.message_rows(0)
    ]
    missing = [row for row in rig.message_rows(1) if row["missing_since"] is not None]
    assert len(missing) == 1 and missing[0]["missing_since"] == clock.now
    # While a row is missing the plan decides about it at every poll: no probe until it is forgotten.
    clock.advance(timedelta(minutes=10))
    (again,) = rig.round(rig.accounts[1:])
    assert again.status == "ok" and rig.full == [rig.name(1)] * 2


# --- 4 and 5. another process holds or takes the lease -------------------------------------------------


def test_an_account_another_process_polls_is_not_probed_and_recorded_busy(make_rig: RigFactory) -> None:
    rig = make_rig(account={"retention": "keep"}, proxy=True)
    rig.seed()
    _first_polls(rig)
    other = Ledger(rig.new_engine().ledger.engine)
    held = other.leases.take_for_poll(rig.account_id(), rig.name(), TTL)
    assert isinstance(held, PollLease)
    try:
        row, lease = rig.account_row(), rig.lease_row()
        connections = _connections(rig)
        (result,) = rig.round()
        # Not probed (no connection at all: the full poll too stops at the lease), and nothing written.
        assert _connections(rig) == connections
        assert rig.full == [rig.name()]
        assert result.status == "busy" and result.error is not None
        assert f"account {rig.name()} is being polled by PID {os.getpid()}" in result.error
        assert rig.account_row() == row and rig.lease_row() == lease
    finally:
        held.close()
    (after,) = rig.round()
    assert after.status == "ok" and after.idle and rig.full == [rig.name()]


@pytest.mark.parametrize("lease_row", [True, False])
def test_an_account_a_poll_of_this_process_holds_is_busy_and_unrecorded(
    make_rig: RigFactory, lease_row: bool
) -> None:
    """A poll of this very process (``run``'s scheduler, say) has reserved the account: nothing in the
    ledger says so before its first write (the lease row is free, or there is none yet), yet the probe
    must neither probe nor record a poll of it."""
    rig = make_rig(account={"retention": "keep"}, proxy=True)
    if lease_row:
        rig.seed()
        _first_polls(rig)
    else:
        rig.engine.ledger.account_id(rig.name())  # in the ledger, never polled: no lease row, nothing kept
    connections = _connections(rig)
    ledger = rig.engine.ledger
    seen = ledger.leases.current(rig.account_id())
    assert (seen is not None) == lease_row
    reserved = ledger.leases.reserve_for_poll(rig.account_id(), rig.name(), TTL, seen)
    assert isinstance(reserved, PollLease)
    row, lease = rig.account_row(), rig.lease_row()
    try:
        (result,) = rig.round()
    finally:
        reserved.close()
    assert result.status == "busy", result.error
    assert rig.account_row() == row and rig.lease_row() == lease
    # The read already says so: not probed (nor logged in by the full poll, which is busy).
    assert _connections(rig) == connections


@pytest.mark.parametrize(
    "meanwhile", ["taken", "taken and released", "first row inserted", "renewed by its stalled holder"]
)
def test_an_account_taken_between_the_probes_read_and_write_is_busy_and_unrecorded(
    make_rig: RigFactory, meanwhile: str
) -> None:
    """Another process takes the account after the probe read the ledger (and found the lease free) and
    before its write: the write's compare-and-set fails, the poll is ``busy`` and writes nothing. The same
    when a poll whose lease had expired (a stall) wakes up and renews it."""
    rig = make_rig(account={"retention": "keep"})
    if meanwhile == "first row inserted":
        rig.engine.ledger.account_id(rig.name())  # in the ledger, never polled: no lease row, nothing kept
        assert rig.lease_row() is None
    else:
        rig.seed()
        _first_polls(rig)
    other = Ledger(rig.new_engine().ledger.engine)
    stalled: list[PollLease] = []
    if meanwhile == "renewed by its stalled holder":
        lease = other.leases.take_for_poll(rig.account_id(), rig.name(), TTL)
        assert isinstance(lease, PollLease)
        lease._stop_renewer()
        stalled.append(lease)
        with rig.engine.ledger.engine.begin() as connection:
            connection.execute(
                update(LeaseRow)
                .where(LeaseRow.account_id == rig.account_id())
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
    idle = rig.engine.ledger.idle
    original = idle.read
    taken: list[PollLease] = []
    seen: list[dict[str, Any] | None] = []

    def read_then_take(names: Sequence[str], now: datetime) -> dict[str, LedgerView]:
        views = original(names, now)
        assert views[rig.name()].lease_free
        if stalled:
            stalled[0].confirm()  # the stalled poll woke up: its lease is live again
            taken.append(stalled[0])
            seen.append(rig.lease_row())
            return views
        lease = other.leases.take_for_poll(rig.account_id(), rig.name(), TTL)
        assert isinstance(lease, PollLease)
        taken.append(lease)
        if meanwhile == "taken and released":
            lease.close()  # a whole poll of the other process came and went
        seen.append(rig.lease_row())
        return views

    idle.read = read_then_take  # type: ignore[method-assign]
    row = rig.account_row()
    try:
        (result,) = rig.round()
    finally:
        del idle.read
        for lease in taken:
            lease.close()
    assert len(taken) == 1 and rig.full == []
    assert result.status == "busy" and result.error is not None
    assert "another poll took the account" in result.error
    assert rig.account_row() == row
    lease_now = rig.lease_row()
    assert lease_now is not None and seen[0] is not None
    # The other's lease (released at the end of the test if it was still held), not one the probe wrote.
    assert _without(lease_now, "expires_at") == _without(seen[0], "expires_at")
    events = rig.events.of(rig.name())
    assert [type(event) for event in events[-2:]] == [Started, Finished]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.planned is None and finished.result is result


# --- 6. two processes polling the same accounts while mail arrives -------------------------------------


def test_two_processes_polling_the_same_accounts_deliver_every_message_once(
    make_rig: RigFactory, dovecot: Dovecot
) -> None:
    """Two engines with ledgers of their own (two processes, to the ledger) start each round together:
    both probes find the same new messages and hand the same accounts over, and both full polls race for
    each account's lease; in every third round nothing new arrived, and both probes race to record the
    same idle polls. Every message is delivered once, and nothing is left undelivered."""
    retentions = ["keep", "delete", "keep", "delete"]
    rig = make_rig(count=len(retentions), each=[{"retention": retention} for retention in retentions])
    engines = [rig.new_engine(observers=True), rig.new_engine(observers=True)]
    rounds = itertools.count()
    chance = random.Random(16)

    def arrive() -> None:
        """Run by the barrier, once both processes are ready for their next round."""
        if next(rounds) % 3 != 2:
            for index in range(len(retentions)):
                rig.seed(index, count=chance.randint(1, 2))

    together = threading.Barrier(2, action=arrive, timeout=60)
    statuses: list[str] = []
    errors: list[BaseException] = []

    def process(engine: SyncEngine) -> None:
        try:
            for _ in range(6):
                together.wait()
                statuses.extend(result.status for result in rig.round(engine=engine))
        except BaseException as exc:  # reported below
            together.abort()
            errors.append(exc)

    threads = [threading.Thread(target=process, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    assert set(statuses) <= {"ok", "busy"}, statuses
    assert "busy" in statuses  # they did collide
    # What arrived after the last rounds: polled (in full or probed) until nothing is left.
    for _ in range(3):
        rig.round(engine=engines[0])
    assert_exactly_once(rig.seeded, dovecot.imap_messages(rig.destination.name))
    for index, retention in enumerate(retentions):
        left = dovecot.maildir_count(rig.users[index].name)
        states = set(rig.states(index).values())
        if retention == "delete":
            assert left == 0 and states <= {MessageState.DELETED}
        else:
            assert left == len(rig.states(index)) and states == {MessageState.DELIVERED}


# --- 7. Courier: LOGIN-DELAY 10 and UTF8 ---------------------------------------------------------------


def test_courier_idle_polls_are_probed_no_sooner_than_its_login_delay(
    make_rig: RigFactory, courier: Courier
) -> None:
    """Courier announces LOGIN-DELAY 10 (before the login, as the full poll reads it) and UTF8, which the
    full poll turns on and the probe does not: the listing is the same, and the next poll is 10 s away
    even with a 1 s interval, as after a full idle poll. (A hand-over's full poll waits out that delay
    after the probe's login: tests/integration/test_idle_probe_connect.py.)"""
    clock = FakeClock(T0)
    rig = make_rig(
        account={"retention": "keep", "poll_interval": "1s", "poll_jitter": 0},
        source=(courier, courier.pop3_port, lambda: courier.new_user("src")),
        clock=clock,
    )
    rig.seed()
    _first_polls(rig)
    login_delay = timedelta(seconds=10)
    full = rig.account_row()
    assert full["next_poll_at"] == clock.now + login_delay
    clock.advance(login_delay)
    (probed,) = rig.round()
    assert rig.full == []
    assert probed.status == "ok" and probed.idle and probed.listed == 1, probed.error
    row = rig.account_row()
    assert row["last_poll_finished_at"] == clock.now
    assert row["next_poll_at"] == clock.now + login_delay == probed.next_poll_at
    # All else as the full idle poll wrote it, 10 s earlier.
    moved = ("last_poll_started_at", "last_poll_finished_at", "last_success_at", "next_poll_at")
    assert _without(row, *moved) == _without(full, *moved)


# --- 8. POP3S -------------------------------------------------------------------------------------------


def test_pop3s_is_probed_and_a_certificate_it_cannot_verify_goes_to_the_full_poll(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    rig = make_rig(account={"retention": "keep"}, tls=True, proxy=True)
    rig.seed()
    _first_polls(rig)
    connections = _connections(rig)
    (probed,) = rig.round()
    assert probed.status == "ok" and probed.idle and rig.full == [], probed.error
    assert _connections(rig) == connections + 1
    # The server's certificate is no longer trusted (another CA configured): the probe's handshake fails,
    # and the full poll tries, fails and reports it.
    (tmp_path / "other").mkdir()
    other_ca, _cert, _key = make_test_ca(tmp_path / "other")
    rig.reconfigure({"ca_file": str(other_ca)})
    connections = _connections(rig)
    (failed,) = rig.round()
    assert rig.full == [rig.name()]
    assert failed.status == "error" and failed.error is not None
    assert "certificate verification failed" in failed.error, failed.error
    assert _connections(rig) == connections + 2  # the probe's handshake, then the full poll's
    row = rig.account_row()
    assert (row["last_result"], row["consecutive_failures"]) == ("error", 1)
    # The last poll failed: the next one is the full poll's alone (one connection).
    connections = _connections(rig)
    (again,) = rig.round()
    assert again.status == "error" and rig.full == [rig.name()] * 2
    assert _connections(rig) == connections + 1
    assert rig.account_row()["consecutive_failures"] == 2
    # Trusted again: the full poll succeeds (the failure count goes back to 0), then the probe takes over.
    rig.reconfigure({})
    (recovered,) = rig.round()
    assert recovered.status == "ok" and rig.full == [rig.name()] * 3, recovered.error
    assert rig.account_row()["consecutive_failures"] == 0
    (idle,) = rig.round()
    assert idle.idle and rig.full == [rig.name()] * 3


# --- 9. a wrong password ---------------------------------------------------------------------------------


def test_a_refused_login_costs_the_probes_login_once_then_only_the_full_polls(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The first failing round logs in twice (the probe's PASS refused, then the full poll's, which
    reports it); from then on the account is not probed while its polls fail: one login per round, so a
    server's lockout (fail2ban and the like) counts no more failures than before the probe."""
    rig = make_rig(account={"retention": "keep"}, proxy=True)
    rig.seed()
    _first_polls(rig)
    rig.reconfigure({"password": "not-the-password"})
    # Only the probe's logger: with connector.pop3.wire at DEBUG the probe would not run at all.
    caplog.set_level(logging.DEBUG, logger="connector.poll.probe")
    connections = _connections(rig)
    (first,) = rig.round()
    assert first.status == "auth_error" and rig.full == [rig.name()], first.error
    assert _connections(rig) == connections + 2
    assert f"account {rig.name()}: polled in full: PASS refused" in caplog.messages
    assert rig.account_row()["consecutive_failures"] == 1
    caplog.clear()
    connections = _connections(rig)
    (second,) = rig.round()
    assert second.status == "auth_error" and rig.full == [rig.name()] * 2
    assert _connections(rig) == connections + 1
    assert f"account {rig.name()}: polled in full: the last poll failed" in caplog.messages
    assert rig.account_row()["consecutive_failures"] == 2
    rig.reconfigure({})
    (fixed,) = rig.round()
    assert fixed.status == "ok" and rig.full == [rig.name()] * 3, fixed.error
    connections = _connections(rig)
    (idle,) = rig.round()
    assert idle.idle and rig.full == [rig.name()] * 3 and _connections(rig) == connections + 1


# --- retention by days: idle while the messages are young, the full poll deletes them when due ------------


def test_retention_by_days_probes_until_a_delivery_is_due_for_deletion(
    make_rig: RigFactory, dovecot: Dovecot
) -> None:
    clock = FakeClock(T0)
    rig = make_rig(account={"retention": {"mode": "days", "days": 1}}, clock=clock)
    rig.seed()
    _first_polls(rig)
    clock.advance(timedelta(hours=23))
    (young,) = rig.round()
    assert young.idle and rig.full == []
    assert dovecot.maildir_count(rig.users[0].name) == 1
    clock.advance(timedelta(hours=2))
    (due,) = rig.round()
    assert rig.full == [rig.name()]
    assert (due.status, due.deleted) == ("ok", 1), due.error
    assert dovecot.maildir_count(rig.users[0].name) == 0
    assert_exactly_once(rig.seeded, dovecot.imap_messages(rig.destination.name))


# --- credentials the full poll refuses to send ----------------------------------------------------------


def test_a_password_with_a_line_break_is_never_sent_by_the_probe(
    make_rig: RigFactory, dovecot: Dovecot
) -> None:
    """The full poll refuses to send a USER or PASS argument with a line break (it would be two commands);
    so must the probe. Here the line after the real password is a DELE of a message not delivered yet:
    sent, it would be carried out at the QUIT of the probe's hand-over, and the message lost."""
    rig = make_rig(account={"retention": "keep"}, proxy=True)
    rig.seed()
    _first_polls(rig)
    rig.seed()
    # As TOML's "\r\n" escape (or an accounts file's quoted field) gives it.
    password = SecretStr(f"{rig.users[0].password}\r\nDELE 2")
    account = rig.accounts[0].model_copy(update={"password": password})
    connections = _connections(rig)
    (result,) = rig.round([account])
    assert result.status == "auth_error" and result.error is not None
    assert "contains a line break" in result.error
    assert_nothing_lost(
        rig.seeded, dovecot.imap_messages(rig.destination.name), dovecot.pop3_contents(rig.users[0].name)
    )
    assert dovecot.maildir_count(rig.users[0].name) == 2
    # One connection, the full poll's, which refused to send the credentials (the probe made none).
    assert _connections(rig) == connections + 1


# --- two processes recording the same accounts in opposite orders -----------------------------------------


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_two_processes_recording_the_same_accounts_in_opposite_orders_do_not_deadlock(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Each batch write locks its accounts' lease and account rows one after another. Two processes whose
    batches hold the same accounts in another order (another configuration, ``sync --account``) each held
    a row the other waited for: PostgreSQL broke the deadlock by failing one write, whose whole batch then
    went to full polls. Here each write pauses after its first account until the other's has done its
    first too (or for a second, when the other waits on a row lock)."""
    rig = make_rig(count=2, account={"retention": "keep"})
    rig.seed(0)
    rig.seed(1)
    _first_polls(rig)
    engines = [rig.new_engine(), rig.new_engine()]
    both_first = threading.Barrier(2, timeout=1)
    for engine in engines:
        leases = engine.ledger.leases
        original = leases.pass_through
        done: list[int] = []

        def pass_through(
            cursor: Any, account_id: int, seen: Any, original: Any = original, done: list[int] = done
        ) -> bool:
            passed: bool = original(cursor, account_id, seen)
            done.append(account_id)
            if len(done) == 1:
                with contextlib.suppress(threading.BrokenBarrierError):
                    both_first.wait()
            return passed

        leases.pass_through = pass_through  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="connector.poll.probe")
    results: list[list[PollResult]] = [[], []]
    orders = [rig.accounts, rig.accounts[::-1]]
    threads = [
        threading.Thread(target=lambda i=i: results[i].extend(rig.round(orders[i], engine=engines[i])))
        for i in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r.getMessage() for r in caplog.records if "cannot record" in r.getMessage()] == []
    assert rig.full == []
    # Each account recorded once, by one process; the other found it taken and skipped it as busy.
    for account in rig.accounts:
        statuses = sorted(r.status for batch in results for r in batch if r.account == account.name)
        assert statuses == ["busy", "ok"]
