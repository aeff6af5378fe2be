"""The poll lease in the ledger: one poll per account across processes and machines, with a fencing token.

A poll takes its account's lease with its first write, not before (``Leases.reserve_for_poll``): the
poll reads the lease row with its account (``Ledger.poll_start``), goes on only when the rules of
connector/policies/lease.py say it is free, and its first write transaction takes it by compare-and-set:
``UPDATE leases SET generation = seen + 1, holder = ..., expires_at = ... WHERE account_id = ? AND
generation = <seen> AND expires_at = <seen>`` (an INSERT when there was no row). Anyone who took or
renewed the lease since the read makes that write fail (``LeaseBusyError``), and the poll stops before it
has written, delivered or deleted anything; what it did before (POP3 reads, ledger reads) changes nothing.
An idle poll's only write is its result, which takes and releases the lease in one statement: one commit
per idle poll, and no thread. ``Leases.take_for_poll`` takes the lease at once in a transaction of its own
(``baseline``, tests).

From then on the ledger's transaction helpers call ``Leases.check`` for that account: one ``UPDATE leases
SET expires_at = ... WHERE account_id = ? AND generation = ? AND holder = ?`` in the same transaction as
the poll's write, which renews the lease and proves that no one took it over. A rowcount other than 1
raises ``LeaseLostError`` and the write rolls back. One thread per ``Leases`` (started while a poll of this
process holds a lease, gone when none does) renews the held leases while their polls wait on a server (a
long RETR), and the poll's last write (its result) releases its lease.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, Executable, and_, bindparam, insert, or_, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError

from connector.errors import LedgerError
from connector.ledger import postgresql_dml as postgresql
from connector.ledger.models import AccountRow, LeaseRow, UTCDateTime
from connector.ledger.prepared import Cursor, Prepared, driver_transaction
from connector.ledger.transactions import translated
from connector.policies.lease import (
    Claimant,
    LeaseHeld,
    LeaseRecord,
    expired,
    holder_name,
    renew_every,
    take,
)

log = logging.getLogger("connector.lease")

Clock = Callable[[], datetime]


class LeaseLostError(LedgerError):
    """Another poll took this poll's account over (this one stalled past its lease): the write was rolled
    back, and the poll must stop before its next DELE and end its POP3 session without QUIT."""


class LeaseBusyError(LeaseLostError):
    """Another poll took (or renewed) the account's lease between this poll's start and its first write:
    this poll wrote nothing, delivered nothing and deleted nothing, and is skipped like a busy account."""


@dataclass
class _Fence:
    account: str
    account_id: int
    # The generation this poll holds, or takes with its first write (``seen`` + 1).
    generation: int
    holder: str
    host: str
    pid: int
    ttl: timedelta
    # Taken at the first write (reserve_for_poll): until then nothing is written. ``seen`` is the row read
    # at the poll's start, which that write must still find (None: there was no row, it inserts one).
    lazy: bool
    seen: LeaseRecord | None
    acquired_at: datetime
    # The poll's log context, for the renewer's lines about it.
    context: contextvars.Context
    # The next check ends the lease instead of renewing it (the poll's last write).
    releasing: bool = False
    # A check of this poll succeeded: its lease was taken (an idle poll that failed early has none).
    checked: bool = False
    # The renewer keeps this lease (while it is held and the poll has not ended); when it last was renewed.
    renewing: bool = False
    stopped: bool = False
    renewed_at: float = 0.0
    lost: threading.Event = field(default_factory=threading.Event)
    # Held by the renewer while it renews: stopping waits for a renewal in flight.
    lock: threading.Lock = field(default_factory=threading.Lock)


# A lease row after its account's id, in ``LeaseRecord``'s order (also read by ``Ledger.poll_start``).
LEASE_FIELDS = (
    LeaseRow.generation,
    LeaseRow.holder,
    LeaseRow.host,
    LeaseRow.pid,
    LeaseRow.acquired_at,
    LeaseRow.expires_at,
)
_COLUMNS = select(LeaseRow.account_id, *LEASE_FIELDS)
_CURRENT = _COLUMNS.where(LeaseRow.account_id == bindparam("account"))
_FENCED = update(LeaseRow).where(
    LeaseRow.account_id == bindparam("account"),
    LeaseRow.generation == bindparam("fence_generation"),
    LeaseRow.holder == bindparam("fence_holder"),
)
_RENEW = _FENCED.values(expires_at=bindparam("until", type_=UTCDateTime()))
# A lazily taken lease (see the module doc): renewed as above once taken, or taken from the row read at the
# poll's start if that is still there as it was. One statement either way: the poll need not know whether
# the transaction of its first check committed.
_TAKE_OR_RENEW = (
    update(LeaseRow)
    .where(
        LeaseRow.account_id == bindparam("account"),
        or_(
            and_(
                LeaseRow.generation == bindparam("fence_generation"),
                LeaseRow.holder == bindparam("fence_holder"),
            ),
            and_(
                LeaseRow.generation == bindparam("seen_generation"),
                LeaseRow.expires_at == bindparam("seen_expires", type_=UTCDateTime()),
            ),
        ),
    )
    .values(
        generation=bindparam("fence_generation"),
        holder=bindparam("fence_holder"),
        host=bindparam("fence_host"),
        pid=bindparam("fence_pid"),
        acquired_at=bindparam("acquired", type_=UTCDateTime()),
        expires_at=bindparam("until", type_=UTCDateTime()),
    )
)
_NEW_ROW = {
    "account_id": bindparam("account"),
    "generation": bindparam("fence_generation"),
    "holder": bindparam("fence_holder"),
    "host": bindparam("fence_host"),
    "pid": bindparam("fence_pid"),
    "acquired_at": bindparam("acquired", type_=UTCDateTime()),
    "expires_at": bindparam("until", type_=UTCDateTime()),
}


def _insert_if_new(dialect: str) -> Executable:
    """The account's first lease row, returning its account id, or no row when another poll inserted it
    first: ON CONFLICT DO NOTHING, which both supported databases spell the same way and which, unlike a
    failed INSERT, leaves a PostgreSQL transaction usable. (RETURNING, not the rowcount, which SQLAlchemy
    does not report for an INSERT on every driver.)"""
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = dialect_insert(LeaseRow).values(**_NEW_ROW)
    return statement.on_conflict_do_nothing(index_elements=["account_id"]).returning(LeaseRow.account_id)


class _FenceStatements:
    def __init__(self, dialect: Dialect) -> None:
        self.take_or_renew = Prepared(_TAKE_OR_RENEW, dialect)
        self.renew = Prepared(_RENEW, dialect)
        self.insert = Prepared(_insert_if_new(dialect.name), dialect)
        self.current = Prepared(_CURRENT, dialect)


def this_host() -> str:
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class Leases:
    """The leases table of one ledger, and the fences of the polls this process runs."""

    def __init__(self, engine: Engine, clock: Clock, *, host: str | None = None) -> None:
        self.engine = engine
        self._clock = clock
        self.host = host or this_host()
        self._fences: dict[int, _Fence] = {}
        self._lock = threading.Lock()
        # The renewer waits on this for the next lease due; it is running while ``_renewer`` is set.
        self._changed = threading.Condition(self._lock)
        self._renewer: threading.Thread | None = None

    @functools.cached_property
    def _sql(self) -> _FenceStatements:
        """The fence's statements, on the driver's cursor (connector/ledger/prepared.py): part of every
        write of a poll, an idle poll's one write included. Compiled when a poll first needs them."""
        return _FenceStatements(self.engine.dialect)

    # --- taking --------------------------------------------------------------------------------------

    def take(self, account_id: int, claimant: Claimant, ttl: timedelta) -> LeaseRecord | LeaseHeld:
        """The lease, or who holds it. Two processes taking a lease row that does not exist yet both
        insert it: the loser's INSERT fails on the primary key, and it reads the winner's lease instead."""
        for attempt in (1, 2):
            try:
                with translated("take the poll lease"), self.engine.begin() as connection:
                    return self._take(connection, account_id, claimant, ttl)
            except LedgerError as exc:
                if attempt == 2 or not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")

    def _take(
        self, connection: Connection, account_id: int, claimant: Claimant, ttl: timedelta
    ) -> LeaseRecord | LeaseHeld:
        # FOR UPDATE: a concurrent take on PostgreSQL waits for this transaction (SQLite's BEGIN
        # IMMEDIATE already serialises writers, and SQLAlchemy leaves the clause out there).
        row = connection.execute(_CURRENT.with_for_update(), {"account": account_id}).one_or_none()
        current = LeaseRecord(*row) if row is not None else None
        # A holder on this host whose process is gone (killed, crashed) needs no wait for the expiry.
        gone = current is not None and current.host == self.host and not process_alive(current.pid)
        outcome = take(current, account_id, claimant, self._clock(), ttl, holder_gone=gone)
        if isinstance(outcome, LeaseHeld):
            return outcome
        values = {
            "generation": outcome.generation,
            "holder": outcome.holder,
            "host": outcome.host,
            "pid": outcome.pid,
            "acquired_at": outcome.acquired_at,
            "expires_at": outcome.expires_at,
        }
        if current is None:
            connection.execute(insert(LeaseRow).values(account_id=account_id, **values))
        else:
            connection.execute(
                update(LeaseRow)
                .where(LeaseRow.account_id == account_id, LeaseRow.generation == current.generation)
                .values(**values)
            )
        return outcome

    def take_for_poll(self, account_id: int, account: str, ttl: timedelta) -> PollLease | LeaseHeld:
        """A running ``PollLease`` taken now, in a transaction of its own (fencing this account's writes,
        renewed in the background), or who holds the lease now."""
        claimant = self._claimant()
        fence = self._fence(account, account_id, 0, claimant, ttl, seen=None, lazy=False)
        running = self._claim(fence)
        if running is not None:
            return running
        try:
            taken = self.take(account_id, claimant, ttl)
        except BaseException:
            self._unregister(fence)
            raise
        if isinstance(taken, LeaseHeld):
            self._unregister(fence)
            return taken
        fence.generation, fence.checked = taken.generation, True
        self._keep_renewing(fence)
        return PollLease(self, fence)

    def reserve_for_poll(
        self, account_id: int, account: str, ttl: timedelta, seen: LeaseRecord | None
    ) -> PollLease | LeaseHeld:
        """A ``PollLease`` that the poll's first write takes (see the module doc), given the lease row
        ``seen`` at the poll's start; or who holds the lease, when ``seen`` says it is not free. Writes
        nothing and starts no thread."""
        claimant = self._claimant()
        gone = seen is not None and self._holder_gone(seen)
        outcome = take(seen, account_id, claimant, self._clock(), ttl, holder_gone=gone)
        if isinstance(outcome, LeaseHeld):
            return outcome
        fence = self._fence(account, account_id, outcome.generation, claimant, ttl, seen=seen, lazy=True)
        running = self._claim(fence)
        if running is not None:
            return running
        return PollLease(self, fence)

    def _holder_gone(self, seen: LeaseRecord) -> bool:
        """The holder of ``seen`` ran on this host and its process is gone: its lease is over."""
        return seen.host == self.host and not process_alive(seen.pid)

    def free(self, account_id: int, seen: LeaseRecord | None, now: datetime) -> bool:
        """Whether a poll may take the account's lease at ``now``, given the row ``seen``, as
        ``reserve_for_poll`` decides it (policies/lease.py ``take``), and no poll of this process has it."""
        if self.fenced(account_id):
            return False
        return seen is None or self._holder_gone(seen) or expired(seen, now)

    def pass_through(self, cursor: Cursor, account_id: int, seen: LeaseRecord | None) -> bool:
        """Take the lease from the row ``seen`` and release it in the same statement (``cursor``: a write
        transaction's): the whole use a probed idle poll makes of it (connector/ledger/idle.py). False
        when the row is no longer ``seen`` (another poll took the account since it was read) or a poll of
        this process holds the account: the caller then writes nothing for it."""
        if self.fenced(account_id):
            return False
        now, claimant = self._clock(), self._claimant()
        params: dict[str, object] = {
            "account": account_id,
            "fence_generation": (seen.generation if seen is not None else 0) + 1,
            "fence_holder": claimant.holder,
            "fence_host": claimant.host,
            "fence_pid": claimant.pid,
            "acquired": now,
            "until": now,  # released: it expires as it is taken
        }
        if seen is None:
            return self._sql.insert.first(cursor, params) is not None
        params.update(seen_generation=seen.generation, seen_expires=seen.expires_at)
        return self._sql.take_or_renew.rowcount(cursor, params) == 1

    def _claimant(self) -> Claimant:
        pid = os.getpid()
        return Claimant(holder_name(self.host, pid, secrets.token_hex(4)), self.host, pid)

    def _fence(
        self,
        account: str,
        account_id: int,
        generation: int,
        claimant: Claimant,
        ttl: timedelta,
        *,
        seen: LeaseRecord | None,
        lazy: bool,
    ) -> _Fence:
        return _Fence(
            account=account,
            account_id=account_id,
            generation=generation,
            holder=claimant.holder,
            host=claimant.host,
            pid=claimant.pid,
            ttl=ttl,
            lazy=lazy,
            seen=seen,
            acquired_at=self._clock(),
            # In a copy of the poll's context: the renewer's lines name the account (connector/ops/logs.py).
            context=contextvars.copy_context(),
            renewed_at=time.monotonic(),
        )

    def current(self, account_id: int) -> LeaseRecord | None:
        with translated("read the poll lease"), self.engine.connect() as connection:
            row = connection.execute(_CURRENT, {"account": account_id}).one_or_none()
        return LeaseRecord(*row) if row is not None else None

    def live(self) -> dict[str, LeaseHeld]:
        """Account name -> who polls it now, for every lease that has not expired (for ``status``)."""
        query = (
            select(AccountRow.name, LeaseRow.holder, LeaseRow.host, LeaseRow.pid)
            .add_columns(LeaseRow.acquired_at, LeaseRow.expires_at)
            .join(AccountRow, AccountRow.id == LeaseRow.account_id)
            .where(LeaseRow.expires_at > self._clock())
        )
        with translated("read the poll leases"), self.engine.connect() as connection:
            return {name: LeaseHeld(*held) for name, *held in connection.execute(query)}

    # --- fencing -------------------------------------------------------------------------------------

    def fenced(self, account_id: int) -> bool:
        return account_id in self._fences

    def check(self, cursor: Cursor, account_id: int) -> None:
        """Called by the ledger in every transaction of ``account_id`` (``cursor``: that transaction's, see
        connector/ledger/prepared.py): when a poll of this process holds its lease (or takes it with this
        write), renew it there, or raise ``LeaseLostError`` (the transaction then rolls back)."""
        fence = self._fences.get(account_id)  # a dict read is atomic; the fence is this account's poll's
        if fence is not None:
            self._renew(cursor, fence)

    def _renew(self, cursor: Cursor, fence: _Fence) -> None:
        now = self._clock()
        until = now if fence.releasing else now + fence.ttl
        params: dict[str, object] = {
            "account": fence.account_id,
            "fence_generation": fence.generation,
            "fence_holder": fence.holder,
            "until": until,
        }
        if fence.lazy:
            params.update(fence_host=fence.host, fence_pid=fence.pid, acquired=fence.acquired_at)
            if fence.seen is not None:
                params.update(seen_generation=fence.seen.generation, seen_expires=fence.seen.expires_at)
                done = self._sql.take_or_renew.rowcount(cursor, params) == 1
            else:
                done = (
                    self._sql.renew.rowcount(cursor, params) == 1
                    or self._sql.insert.first(cursor, params) is not None
                )
        else:
            done = self._sql.renew.rowcount(cursor, params) == 1
        if done:
            fence.renewed_at = time.monotonic()
            fence.checked = True
            if not fence.renewing and not fence.releasing and not fence.stopped:
                self._keep_renewing(fence)
            return
        row = self._sql.current.first(cursor, {"account": fence.account_id})
        record = LeaseRecord(*row) if row is not None else None
        if fence.lazy and not fence.checked and record is not None:
            # Never held: another poll took the account between this poll's start and its first write.
            held = LeaseHeld(record.holder, record.host, record.pid, record.acquired_at, record.expires_at)
            raise LeaseBusyError(held.describe(fence.account))
        now_held = ""
        if record is not None:
            since = record.acquired_at.isoformat(timespec="seconds")
            now_held = f" (PID {record.pid} on host {record.host} took it over at {since})"
        raise LeaseLostError(
            f"the poll lost its lease (generation {fence.generation}) to another poll{now_held}; "
            "it stops before its next DELE and ends the POP3 session without QUIT"
        )

    def _claim(self, fence: _Fence) -> LeaseHeld | None:
        """Make ``fence`` its account's, unless another poll of this process has the account: a lease
        taken by the first write does not show in the ledger before that write, so the ledger alone
        would let two polls of one process (two threads) both start."""
        with self._lock:
            running = self._fences.get(fence.account_id)
            if running is None:
                self._fences[fence.account_id] = fence
                return None
        expires = running.acquired_at + running.ttl
        return LeaseHeld(running.holder, running.host, running.pid, running.acquired_at, expires)

    def _unregister(self, fence: _Fence) -> None:
        with self._lock:
            if self._fences.get(fence.account_id) is fence:
                del self._fences[fence.account_id]

    def _confirm(self, fence: _Fence) -> None:
        """A transaction of its own that only checks (and renews or releases) the lease."""
        with translated("renew the poll lease"), driver_transaction(self.engine, write=True) as cursor:
            self._renew(cursor, fence)

    # --- the renewer ---------------------------------------------------------------------------------

    def _keep_renewing(self, fence: _Fence) -> None:
        """From now on the renewer keeps ``fence``'s lease: a long RETR or APPEND writes nothing to the
        ledger for a while. One thread for every held lease of this process, started when the first
        one needs it; a poll whose lease is never held (an idle one) costs no thread."""
        with self._changed:
            fence.renewing = True
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_held, name="lease renewer", daemon=True)
                self._renewer.start()
            self._changed.notify()

    def _stop_renewing(self, fence: _Fence) -> None:
        """No renewal of ``fence`` after this returns (one in flight is waited for)."""
        with fence.lock:
            fence.stopped = True
            fence.renewing = False

    def _renew_held(self) -> None:
        while True:
            with self._changed:
                while True:
                    held = [fence for fence in self._fences.values() if fence.renewing]
                    if not held:
                        self._renewer = None  # the next lease held starts another
                        return
                    now = time.monotonic()
                    due = [fence for fence in held if _due(fence) <= now]
                    if due:
                        break
                    self._changed.wait(min(_due(fence) for fence in held) - now)
            for fence in due:
                fence.context.run(self._renew_in_background, fence)

    def _renew_in_background(self, fence: _Fence) -> None:
        with fence.lock:
            if not fence.renewing:
                return
            try:
                self._confirm(fence)
            except LeaseLostError as exc:
                fence.renewing = False
                fence.lost.set()
                log.error("account %s: %s", fence.account, exc.message)
            except LedgerError as exc:  # the database out of reach: the next renewal may succeed
                fence.renewed_at = time.monotonic()
                log.warning("account %s: cannot renew the poll lease: %s", fence.account, exc.message)


def _due(fence: _Fence) -> float:
    return fence.renewed_at + renew_every(fence.ttl).total_seconds()


class PollLease:
    """One poll's lease: registered as the fence of its account's writes, renewed while it is held."""

    def __init__(self, leases: Leases, fence: _Fence) -> None:
        self._leases = leases
        self._fence = fence
        self._ended = False

    @property
    def account(self) -> str:
        return self._fence.account

    @property
    def generation(self) -> int:
        return self._fence.generation

    @property
    def lost(self) -> threading.Event:
        return self._fence.lost

    def confirm(self) -> None:
        """Check (and renew, or take) the lease now; ``LeaseLostError`` when another poll took it over."""
        try:
            self._leases._confirm(self._fence)
        except LeaseLostError:
            self.lost.set()
            raise

    def _stop_renewer(self) -> None:
        self._leases._stop_renewing(self._fence)

    def end_with(self, last_write: Callable[[], None]) -> None:
        """Run the poll's last write (its result) and release the lease in the same transaction (an idle
        poll's lease is taken and released there)."""
        self._stop_renewer()
        self._fence.releasing = True
        try:
            last_write()
        except LeaseLostError:
            self.lost.set()
            raise
        self._ended = True

    def close(self) -> None:
        """Stop renewing; release the lease unless the last write did, another poll has it, or this poll
        never took it."""
        self._stop_renewer()
        self._leases._unregister(self._fence)
        if self._ended or self.lost.is_set() or not self._fence.checked:
            return
        self._fence.releasing = True
        try:
            self._leases._confirm(self._fence)
        except LeaseLostError:
            pass  # another poll has it: nothing of this poll's to release
        except LedgerError as exc:  # it expires by itself after lease_ttl
            log.warning("account %s: cannot release the poll lease: %s", self.account, exc.message)
        self._ended = True
