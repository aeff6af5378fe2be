"""The ledger's operations. Every write is its own committed transaction: one message, one transaction
(the ``pending`` records of the messages one destination command carries share theirs).

Two writes may be deferred to the account's next write transaction (or ``flush``), so that a poll
commits once per message instead of twice, and an idle poll once in all:
``record_delivered(..., defer=True)`` (normally it rides with the next message's ``record_pending``)
and ``poll_started(..., defer=True)``. Until then a delivered row stays ``pending``, which is always
safe: after a crash the next poll looks for the message in the destination before delivering it again.
The caller must ``flush`` before it sends the DELE that a delivery allows. A deferred write leaves the
queue only once a transaction that applied it has committed: after a failed one it is still there for the
next transaction or ``flush``, and only the poll's result write (``poll_finished``) drops what it cannot
commit, so that nothing deferred outlives its poll.

Database driver errors are translated into ``LedgerError`` here, so that the engine can stop a poll
cleanly (a poll that cannot record what it did must not go on delivering or deleting).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    Integer,
    Table,
    and_,
    bindparam,
    delete,
    func,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from connector.errors import LedgerError
from connector.ledger import postgresql_dml as postgresql
from connector.ledger.database import READ_ONLY
from connector.ledger.idle import IdlePolls, joined_uidls
from connector.ledger.journal import Journal, JournalStatements, archive_aged, entry_params, poll_counts
from connector.ledger.lease import LEASE_FIELDS, Leases
from connector.ledger.models import AccountRow, LeaseRow, MessageRow, UTCDateTime
from connector.ledger.prepared import Prepared, cursor_of, driver_transaction
from connector.ledger.quarantine import Quarantine
from connector.ledger.recipients import Recipients
from connector.ledger.records import (
    AccountState,
    AccountStatus,
    Clock,
    JournalEntry,
    KnownMessage,
    KnownMessages,
    MessageState,
    PendingMessage,
    PollOutcome,
    utcnow,
)
from connector.ledger.suspensions import Suspensions
from connector.ledger.transactions import translated
from connector.policies.lease import LeaseRecord

# A write kept for the account's next transaction: a statement built once, and this write's values.
_Write = tuple["Executable", dict[str, Any]]
_STATES = {state.value: state for state in MessageState}
_DELIVERED = MessageState.DELIVERED.value


_STATUS_FIELDS = (
    "last_poll_started_at",
    "last_poll_finished_at",
    "last_success_at",
    "last_result",
    "last_error",
    "consecutive_failures",
    "next_poll_at",
    "last_delivered",
    "last_failed",
    "last_deleted",
    "last_worker",
    "suspended_at",
    "suspended_reason",
    "identity_note",
    "uidl_change_note",
    "listing_note",
    "last_listed",
)


class Ledger:
    def __init__(self, engine: Engine, *, clock: Clock = utcnow) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock
        # The poll leases; a poll of this process holding one fences every transaction of its account.
        self.leases = Leases(engine, lambda: self._clock())
        # Parts with their own noun, each given the transaction below (see connector/ledger/transactions.py).
        self._journal_sql = JournalStatements(engine.dialect.name)
        self.journal = Journal(self._transaction, clock)
        self.recipients = Recipients(self._transaction, clock, self._journal_sql)
        self.suspensions = Suspensions(self._transaction, clock)
        self.quarantine = Quarantine(self._transaction, clock)
        # Deferred updates per account id; polls of different accounts share this object.
        self._deferred: dict[int, list[_Write]] = {}
        self._deferred_lock = threading.Lock()
        self._account_ids: dict[str, int] = {}
        # Built once: a statement object made anew per message costs more CPU (cache key, coercions)
        # than SQLite needs to run and commit it.
        self._pending_upsert = _pending_upsert(engine.dialect.name)
        # Reads: on SQLite a plain BEGIN, which takes no write lock (connector/ledger/database.py).
        self._reads = engine.execution_options(**{READ_ONLY: True})
        # Reads of several statements that must see one state of the ledger. A SQLite transaction always
        # does; PostgreSQL's default (read committed) gives each statement its own snapshot.
        self._snapshots = (
            engine.execution_options(isolation_level="REPEATABLE READ")
            if engine.dialect.name == "postgresql"
            else self._reads
        )

    @functools.cached_property
    def _sql(self) -> _PollStatements:
        """Every poll's reads and an idle poll's write, on the driver's cursor (connector/ledger/prepared.py);
        each compiled at its first use, none by commands that never poll (``status``: about 10 ms)."""
        return _PollStatements(self.engine.dialect)

    @functools.cached_property
    def idle(self) -> IdlePolls:
        """The idle probe's batch read and write (connector/ledger/idle.py)."""
        return IdlePolls(self.engine, self.leases, self._sql.succeeded)

    @contextmanager
    def _deferred_writes(self, account_id: int | None) -> Iterator[list[_Write]]:
        """The account's deferred writes, for a transaction to apply; they leave the queue only once that
        transaction has committed (this wraps it), so that a failed one leaves them queued for the next
        transaction or ``flush`` instead of losing them while the DELEs they allow are still waiting."""
        with self._deferred_lock:
            deferred = list(self._deferred.get(account_id, ())) if account_id is not None else []
        yield deferred
        if deferred and account_id is not None:
            with self._deferred_lock:
                # Only this account's poll defers for it, and it waits for this transaction: the
                # applied writes are still the first ones of the queue.
                del self._deferred.get(account_id, [])[: len(deferred)]

    def _apply_deferred(self, connection: Connection, account_id: int, deferred: list[_Write]) -> None:
        # First the fence: a poll that lost its lease must write nothing, the deferred writes included.
        self.leases.check(cursor_of(connection), account_id)
        for statement, params in deferred:
            connection.execute(statement, params)

    @contextmanager
    def _transaction(self, what: str, account_id: int | None = None) -> Iterator[Session]:
        """A committed transaction; with ``account_id``, it first applies that account's deferred writes."""
        with (
            translated(what),
            self._deferred_writes(account_id) as deferred,
            self._sessions.begin() as session,
        ):
            if account_id is not None:
                self._apply_deferred(session.connection(), account_id, deferred)
            yield session

    @contextmanager
    def _core_transaction(self, what: str, account_id: int) -> Iterator[Connection]:
        """As ``_transaction`` on a bare connection: the per-message path has no use for an ORM session,
        which costs about as much CPU as the statements themselves."""
        with (
            translated(what),
            self._deferred_writes(account_id) as deferred,
            self.engine.begin() as connection,
        ):
            self._apply_deferred(connection, account_id, deferred)
            yield connection

    @contextmanager
    def _reading(self, what: str, *, snapshot: bool = False) -> Iterator[Connection]:
        """A read-only transaction through Core; with ``snapshot``, all its statements see the same
        committed state."""
        with translated(what), (self._snapshots if snapshot else self._reads).begin() as connection:
            yield connection

    # --- accounts ------------------------------------------------------------------------------------

    def account_id(self, name: str, *, create: bool = True) -> int | None:
        # Account rows are never removed or renumbered, so an id once seen saves a query at every poll.
        cached = self._account_ids.get(name)
        if cached is not None:
            return cached
        with self._transaction("look up account") as session:
            found = session.scalar(select(AccountRow.id).where(AccountRow.name == name))
            if found is not None:
                self._account_ids[name] = found
            if found is not None or not create:
                return found
        try:
            with self._transaction("add account") as session:
                row = AccountRow(name=name, created_at=self._clock())
                session.add(row)
                session.flush()
                return row.id
        except LedgerError as exc:
            # Two workers adding the same new account at once: the other one won, use its row.
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            return self.account_id(name, create=False)

    def account_state(self, account_id: int) -> AccountState:
        """One query at the start of every poll."""
        with self._reading("read account") as connection:
            row = connection.execute(_ACCOUNT_STATE, {"account": account_id}).one_or_none()
        if row is None:
            return AccountState(None, None)
        since, reason, identity_note = row
        return AccountState(None if since is None else (since, reason or ""), identity_note)

    def poll_start(self, name: str) -> AccountState | None:
        """What a poll reads before it starts, in one query: the account's id, suspension, identity note
        and failure count, and its lease row (connector/ledger/lease.py). None: no such account yet."""
        with translated("read account"), driver_transaction(self.engine, write=False, single=True) as cursor:
            row = self._sql.poll_start.first(cursor, {"name": name})
        if row is None:
            return None
        account_id, since, reason, identity_note, failures, *lease = row
        self._account_ids[name] = account_id
        return AccountState(
            None if since is None else (since, reason or ""),
            identity_note,
            account_id,
            failures or 0,
            LeaseRecord(account_id, *lease) if lease[0] is not None else None,
        )

    def poll_started(self, account_id: int, *, defer: bool = False) -> None:
        """With ``defer``, written with the account's next write (an idle poll then commits once)."""
        params = {"account": account_id, "now": self._clock()}
        if defer:
            self._defer(account_id, _POLL_STARTED, params)
            return
        with self._core_transaction("record poll start", account_id) as connection:
            connection.execute(_POLL_STARTED, params)

    def poll_finished(self, account_id: int, outcome: PollOutcome) -> None:
        params = {
            "account": account_id,
            "now": self._clock(),
            "result": outcome.result,
            "error": outcome.error,
            "next": outcome.next_poll_at,
            "delivered": outcome.delivered,
            "failed": outcome.failed,
            "deleted": outcome.deleted,
            "listed": outcome.listed,
            # The poll's start, when it is still deferred (an idle poll): written by the same UPDATE.
            "started": self._deferred_start(account_id),
        }
        statement = _POLL_SUCCEEDED if outcome.result == "ok" else _POLL_FAILED
        failed = outcome.result not in ("ok", "stopped", "busy")
        try:
            if not (outcome.quarantined or failed or outcome.journal_before is not None):
                # An idle poll's (and most polls') only statement here: on the driver's cursor.
                self._write_result(account_id, outcome.result == "ok", params)
                return
            with self._core_transaction("record poll result", account_id) as connection:
                connection.execute(statement, params)
                if outcome.quarantined or failed:
                    counts = poll_counts(account_id, quarantined=outcome.quarantined, failed=failed)
                    connection.execute(self._journal_sql.add, counts)
                if outcome.journal_before is not None:
                    archive_aged(connection, self._journal_sql, account_id, outcome.journal_before)
        except LedgerError:
            # The poll's last write: what it deferred and could not commit is dropped with it, so that no
            # later poll (perhaps after another worker's) applies it late. Losing a "delivered" update is
            # safe: the row stays ``pending`` and the next poll looks in the destination first.
            self.discard_deferred(account_id)
            raise

    def _write_result(self, account_id: int, succeeded: bool, params: dict[str, Any]) -> None:
        """The result alone, with the fence and whatever the account deferred, in one transaction on the
        driver's cursor; a deferred write other than the prepared ones (rare: notes, a deferred delivery)
        goes through SQLAlchemy with it."""
        statement = self._sql.succeeded if succeeded else self._sql.failed
        with translated("record poll result"), self._deferred_writes(account_id) as deferred:
            if deferred:
                with self.engine.begin() as connection:
                    self._apply_deferred(connection, account_id, deferred)
                    statement.execute(cursor_of(connection), params)
                return
            # It records no message's fate (those writes were committed before, or are deferred and go
            # the way above): it needs no fsync of its own (see ``driver_transaction``).
            with driver_transaction(self.engine, write=True, durable=False) as cursor:
                self.leases.check(cursor, account_id)
                statement.execute(cursor, params)

    def _deferred_start(self, account_id: int) -> datetime | None:
        """Take the poll's deferred start out of the account's queue (for ``poll_finished``, which writes it
        or, failing, drops the whole queue anyway); None when it was written already."""
        with self._deferred_lock:
            queue = self._deferred.get(account_id, [])
            for index, (statement, params) in enumerate(queue):
                if statement is _POLL_STARTED:
                    del queue[index]
                    started: datetime = params["now"]
                    return started
        return None

    def consecutive_failures(self, account_id: int) -> int:
        with self._transaction("read account") as session:
            return (
                session.scalar(select(AccountRow.consecutive_failures).where(AccountRow.id == account_id))
                or 0
            )

    def set_next_poll(self, account_id: int, when: datetime | None) -> None:
        with self._transaction("record next poll") as session:
            session.execute(update(AccountRow).where(AccountRow.id == account_id).values(next_poll_at=when))

    def statuses(self) -> list[AccountStatus]:
        """Every account with its message counts per state: two queries, whatever the number."""
        with self._transaction("read status") as session:
            accounts = session.scalars(select(AccountRow).order_by(AccountRow.name)).all()
            counts: dict[int, dict[str, int]] = {}
            rows = session.execute(
                select(MessageRow.account_id, MessageRow.state, func.count()).group_by(
                    MessageRow.account_id, MessageRow.state
                )
            )
            for account_id, state, count in rows:
                counts.setdefault(account_id, {})[state] = count
            return [
                AccountStatus(
                    name=row.name,
                    counts={
                        state.value: counts.get(row.id, {}).get(state.value, 0) for state in MessageState
                    },
                    **{field: getattr(row, field) for field in _STATUS_FIELDS},
                )
                for row in accounts
            ]

    # --- messages ------------------------------------------------------------------------------------

    def known_messages(self, account_id: int) -> dict[str, KnownMessage]:
        """Everything the ledger knows of one account, in one query (100,000 rows is fine)."""
        # A read: deferred writes stay deferred (none is needed to plan; a stale "pending" row only
        # makes the poll look in the destination first).
        with self._reading("read messages") as connection:
            return _known_rows(connection, _ALL_ROWS, {"account": account_id})

    def rows_of(self, account_id: int, uidls: Collection[str]) -> dict[str, KnownMessage]:
        """The rows of ``uidls`` in full (those of them the ledger has): for the few that ``known_to_plan``
        gives by UIDL only and a poll needs after all (policies.uidl.key_twins)."""
        with self._reading("read messages") as connection:
            return _known_rows(connection, _ROWS_OF, {"account": account_id, "uidls": list(uidls)})

    def known_to_plan(self, account_id: int, deletable_until: datetime | None) -> KnownMessages:
        """What a poll plans with (see ``KnownMessages``): in full, every message that is not delivered,
        that the retention may delete now (delivered at or before ``deletable_until``; None: it deletes
        none, see ``policies.retention.deletable_until``) or that was missing from the last listing;
        every other one, delivered and kept, by UIDL only.

        Two queries on one snapshot. For a maildrop that keeps its mail the first finds a handful of rows
        through the index on (account, state) and none or a few missing from the last listing through its
        partial index, and the second is one value from the index on (account, UIDL):
        100,000 kept messages are read in a few tens of milliseconds instead of converting 100,000 rows
        (their dates above all) that the plan would not use.
        """
        params: dict[str, Any] = {"account": account_id, "until": deletable_until}
        sql = self._sql
        statement = sql.undelivered if deletable_until is None else sql.unkept
        with (
            translated("read messages"),
            driver_transaction(self.engine, write=False, snapshot=True) as cursor,
        ):
            rows = _known_from(statement.rows(cursor, params))
            # Every UIDL joined into one value by the database and split here: 100,000 rows cost the driver
            # and the garbage collector far more than one long string. A UIDL has no line break (RFC 1939
            # allows 0x21-0x7E; ours add "/hdr:" and hex): the count makes sure of it.
            joined, count = sql.joined_uidls.rows(cursor, params)[0]
            uidls = joined.split("\n") if joined is not None else []
            if len(uidls) != count:  # a line break after all: never written by this program, read it right
                uidls = [uidl for (uidl,) in sql.uidls.rows(cursor, params)]
        kept = set(uidls)
        # In place: ``set - dict.keys()`` goes through the keys' reflected operator, which copies all 100,000
        # (twice the cost of building the set).
        kept.difference_update(rows)
        return KnownMessages(rows, kept, joined=joined)

    def record_pending(
        self,
        account_id: int,
        uidl: str,
        *,
        pop_size: int | None,
        size: int,
        message_id: str,
        sha256: str,
        headers_only: bool = False,
        header_hash: str | None = None,
        repairs: str | None = None,
    ) -> int:
        """Mark a fetched message as about to be delivered and count the attempt; returns attempts.

        The attempt is counted before delivery so that a message that crashes the process every time
        still ends in quarantine instead of looping forever.
        """
        message = PendingMessage(uidl, pop_size, size, message_id, sha256, headers_only, header_hash, repairs)
        return self.record_batch_pending(account_id, [message])[0]

    def record_batch_pending(self, account_id: int, messages: Sequence[PendingMessage]) -> list[int]:
        """``record_pending`` for the messages of one destination command (a MULTIAPPEND, a batched
        CreateItem), in one transaction: one commit (one fsync) for the batch, not one per message; the
        command goes out after it. Returns each message's attempts, in order."""
        if not messages:
            return []
        now = self._clock()
        what = (
            f"record message {messages[0].uidl!r} as pending"
            if len(messages) == 1
            else f"record {len(messages)} messages ({messages[0].uidl!r} ...) as pending"
        )
        with self._core_transaction(what, account_id) as connection:
            rows = (_pending_params(account_id, message, now) for message in messages)
            return [int(connection.execute(self._pending_upsert, row).scalar_one()) for row in rows]

    def record_delivered(
        self,
        account_id: int,
        uidl: str,
        destination_ref: str,
        *,
        defer: bool = False,
        journal: JournalEntry | None = None,
    ) -> datetime:
        """Record the delivery, and journal it (connector/ledger/journal.py) in the same transaction; with
        ``defer``, in the account's next transaction (see the module doc)."""
        now = self._clock()
        params = {"account": account_id, "message": uidl, "ref": destination_ref, "now": now}
        writes: list[_Write] = [(_DELIVERED_UPDATE, params)]
        if journal is not None:
            entry = entry_params(account_id, journal, now)
            writes.append((self._journal_sql.insert, entry))
        if defer:
            for statement, values in writes:
                self._defer(account_id, statement, values)
            return now
        with self._core_transaction(f"record message {uidl!r} as delivered", account_id) as connection:
            for statement, values in writes:
                connection.execute(statement, values)
        return now

    def _defer(self, account_id: int, statement: Executable, params: dict[str, Any]) -> None:
        with self._deferred_lock:
            self._deferred.setdefault(account_id, []).append((statement, params))

    def discard_deferred(self, account_id: int) -> None:
        with self._deferred_lock:
            self._deferred.pop(account_id, None)

    def flush(self, account_id: int) -> None:
        """Commit the account's deferred writes now (before a DELE that depends on them). Returns only once
        every write deferred so far is committed; when it raises, they are all still queued."""
        with self._deferred_lock:
            # Fenced, it also proves the poll still holds its lease: a DELE follows.
            if not self._deferred.get(account_id) and not self.leases.fenced(account_id):
                return
        with self._core_transaction("record deliveries", account_id):
            pass

    def record_failure(
        self, account_id: int, uidl: str, error: str, *, counted: bool, max_attempts: int
    ) -> MessageState:
        """Keep the error; quarantine (``failed``) once the counted attempts reach ``max_attempts``.

        ``counted=False`` gives back the attempt taken by ``record_pending``: the failure was the
        destination's (full, unreachable), not the message's.
        """
        now = self._clock()
        with self._transaction(f"record failure of message {uidl!r}", account_id) as session:
            row = session.scalar(
                select(MessageRow).where(MessageRow.account_id == account_id, MessageRow.uidl == uidl)
            )
            if row is None:
                return MessageState.PENDING
            if not counted:
                row.attempts = max(0, row.attempts - 1)
            row.state = MessageState.FAILED if row.attempts >= max_attempts else MessageState.PENDING
            row.last_error = error
            row.updated_at = now
            return MessageState(row.state)

    def record_fetch_failure(
        self, account_id: int, uidl: str, pop_size: int, error: str, *, max_attempts: int
    ) -> MessageState:
        """Count a failed attempt that ended before delivery (the server sent something that is not the
        message), adding the row as ``pending`` if the ledger did not know the message; quarantine
        (``failed``) once the attempts reach ``max_attempts``. A known row keeps what it recorded of an
        earlier attempt (a ``pending`` one may have reached the destination)."""
        now = self._clock()
        with self._transaction(f"record failure of message {uidl!r}", account_id) as session:
            row = _message_row(session, account_id, uidl, now, pop_size=pop_size, last_error=error)
            row.attempts = (row.attempts or 0) + 1
            row.state = MessageState.FAILED if row.attempts >= max_attempts else MessageState.PENDING
            return MessageState(row.state)

    def count_failed_attempt(
        self, account_id: int, uidl: str, error: str, *, max_attempts: int
    ) -> MessageState:
        """Count one more failed attempt of a ``pending`` message and keep ``error``: one given back by
        ``record_failure(counted=False)`` that turned out to be the message's fault after all (see
        ``connector/policies/blame.py``); quarantine (``failed``) once the attempts reach ``max_attempts``."""
        now = self._clock()
        with self._transaction(f"count a failed attempt of message {uidl!r}", account_id) as session:
            row = session.scalar(
                select(MessageRow).where(MessageRow.account_id == account_id, MessageRow.uidl == uidl)
            )
            if row is None or row.state != MessageState.PENDING:
                return MessageState(row.state) if row is not None else MessageState.PENDING
            row.attempts += 1
            row.state = MessageState.FAILED if row.attempts >= max_attempts else MessageState.PENDING
            row.last_error = error
            row.updated_at = now
            return MessageState(row.state)

    def record_quarantined(self, account_id: int, uidl: str, error: str) -> None:
        now = self._clock()
        with self._transaction(f"quarantine message {uidl!r}", account_id) as session:
            session.execute(
                update(MessageRow)
                .where(MessageRow.account_id == account_id, MessageRow.uidl == uidl)
                .values(state=MessageState.FAILED, last_error=error, updated_at=now)
            )

    def record_skipped(self, account_id: int, uidl: str, pop_size: int, reason: str) -> None:
        """Quarantine a message that was never downloaded (over max_message_size)."""
        now = self._clock()
        with self._transaction(f"quarantine message {uidl!r}", account_id) as session:
            _message_row(
                session,
                account_id,
                uidl,
                now,
                state=MessageState.FAILED,
                pop_size=pop_size,
                last_error=reason,
            )

    def rekey(self, account_id: int, mapping: dict[str, str]) -> None:
        """Give known messages their new UIDLs (old -> new) after a host migration, in one transaction.
        Two steps through temporary keys, so that a swap of two UIDLs cannot hit the unique constraint."""
        if not mapping:
            return
        with self._transaction("re-key messages", account_id) as session:
            # A space never occurs in a UIDL (RFC 1939 §7), so these keys cannot clash.
            for step, old in enumerate(mapping):
                session.execute(
                    update(MessageRow)
                    .where(MessageRow.account_id == account_id, MessageRow.uidl == old)
                    .values(uidl=f" rekey {step}")
                )
            for step, new in enumerate(mapping.values()):
                session.execute(
                    update(MessageRow)
                    .where(MessageRow.account_id == account_id, MessageRow.uidl == f" rekey {step}")
                    .values(uidl=new, updated_at=self._clock())
                )

    def set_uidl_notes(
        self, account_id: int, identity: str | None, change: str | None = None, *, defer: bool = False
    ) -> None:
        """``identity`` replaces the last one (None: UIDLs were fine); ``change`` is kept until the next.
        With ``defer``, written with the account's next write (an idle poll then still commits once).
        Callers skip this when neither changed (see ``account_state``): most polls change nothing."""
        values: dict[str, object] = {"identity_note": identity}
        if change is not None:
            values["uidl_change_note"] = change
        statement = update(AccountRow).where(AccountRow.id == account_id).values(**values)
        if defer:
            self._defer(account_id, statement, {})
            return
        with self._transaction("record UIDL notes", account_id) as session:
            session.execute(statement)

    def set_listing_note(self, account_id: int, note: str) -> None:
        """Keep ``note`` (a listing that lacked most of the maildrop) for ``status`` until the next one;
        written with the account's next write."""
        statement = update(AccountRow).where(AccountRow.id == account_id).values(listing_note=note)
        self._defer(account_id, statement, {})

    def baseline_taken(self, account_id: int) -> bool:
        with self._transaction("read account") as session:
            when = session.scalar(select(AccountRow.baseline_at).where(AccountRow.id == account_id))
            return when is not None

    def record_seen(self, account_id: int, listing: Iterable[tuple[str, int, str | None]]) -> int:
        """Baseline: record every (UIDL, size, header hash) the ledger does not know yet as ``seen``, in one
        transaction, and remember when. Known rows (delivered, pending, quarantined) are left as they are.
        Returns how many were recorded."""
        now = self._clock()
        with self._transaction("record baseline", account_id) as session:
            known = set(session.scalars(select(MessageRow.uidl).where(MessageRow.account_id == account_id)))
            new = {uidl: (size, digest) for uidl, size, digest in listing if uidl not in known}
            session.add_all(
                _new_row(account_id, uidl, now, state=MessageState.SEEN, pop_size=size, header_hash=digest)
                for uidl, (size, digest) in new.items()
            )
            session.execute(update(AccountRow).where(AccountRow.id == account_id).values(baseline_at=now))
        return len(new)

    def record_missing(self, account_id: int, uidls: Iterable[str], *, counted: bool = True) -> None:
        """These were not in this poll's listing: one more poll missing (``counted``), missing since now
        unless they already were. ``counted=False`` (a listing that lost most of the maildrop at once)
        only starts the clock: such a listing is not trusted to count as evidence."""
        uidl_list = list(uidls)
        if not uidl_list:
            return
        now = self._clock()
        since = func.coalesce(MessageRow.missing_since, literal(now, UTCDateTime()))
        values: dict[str, Any] = {"missing_since": since}
        if counted:
            values["missing_polls"] = MessageRow.missing_polls + 1
        with self._transaction("record messages missing from the listing", account_id) as session:
            for chunk in _chunks(uidl_list, 500):
                session.execute(
                    update(MessageRow)
                    .where(MessageRow.account_id == account_id, MessageRow.uidl.in_(chunk))
                    .values(**values)
                )

    def record_listed_again(self, account_id: int, uidls: Iterable[str]) -> None:
        """These were missing and are in this poll's listing again: no longer missing."""
        uidl_list = list(uidls)
        if not uidl_list:
            return
        with self._transaction("record messages listed again", account_id) as session:
            for chunk in _chunks(uidl_list, 500):
                session.execute(
                    update(MessageRow)
                    .where(MessageRow.account_id == account_id, MessageRow.uidl.in_(chunk))
                    .values(missing_since=None, missing_polls=0)
                )

    def record_deleted(self, account_id: int, uidls: Iterable[str]) -> None:
        """After QUIT was answered +OK: the server has really removed these."""
        uidl_list = list(uidls)
        if not uidl_list:
            return
        now = self._clock()
        with self._transaction("record deletions", account_id) as session:
            for chunk in _chunks(uidl_list, 500):
                session.execute(
                    update(MessageRow)
                    .where(MessageRow.account_id == account_id, MessageRow.uidl.in_(chunk))
                    .values(state=MessageState.DELETED, deleted_at=now, updated_at=now)
                )

    def prune(self, account_id: int, uidls: Iterable[str]) -> int:
        """Forget messages that are no longer on the server."""
        uidl_list = list(uidls)
        removed = 0
        if not uidl_list:
            return 0
        with self._transaction("prune messages", account_id) as session:
            for chunk in _chunks(uidl_list, 500):
                result = session.execute(
                    delete(MessageRow).where(MessageRow.account_id == account_id, MessageRow.uidl.in_(chunk))
                )
                removed += int(getattr(result, "rowcount", 0) or 0)
        return removed


def _known_rows(
    connection: Connection, statement: Executable, params: dict[str, Any]
) -> dict[str, KnownMessage]:
    # Through Core: the ORM's row loading would double the cost per row.
    return _known_from(connection.execute(statement, params).all())


def _known_from(rows: Iterable[Sequence[Any]]) -> dict[str, KnownMessage]:
    # Positional unpacking and a dict lookup for the state: the per-row cost is what matters for a mailbox
    # that keeps 100,000 messages (named Row access and Enum() were most of it).
    states = _STATES
    return {
        uidl: KnownMessage(
            uidl,
            states[state],
            attempts,
            delivered_at,
            message_id,
            size,
            sha256,
            bool(headers_only),
            pop_size,
            header_hash,
            missing_polls,
            missing_since,
        )
        for (
            uidl,
            state,
            attempts,
            delivered_at,
            message_id,
            size,
            sha256,
            headers_only,
            pop_size,
            header_hash,
            missing_polls,
            missing_since,
        ) in rows
    }


# The reads of every poll, built once (as the writes below): building a statement anew costs more CPU than
# an idle poll's SQLite needs to run it.
_ACCOUNT = MessageRow.account_id == bindparam("account")
_KNOWN_COLUMNS = select(
    MessageRow.uidl,
    MessageRow.state,
    MessageRow.attempts,
    MessageRow.delivered_at,
    MessageRow.message_id,
    MessageRow.size,
    MessageRow.sha256,
    MessageRow.headers_only,
    MessageRow.pop_size,
    MessageRow.header_hash,
    MessageRow.missing_polls,
    MessageRow.missing_since,
)
_ALL_ROWS = _KNOWN_COLUMNS.where(_ACCOUNT)
_ROWS_OF = _KNOWN_COLUMNS.where(_ACCOUNT, MessageRow.uidl.in_(bindparam("uidls", expanding=True)))
# "state <> delivered" spelt as two ranges, so that the index on (account, state) serves it.
_UNDELIVERED = or_(MessageRow.state < _DELIVERED, MessageRow.state > _DELIVERED)
_UNDELIVERED_ROWS = _KNOWN_COLUMNS.where(_ACCOUNT, _UNDELIVERED)
# Missing from the last listing: kept ones too, whose counts the plan needs (few, found through their own
# index; one query with the others in an OR would make SQLite read every row of the account).
_MISSING_ROWS = _KNOWN_COLUMNS.where(_ACCOUNT, MessageRow.missing_since.is_not(None))
# Also the delivered ones the retention may delete now; a delivery time that is not recorded is never
# deleted, but is read in full all the same.
_DUE = or_(
    MessageRow.delivered_at.is_(None), MessageRow.delivered_at <= bindparam("until", type_=UTCDateTime())
)
_UNKEPT_ROWS = _KNOWN_COLUMNS.where(_ACCOUNT, or_(_UNDELIVERED, and_(MessageRow.state == _DELIVERED, _DUE)))
_ACCOUNT_STATE = select(AccountRow.suspended_at, AccountRow.suspended_reason, AccountRow.identity_note).where(
    AccountRow.id == bindparam("account")
)
_POLL_START = (
    select(
        AccountRow.id,
        AccountRow.suspended_at,
        AccountRow.suspended_reason,
        AccountRow.identity_note,
        AccountRow.consecutive_failures,
        *LEASE_FIELDS,
    )
    .outerjoin(LeaseRow, LeaseRow.account_id == AccountRow.id)
    .where(AccountRow.name == bindparam("name"))
)
_THIS_ACCOUNT = AccountRow.id == bindparam("account")
_POLL_STARTED = update(AccountRow).where(_THIS_ACCOUNT).values(last_poll_started_at=bindparam("now"))
# The result of a poll, built once for each outcome; ``last_listed`` is kept when the poll listed nothing.
_RESULT = {
    "last_poll_finished_at": bindparam("now", type_=UTCDateTime()),
    "last_result": bindparam("result"),
    "last_error": bindparam("error"),
    "next_poll_at": bindparam("next", type_=UTCDateTime()),
    "last_delivered": bindparam("delivered"),
    "last_failed": bindparam("failed"),
    "last_deleted": bindparam("deleted"),
    "last_listed": func.coalesce(bindparam("listed", type_=Integer()), AccountRow.last_listed),
    "last_poll_started_at": func.coalesce(
        bindparam("started", type_=UTCDateTime()), AccountRow.last_poll_started_at
    ),
}
_POLL_SUCCEEDED = (
    update(AccountRow)
    .where(_THIS_ACCOUNT)
    .values(**_RESULT, last_success_at=bindparam("now", type_=UTCDateTime()), consecutive_failures=0)
)
_POLL_FAILED = (
    update(AccountRow)
    .where(_THIS_ACCOUNT)
    .values(**_RESULT, consecutive_failures=AccountRow.consecutive_failures + 1)
)
_UIDLS = select(MessageRow.uidl).where(_ACCOUNT)


def _joined_uidls(dialect: str) -> Executable:
    """Every UIDL of the account joined into one value by the database, and their count (see
    ``known_to_plan``)."""
    return select(joined_uidls(dialect), func.count()).where(_ACCOUNT)


class _PollStatements:
    """The statements above that every poll runs, each compiled once for the ledger's database, at its first
    use: the listing's reads compile while the server prepares the listing (``Listing._read``), not before
    the first poll may connect (about 3 ms each on a slow machine)."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect

    @functools.cached_property
    def poll_start(self) -> Prepared:
        return Prepared(_POLL_START, self._dialect)

    @functools.cached_property
    def undelivered(self) -> Prepared:
        # The rows the plan needs in full and those missing from the last listing, in one statement:
        # UNION ALL plans each part with its own index (an OR would read every row of the account); a row
        # in both comes twice, the same.
        return Prepared(union_all(_UNDELIVERED_ROWS, _MISSING_ROWS), self._dialect)

    @functools.cached_property
    def unkept(self) -> Prepared:
        return Prepared(union_all(_UNKEPT_ROWS, _MISSING_ROWS), self._dialect)

    @functools.cached_property
    def joined_uidls(self) -> Prepared:
        return Prepared(_joined_uidls(self._dialect.name), self._dialect)

    @functools.cached_property
    def uidls(self) -> Prepared:
        return Prepared(_UIDLS, self._dialect)

    @functools.cached_property
    def succeeded(self) -> Prepared:
        return Prepared(_POLL_SUCCEEDED, self._dialect)

    @functools.cached_property
    def failed(self) -> Prepared:
        return Prepared(_POLL_FAILED, self._dialect)


def _insert_for(dialect: str) -> Callable[[Table], Any]:
    """INSERT with ON CONFLICT DO UPDATE, which both supported databases spell the same way."""
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise LedgerError(f"ledger: database {dialect!r} is not supported (SQLite or PostgreSQL)")


def _pending_params(account_id: int, message: PendingMessage, now: datetime) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "uidl": message.uidl,
        "state": MessageState.PENDING.value,
        "pop_size": message.pop_size,
        "size": message.size,
        "message_id": message.message_id,
        "sha256": message.sha256,
        "headers_only": message.headers_only,
        "header_hash": message.header_hash,
        "repairs": message.repairs,
        "updated_at": now,
    }


def _pending_upsert(dialect: str) -> Executable:
    """Insert a message's row as ``pending`` with one attempt, or set it ``pending`` again and count one
    more attempt (one statement through Core: the ORM's load-modify-flush cost more than the commit)."""
    table = MessageRow.__table__
    assert isinstance(table, Table)
    changed = ("state", "pop_size", "size", "message_id", "sha256", "headers_only", "header_hash", "repairs")
    changes: dict[str, Any] = {name: bindparam(name) for name in (*changed, "updated_at")}
    statement = _insert_for(dialect)(table).values(
        account_id=bindparam("account_id"),
        uidl=bindparam("uidl"),
        attempts=1,
        first_seen_at=bindparam("updated_at"),
        **changes,
    )
    upsert: Executable = statement.on_conflict_do_update(
        index_elements=[table.c.account_id, table.c.uidl],
        set_={**{name: statement.excluded[name] for name in changes}, "attempts": table.c.attempts + 1},
    ).returning(table.c.attempts)
    return upsert


_DELIVERED_UPDATE = (
    update(MessageRow)
    .where(MessageRow.account_id == bindparam("account"), MessageRow.uidl == bindparam("message"))
    .values(
        state=MessageState.DELIVERED,
        destination_ref=bindparam("ref"),
        delivered_at=bindparam("now"),
        last_error=None,
        updated_at=bindparam("now"),
    )
)


def _new_row(account_id: int, uidl: str, now: datetime, **values: object) -> MessageRow:
    return MessageRow(
        account_id=account_id,
        uidl=uidl,
        attempts=0,
        headers_only=False,
        first_seen_at=now,
        updated_at=now,
        **values,
    )


def _message_row(session: Session, account_id: int, uidl: str, now: datetime, **values: object) -> MessageRow:
    """The message's row, added (with no attempts yet) when the ledger does not know it, with ``values``
    set and ``updated_at`` = ``now``."""
    row = session.scalar(
        select(MessageRow).where(MessageRow.account_id == account_id, MessageRow.uidl == uidl)
    )
    if row is None:
        row = _new_row(account_id, uidl, now)
        session.add(row)
    for name, value in values.items():
        setattr(row, name, value)
    row.updated_at = now
    return row


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
