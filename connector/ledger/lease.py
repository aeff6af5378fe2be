"""The poll lease in the ledger: one poll per account across processes and machines, with a fencing token.

``Leases.take_for_poll`` takes the account's lease row in one write transaction (SQLite: BEGIN IMMEDIATE;
PostgreSQL: the row locked FOR UPDATE) under the rules of connector/policies/lease.py, and gives the poll
a ``PollLease``. From then on the ledger's transaction helpers call ``Leases.check`` for that account:
one ``UPDATE leases SET expires_at = ... WHERE account_id = ? AND generation = ? AND holder = ?`` in the
same transaction as the poll's write, which renews the lease and proves that no one took it over. A
rowcount other than 1 raises ``LeaseLostError`` and the write rolls back. A background thread renews the
lease while the poll waits on a server (a long RETR), and the poll's last write (its result) releases it.
"""

from __future__ import annotations

import contextvars
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from connector.errors import LedgerError
from connector.ledger.models import AccountRow, LeaseRow, UTCDateTime
from connector.policies.lease import Claimant, LeaseHeld, LeaseRecord, holder_name, renew_every, take

log = logging.getLogger("connector.lease")

Clock = Callable[[], datetime]


class LeaseLostError(LedgerError):
    """Another poll took this poll's account over (this one stalled past its lease): the write was rolled
    back, and the poll must stop before its next DELE and end its POP3 session without QUIT."""


@dataclass
class _Fence:
    account_id: int
    generation: int
    holder: str
    ttl: timedelta
    # The next check ends the lease instead of renewing it (the poll's last write).
    releasing: bool = False


_COLUMNS = select(
    LeaseRow.account_id,
    LeaseRow.generation,
    LeaseRow.holder,
    LeaseRow.host,
    LeaseRow.pid,
    LeaseRow.acquired_at,
    LeaseRow.expires_at,
)
_CURRENT = _COLUMNS.where(LeaseRow.account_id == bindparam("account"))
_FENCED = update(LeaseRow).where(
    LeaseRow.account_id == bindparam("account"),
    LeaseRow.generation == bindparam("fence_generation"),
    LeaseRow.holder == bindparam("fence_holder"),
)
_RENEW = _FENCED.values(expires_at=bindparam("until", type_=UTCDateTime()))


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

    # --- taking --------------------------------------------------------------------------------------

    def take(self, account_id: int, claimant: Claimant, ttl: timedelta) -> LeaseRecord | LeaseHeld:
        """The lease, or who holds it. Two processes taking a lease row that does not exist yet both
        insert it: the loser's INSERT fails on the primary key, and it reads the winner's lease instead."""
        for attempt in (1, 2):
            try:
                with _translated("take the poll lease"), self.engine.begin() as connection:
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
        """A running ``PollLease`` (fencing this account's writes, renewed in the background), or who
        holds the lease now."""
        pid = os.getpid()
        claimant = Claimant(holder_name(self.host, pid, secrets.token_hex(4)), self.host, pid)
        taken = self.take(account_id, claimant, ttl)
        if isinstance(taken, LeaseHeld):
            return taken
        lease = PollLease(self, account, _Fence(account_id, taken.generation, taken.holder, ttl))
        lease.start()
        return lease

    def current(self, account_id: int) -> LeaseRecord | None:
        with _translated("read the poll lease"), self.engine.connect() as connection:
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
        with _translated("read the poll leases"), self.engine.connect() as connection:
            return {name: LeaseHeld(*held) for name, *held in connection.execute(query)}

    # --- fencing -------------------------------------------------------------------------------------

    def fenced(self, account_id: int) -> bool:
        return account_id in self._fences

    def check(self, connection: Connection, account_id: int) -> None:
        """Called by the ledger in every transaction of ``account_id``: when a poll of this process holds
        its lease, renew it there, or raise ``LeaseLostError`` (the transaction then rolls back)."""
        with self._lock:
            fence = self._fences.get(account_id)
        if fence is not None:
            self._renew(connection, fence)

    def _renew(self, connection: Connection, fence: _Fence) -> None:
        now = self._clock()
        until = now if fence.releasing else now + fence.ttl
        params = {
            "account": fence.account_id,
            "fence_generation": fence.generation,
            "fence_holder": fence.holder,
        }
        if connection.execute(_RENEW, {**params, "until": until}).rowcount == 1:
            return
        row = connection.execute(_CURRENT, {"account": fence.account_id}).one_or_none()
        now_held = ""
        if row is not None:
            record = LeaseRecord(*row)
            since = record.acquired_at.isoformat(timespec="seconds")
            now_held = f" (PID {record.pid} on host {record.host} took it over at {since})"
        raise LeaseLostError(
            f"the poll lost its lease (generation {fence.generation}) to another poll{now_held}; "
            "it stops before its next DELE and ends the POP3 session without QUIT"
        )

    def _register(self, fence: _Fence) -> None:
        with self._lock:
            self._fences[fence.account_id] = fence

    def _unregister(self, fence: _Fence) -> None:
        with self._lock:
            if self._fences.get(fence.account_id) is fence:
                del self._fences[fence.account_id]

    def _confirm(self, fence: _Fence) -> None:
        """A transaction of its own that only checks (and renews or releases) the lease."""
        with _translated("renew the poll lease"), self.engine.begin() as connection:
            self._renew(connection, fence)


class PollLease:
    """One poll's lease: registered as the fence of its account's writes and renewed by a timer."""

    def __init__(self, leases: Leases, account: str, fence: _Fence) -> None:
        self._leases = leases
        self.account = account
        self._fence = fence
        self.lost = threading.Event()
        self._stopping = threading.Event()
        self._renewer: threading.Thread | None = None
        self._ended = False

    @property
    def generation(self) -> int:
        return self._fence.generation

    def start(self) -> None:
        self._leases._register(self._fence)
        # In a copy of the poll's context: its log lines name the account (connector/ops/logs.py).
        context = contextvars.copy_context()
        self._renewer = threading.Thread(
            target=context.run, args=(self._renew_until_stopped,), name=f"lease {self.account}", daemon=True
        )
        self._renewer.start()

    def confirm(self) -> None:
        """Check (and renew) the lease now; ``LeaseLostError`` when another poll took it over."""
        try:
            self._leases._confirm(self._fence)
        except LeaseLostError:
            self.lost.set()
            raise

    def _renew_until_stopped(self) -> None:
        # A long RETR or APPEND writes nothing to the ledger for a while: the timer keeps the lease.
        interval = renew_every(self._fence.ttl).total_seconds()
        while not self._stopping.wait(interval):
            try:
                self.confirm()
            except LeaseLostError as exc:
                log.error("account %s: %s", self.account, exc.message)
                return
            except LedgerError as exc:  # the database out of reach: the next renewal may succeed
                log.warning("account %s: cannot renew the poll lease: %s", self.account, exc.message)

    def _stop_renewer(self) -> None:
        self._stopping.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()

    def end_with(self, last_write: Callable[[], None]) -> None:
        """Run the poll's last write (its result) and release the lease in the same transaction."""
        self._stop_renewer()
        self._fence.releasing = True
        try:
            last_write()
        except LeaseLostError:
            self.lost.set()
            raise
        self._ended = True

    def close(self) -> None:
        """Stop renewing; release the lease unless the last write did (or another poll has it)."""
        self._stop_renewer()
        self._leases._unregister(self._fence)
        if self._ended or self.lost.is_set():
            return
        self._fence.releasing = True
        try:
            self._leases._confirm(self._fence)
        except LeaseLostError:
            pass  # another poll has it: nothing of this poll's to release
        except LedgerError as exc:  # it expires by itself after lease_ttl
            log.warning("account %s: cannot release the poll lease: %s", self.account, exc.message)
        self._ended = True


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise LedgerError(f"ledger: cannot {what}: {exc.__class__.__name__}: {exc}") from exc
