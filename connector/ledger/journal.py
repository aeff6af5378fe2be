"""The delivery journal: an append-only record of every delivery, and running totals per account.

The message rows of the ledger are for deciding what a poll does; they are forgotten once a message is
deleted from the server and gone from its listing. The journal is for proving afterwards what was moved:
one row per delivery (account, UIDL, Message-ID, size, SHA-256, destination reference, catch-all
recipient, time, poll), kept ``[service] journal_retention`` (default one year; 0 = forever), and totals
per account (messages, bytes, first and last delivery, quarantined messages, failed polls) that outlive
the rows' retention.

A journal row is written in the same transaction as the ``delivered`` record it reports (its statement
rides with that deferred write, see ``connector/ledger/store.py``), so the journal and the ledger never
disagree: a delivery that was not committed is in neither. That insert is all a delivery costs: the
totals are what the journal's rows count now plus ``account_totals``, which archives what pruned rows
counted (moved there in the pruning transaction) and the quarantined messages and failed polls that each
poll's result adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Executable,
    String,
    Table,
    bindparam,
    case,
    delete,
    func,
    select,
)
from sqlalchemy.dialects import sqlite

from connector.ledger import postgresql_dml as postgresql
from connector.ledger.models import AccountRow, AccountTotalsRow, DeliveryRow, UTCDateTime
from connector.ledger.records import AccountTotals, Clock, JournalEntry
from connector.ledger.transactions import Transaction


def _insert_for(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


class JournalStatements:
    """The statements that write the journal, built once per database (as the ledger's other hot writes)."""

    def __init__(self, dialect: str) -> None:
        deliveries = DeliveryRow.__table__
        totals = AccountTotalsRow.__table__
        assert isinstance(deliveries, Table) and isinstance(totals, Table)
        self.insert: Executable = deliveries.insert().values(
            account_id=bindparam("j_account"),
            uidl=bindparam("j_uidl"),
            message_id=bindparam("j_message_id"),
            size=bindparam("j_size"),
            sha256=bindparam("j_sha256"),
            stamp=bindparam("j_stamp"),
            destination_ref=bindparam("j_ref"),
            recipient=bindparam("j_recipient"),
            delivered_at=bindparam("j_at"),
            poll_started_at=bindparam("j_poll"),
            recovered=bindparam("j_recovered"),
        )
        # Adds to an account's archived totals: the journal rows about to be pruned, or a poll's
        # quarantined messages and failure (``t_*`` values, zeros for what does not apply).
        add = _insert_for(dialect)(totals).values(
            account_id=bindparam("t_account"),
            messages=bindparam("t_messages"),
            bytes=bindparam("t_bytes"),
            recovered=bindparam("t_recovered"),
            first_delivery_at=bindparam("t_first", type_=UTCDateTime()),
            last_delivery_at=bindparam("t_last", type_=UTCDateTime()),
            quarantined=bindparam("t_quarantined"),
            failed_polls=bindparam("t_failed"),
        )
        self.add: Executable = add.on_conflict_do_update(
            index_elements=[totals.c.account_id],
            set_={
                name: totals.c[name] + add.excluded[name]
                for name in ("messages", "bytes", "recovered", "quarantined", "failed_polls")
            }
            | {
                "first_delivery_at": func.coalesce(
                    totals.c.first_delivery_at, add.excluded.first_delivery_at
                ),
                "last_delivery_at": func.coalesce(add.excluded.last_delivery_at, totals.c.last_delivery_at),
            },
        )
        old = (
            DeliveryRow.account_id == bindparam("t_account"),
            DeliveryRow.delivered_at < bindparam("t_before"),
        )
        self.aged: Executable = select(
            func.count(),
            func.coalesce(func.sum(DeliveryRow.size), 0),
            func.coalesce(func.sum(case((DeliveryRow.recovered, 1), else_=0)), 0),
            func.min(DeliveryRow.delivered_at),
            func.max(DeliveryRow.delivered_at),
        ).where(*old)
        self.prune: Executable = delete(DeliveryRow).where(*old)


def poll_counts(account_id: int, *, quarantined: int, failed: bool) -> dict[str, Any]:
    """What one poll adds to its account's totals (nothing delivered: deliveries are the journal's rows)."""
    return {
        "t_account": account_id,
        "t_messages": 0,
        "t_bytes": 0,
        "t_recovered": 0,
        "t_first": None,
        "t_last": None,
        "t_quarantined": quarantined,
        "t_failed": int(failed),
    }


def archive_aged(connection: Connection, sql: JournalStatements, account_id: int, before: datetime) -> None:
    """Prune the account's journal rows older than ``before``, adding what they counted to its archived
    totals first (same transaction), so that the totals never change when rows go."""
    params = {"t_account": account_id, "t_before": before}
    count, size, recovered, first, last = connection.execute(sql.aged, params).one()
    if not count:
        return
    archived = {
        "t_messages": count,
        "t_bytes": size,
        "t_recovered": recovered,
        "t_first": first,
        "t_last": last,
    }
    connection.execute(sql.add, {**poll_counts(account_id, quarantined=0, failed=False), **archived})
    connection.execute(sql.prune, params)


def entry_params(account_id: int, entry: JournalEntry, at: datetime) -> dict[str, Any]:
    return {
        "j_account": account_id,
        "j_uidl": entry.uidl,
        "j_message_id": entry.message_id,
        "j_size": entry.size,
        "j_sha256": entry.sha256,
        "j_stamp": entry.stamp,
        "j_ref": entry.ref,
        "j_recipient": entry.recipient,
        "j_at": at,
        "j_poll": entry.poll_started_at,
        "j_recovered": entry.recovered,
    }


class Journal:
    """Reading the journal (``pop-connector report``, ``reconcile``, the status page)."""

    def __init__(self, transaction: Transaction, clock: Clock) -> None:
        self._transaction = transaction
        self._clock = clock

    def totals(self, accounts: Sequence[str] | None = None) -> list[AccountTotals]:
        """Per-account totals: the archived ones (pruned rows, quarantined, failed polls) plus what the
        journal's rows count now; an account that never delivered has zeros. In the order of
        ``accounts`` (else by name)."""
        archived_query = (
            select(AccountRow.name, AccountTotalsRow)
            .select_from(AccountRow)
            .outerjoin(AccountTotalsRow, AccountTotalsRow.account_id == AccountRow.id)
        )
        live_query = (
            select(
                AccountRow.name,
                func.count(),
                func.coalesce(func.sum(DeliveryRow.size), 0),
                func.coalesce(func.sum(case((DeliveryRow.recovered, 1), else_=0)), 0),
                func.min(DeliveryRow.delivered_at),
                func.max(DeliveryRow.delivered_at),
            )
            .join(AccountRow, AccountRow.id == DeliveryRow.account_id)
            .group_by(AccountRow.name)
        )
        if accounts is not None:
            archived_query = archived_query.where(AccountRow.name.in_(list(accounts)))
            live_query = live_query.where(AccountRow.name.in_(list(accounts)))
        with self._transaction("read the delivery totals") as session:
            archived = {name: row for name, row in session.execute(archived_query)}
            live = {row[0]: row[1:] for row in session.execute(live_query)}
        names = list(accounts) if accounts is not None else sorted(archived)
        return [_totals(name, archived[name], live.get(name)) for name in names if name in archived]

    def deliveries(
        self, account: str, *, since: datetime | None = None, limit: int | None = None
    ) -> list[tuple[JournalEntry, datetime]]:
        """An account's journaled deliveries, oldest first (``limit``: the newest ``limit`` of them)."""
        query = (
            select(DeliveryRow)
            .join(AccountRow, AccountRow.id == DeliveryRow.account_id)
            .where(AccountRow.name == account)
        )
        if since is not None:
            query = query.where(DeliveryRow.delivered_at >= since)
        if limit is not None:
            query = query.order_by(DeliveryRow.id.desc()).limit(limit)
        with self._transaction(f"read the delivery journal of {account!r}") as session:
            rows = list(session.scalars(query))
        rows.sort(key=lambda row: row.id)
        return [(_entry(row), row.delivered_at) for row in rows]

    def per_day(self, account: str, since: datetime) -> dict[str, int]:
        """Deliveries per UTC day (``YYYY-MM-DD``) since ``since``, days without any left out."""
        return self.per_day_of([account], since).get(account, {})

    def per_day_of(self, accounts: Sequence[str], since: datetime) -> dict[str, dict[str, int]]:
        """``per_day`` of several accounts in one query (the status page charts a page of accounts at
        once), counted by the database: an account's month can be tens of thousands of rows. Accounts
        without deliveries since ``since`` are left out."""
        if not accounts:
            return {}
        counts: dict[str, dict[str, int]] = {}
        with self._transaction("read the deliveries per day") as session:
            day = _utc_day(session.get_bind().dialect.name)
            query = (
                select(AccountRow.name, day, func.count())
                .join(AccountRow, AccountRow.id == DeliveryRow.account_id)
                .where(AccountRow.name.in_(list(accounts)), DeliveryRow.delivered_at >= since)
                .group_by(AccountRow.name, day)
            )
            for name, date, count in session.execute(query):
                counts.setdefault(name, {})[str(date)] = int(count)
        return counts


def _utc_day(dialect: str) -> ColumnElement[str]:
    """A delivery's UTC day as ``YYYY-MM-DD``. SQLite keeps the UTC time as ISO text (its first ten
    characters are the day); PostgreSQL's ``timestamptz`` is put in UTC first, whatever the session's zone."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", DeliveryRow.delivered_at), "YYYY-MM-DD", type_=String)
    return func.substr(DeliveryRow.delivered_at, 1, 10, type_=String)


def _entry(row: DeliveryRow) -> JournalEntry:
    return JournalEntry(
        uidl=row.uidl,
        message_id=row.message_id,
        size=row.size,
        sha256=row.sha256,
        ref=row.destination_ref,
        poll_started_at=row.poll_started_at,
        recipient=row.recipient,
        recovered=row.recovered,
        stamp=row.stamp,
    )


def _totals(name: str, row: AccountTotalsRow | None, live: Any) -> AccountTotals:
    count, size, recovered, first, last = live if live is not None else (0, 0, 0, None, None)
    # PostgreSQL's SUM is a numeric (Decimal); SQLite's MIN/MAX of a datetime is naive.
    count, size, recovered, first, last = int(count), int(size), int(recovered), _utc(first), _utc(last)
    if row is None:
        return AccountTotals(name, count, size, recovered, first, last, 0, 0)
    return AccountTotals(
        name,
        row.messages + count,
        row.bytes + size,
        row.recovered + recovered,
        row.first_delivery_at or first,
        last or row.last_delivery_at,
        row.quarantined,
        row.failed_polls,
    )


def _utc(value: datetime | None) -> datetime | None:
    """An aggregate's datetime: SQLite hands back a naive one (stored as UTC)."""
    if value is None or (isinstance(value, datetime) and value.tzinfo is not None):
        return value
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC)
