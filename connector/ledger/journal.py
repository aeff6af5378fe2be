"""The delivery journal: an append-only record of every delivery, and running totals per account.

The message rows of the ledger are for deciding what a poll does; they are forgotten once a message is
deleted from the server and gone from its listing. The journal is for proving afterwards what was moved:
one row per delivery (account, UIDL, Message-ID, size, SHA-256, destination reference, catch-all
recipient, time, poll), kept ``[service] journal_retention`` (default one year; 0 = forever), and totals
per account (messages, bytes, first and last delivery, quarantined messages, failed polls) that outlive
the rows' retention.

A journal row is written in the same transaction as the ``delivered`` record it reports (its statements
ride with that deferred write, see ``connector/ledger/store.py``), so the journal and the ledger never
disagree: a delivery that was not committed is in neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Executable, Table, bindparam, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from connector.ledger.models import AccountRow, AccountTotalsRow, DeliveryRow
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
            destination_ref=bindparam("j_ref"),
            recipient=bindparam("j_recipient"),
            delivered_at=bindparam("j_at"),
            poll_started_at=bindparam("j_poll"),
            recovered=bindparam("j_recovered"),
        )
        add = _insert_for(dialect)(totals).values(
            account_id=bindparam("j_account"),
            messages=1,
            bytes=bindparam("j_size"),
            recovered=bindparam("j_recovered_count"),
            first_delivery_at=bindparam("j_at"),
            last_delivery_at=bindparam("j_at"),
            quarantined=0,
            failed_polls=0,
        )
        self.count: Executable = add.on_conflict_do_update(
            index_elements=[totals.c.account_id],
            set_={
                "messages": totals.c.messages + 1,
                "bytes": totals.c.bytes + add.excluded.bytes,
                "recovered": totals.c.recovered + add.excluded.recovered,
                "first_delivery_at": func.coalesce(
                    totals.c.first_delivery_at, add.excluded.first_delivery_at
                ),
                "last_delivery_at": add.excluded.last_delivery_at,
            },
        )
        poll = _insert_for(dialect)(totals).values(
            account_id=bindparam("t_account"),
            messages=0,
            bytes=0,
            recovered=0,
            quarantined=bindparam("t_quarantined"),
            failed_polls=bindparam("t_failed"),
        )
        self.poll: Executable = poll.on_conflict_do_update(
            index_elements=[totals.c.account_id],
            set_={
                "quarantined": totals.c.quarantined + poll.excluded.quarantined,
                "failed_polls": totals.c.failed_polls + poll.excluded.failed_polls,
            },
        )
        self.prune: Executable = delete(DeliveryRow).where(
            DeliveryRow.account_id == bindparam("t_account"),
            DeliveryRow.delivered_at < bindparam("t_before"),
        )


def entry_params(account_id: int, entry: JournalEntry, at: datetime) -> dict[str, Any]:
    return {
        "j_account": account_id,
        "j_uidl": entry.uidl,
        "j_message_id": entry.message_id,
        "j_size": entry.size,
        "j_sha256": entry.sha256,
        "j_ref": entry.ref,
        "j_recipient": entry.recipient,
        "j_at": at,
        "j_poll": entry.poll_started_at,
        "j_recovered": entry.recovered,
        "j_recovered_count": int(entry.recovered),
    }


class Journal:
    """Reading the journal (``pop-connector report``, ``reconcile``, the status page)."""

    def __init__(self, transaction: Transaction, clock: Clock) -> None:
        self._transaction = transaction
        self._clock = clock

    def totals(self, accounts: Sequence[str] | None = None) -> list[AccountTotals]:
        """Per-account totals (an account that never delivered has zeros), in the order of ``accounts``."""
        query = (
            select(AccountRow.name, AccountTotalsRow)
            .select_from(AccountRow)
            .outerjoin(AccountTotalsRow, AccountTotalsRow.account_id == AccountRow.id)
        )
        if accounts is not None:
            query = query.where(AccountRow.name.in_(list(accounts)))
        with self._transaction("read the delivery totals") as session:
            found = {name: row for name, row in session.execute(query)}
        names = list(accounts) if accounts is not None else sorted(found)
        return [_totals(name, found[name]) for name in names if name in found]

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
        counts: dict[str, int] = {}
        for _, at in self.deliveries(account, since=since):
            day = at.date().isoformat()
            counts[day] = counts.get(day, 0) + 1
        return counts


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
    )


def _totals(name: str, row: AccountTotalsRow | None) -> AccountTotals:
    if row is None:
        return AccountTotals(name, 0, 0, 0, None, None, 0, 0)
    return AccountTotals(
        name,
        row.messages,
        row.bytes,
        row.recovered,
        row.first_delivery_at,
        row.last_delivery_at,
        row.quarantined,
        row.failed_polls,
    )
