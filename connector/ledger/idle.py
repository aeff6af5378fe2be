"""The idle probe's ledger work: one read and one write for a batch of accounts (connector/poll/probe.py).

A full poll reads its account (``Ledger.poll_start``), the messages it plans with (``known_to_plan``) and
writes its result with the lease taken and released (``Ledger.poll_finished``): three transactions per idle
poll, each with its fixed costs (a pooled connection, BEGIN, COMMIT). The probe does the same work for a
batch (up to ``BATCH`` accounts):

- ``read``: one snapshot with two statements, the accounts with their lease rows, and per account the
  counts the probe's rules need (policies/idle.py) with its UIDLs joined into one value;
- ``record``: one transaction; per account the lease taken from the row the read found and released at
  once (``Leases.pass_through``: the compare-and-set every poll's first write makes), and when that
  succeeded, the poll's result, the very statement a full idle poll writes. An account whose lease row
  changed since the read (another poll took it) gets no result: it is ``busy``, as a full poll would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, bindparam, case, func, literal, select, type_coerce
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql import ColumnElement

from connector.ledger.lease import LEASE_FIELDS, Leases
from connector.ledger.models import AccountRow, LeaseRow, MessageRow, UTCDateTime
from connector.ledger.prepared import Prepared, driver_transaction
from connector.ledger.records import LedgerView, MessageState
from connector.ledger.transactions import translated
from connector.policies.lease import LeaseRecord

# Accounts per read and per write: the per-transaction costs shrink to a hundredth, while one batch's
# results still reach the ledger within moments of their polls.
BATCH = 100
# The lengths the read's IN lists are compiled for, each once at its first use (``Prepared``: a statement
# compiled once renders no list when it runs). A list is padded to the next with its first value repeated.
# Built and run by SQLAlchemy at each read, one account's read cost 0.96 ms of CPU, most of it building and
# caching the statement: what `run` and distributed workers pay when accounts fall due one at a time.
_IN_SIZES = (1, 4, 16, BATCH)

_DELIVERED = MessageState.DELIVERED.value
_SEEN = MessageState.SEEN.value
_NO_MESSAGES = (0, 0, 0, 0, 0, None, None)


@dataclass(frozen=True)
class IdlePoll:
    """One probed poll that found nothing to do, to record."""

    account_id: int
    lease: LeaseRecord | None
    started: datetime
    next_poll_at: datetime
    listed: int


def joined_uidls(dialect: str) -> ColumnElement[Any]:
    """An account's UIDLs joined by line breaks in one value, by the database (``Ledger.known_to_plan``,
    the probe's read): 100,000 rows cost the driver far more than one long string. Spelt per database:
    ``aggregate_strings`` would render its separator only when the statement runs, and these are compiled
    once."""
    join = func.string_agg if dialect == "postgresql" else func.group_concat
    return join(MessageRow.uidl, literal("\n"))


class IdlePolls:
    """Batch reads and writes of probed polls; ``succeeded``: the full poll's result statement."""

    def __init__(self, engine: Engine, leases: Leases, succeeded: Prepared) -> None:
        self._engine = engine
        self._leases = leases
        self._succeeded = succeeded
        delivered = MessageRow.state == _DELIVERED
        deletable = delivered & MessageRow.headers_only.is_not(True)
        self._accounts = select(
            AccountRow.name,
            AccountRow.id,
            AccountRow.suspended_at,
            AccountRow.identity_note,
            AccountRow.consecutive_failures,
            AccountRow.last_delivered,
            AccountRow.baseline_at,
            *LEASE_FIELDS,
        ).outerjoin(LeaseRow, LeaseRow.account_id == AccountRow.id)
        self._messages = select(
            MessageRow.account_id,
            func.sum(case((delivered, 1), else_=0)),
            func.count(),
            func.sum(case((MessageRow.missing_since.is_not(None), 1), else_=0)),
            func.sum(case((delivered & MessageRow.delivered_at.is_(None), 1), else_=0)),
            func.sum(case((MessageRow.state == _SEEN, 1), else_=0)),
            # The retention never deletes a headers-only delivery (the server has the only whole copy).
            type_coerce(func.min(case((deletable, MessageRow.delivered_at))), UTCDateTime()),
            joined_uidls(engine.dialect.name),
        ).group_by(MessageRow.account_id)

        self._prepared: dict[tuple[str, int], Prepared] = {}

    def read(self, names: Sequence[str], now: datetime) -> dict[str, LedgerView]:
        """The ledger's view of each named account that is in it (absent: not in the ledger yet)."""
        views: dict[str, LedgerView] = {}
        for start in range(0, len(names), BATCH):
            views.update(self._read(names[start : start + BATCH], now))
        return views

    def _read(self, names: Sequence[str], now: datetime) -> dict[str, LedgerView]:
        if not names:
            return {}
        with (
            translated("read accounts for the idle probe"),
            driver_transaction(self._engine, write=False, snapshot=True) as cursor,
        ):
            accounts = self._in("name", self._accounts, AccountRow.name, names).rows(cursor, _padded(names))
            ids = [row[1] for row in accounts]
            counts = {}
            if ids:
                messages = self._in("id", self._messages, MessageRow.account_id, ids)
                counts = {row[0]: row[1:] for row in messages.rows(cursor, _padded(ids))}
        views: dict[str, LedgerView] = {}
        for row in accounts:
            name, account_id, suspended_at, note, failures, last_delivered, baseline_at, *lease_row = row
            lease = LeaseRecord(account_id, *lease_row) if lease_row[0] is not None else None
            delivered, total, missing, undated, seen, oldest, joined = counts.get(account_id, _NO_MESSAGES)
            views[name] = LedgerView(
                account_id=account_id,
                suspended=suspended_at is not None,
                noted=note is not None,
                consecutive_failures=failures or 0,
                last_delivered=last_delivered or 0,
                baseline_taken=baseline_at is not None,
                delivered=delivered or 0,
                others=(total or 0) - (delivered or 0) - (seen or 0),
                seen=seen or 0,
                missing=missing or 0,
                undated=undated or 0,
                oldest_delivery=oldest,
                joined=joined,
                lease=lease,
                lease_free=self._leases.free(account_id, lease, now),
            )
        return views

    def _in(
        self,
        kind: str,
        statement: Select[*tuple[Any, ...]],
        column: InstrumentedAttribute[Any],
        values: Sequence[Any],
    ) -> Prepared:
        """``statement`` where ``column`` is one of ``len(values)`` values (padded, ``_padded``), compiled
        once per length."""
        size = _in_size(len(values))
        prepared = self._prepared.get((kind, size))
        if prepared is None:  # two threads may both compile it: either one serves
            chosen = column.in_([bindparam(f"in{n}") for n in range(size)])
            prepared = self._prepared[(kind, size)] = Prepared(statement.where(chosen), self._engine.dialect)
        return prepared

    def record(self, polls: Sequence[IdlePoll], now: datetime) -> set[int]:
        """Each poll's result with its lease passed through, in one transaction; the account ids whose
        lease had changed since the read (their polls are ``busy`` and wrote nothing)."""
        busy: set[int] = set()
        # Records no message's fate (as a full idle poll's result): no fsync of its own.
        with (
            translated("record the idle probe's polls"),
            driver_transaction(self._engine, write=True, durable=False) as cursor,
        ):
            # In the order of the accounts' ids, as every batch write: two processes writing batches of the
            # same accounts in other orders (other configurations, `sync --account`) each held a row the
            # other waited for, and PostgreSQL failed one write (the whole batch then went to full polls).
            for poll in sorted(polls, key=lambda poll: poll.account_id):
                if not self._leases.pass_through(cursor, poll.account_id, poll.lease):
                    busy.add(poll.account_id)
                    continue
                self._succeeded.execute(cursor, _result(poll, now))
        return busy


def _padded(values: Sequence[Any]) -> dict[str, Any]:
    """The parameters of an IN list of ``values``, the list padded to its compiled length (``_IN_SIZES``)
    with the first value repeated."""
    return {f"in{n}": values[n] if n < len(values) else values[0] for n in range(_in_size(len(values)))}


def _in_size(count: int) -> int:
    """The compiled length an IN list of ``count`` values is padded to."""
    return next(size for size in _IN_SIZES if size >= count)


def _result(poll: IdlePoll, now: datetime) -> dict[str, Any]:
    """The parameters of the full poll's result statement (``Ledger.poll_finished``) for an idle poll."""
    return {
        "account": poll.account_id,
        "now": now,
        "result": "ok",
        "error": None,
        "next": poll.next_poll_at,
        "delivered": 0,
        "failed": 0,
        "deleted": 0,
        "listed": poll.listed,
        "started": poll.started,
    }
