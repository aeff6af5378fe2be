"""Quarantined messages (state ``failed``) for ``pop-connector quarantine list|retry``.

``Ledger.quarantine``. Messages go into quarantine with a poll's own writes (``Ledger.record_failure`` and
the like); this only lists them and lets them out again.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, update

from connector.ledger.models import AccountRow, MessageRow
from connector.ledger.records import Clock, MessageState, QuarantinedMessage
from connector.ledger.transactions import Transaction


class Quarantine:
    def __init__(self, transaction: Transaction, clock: Clock) -> None:
        self._transaction = transaction
        self._clock = clock

    def messages(self, account: str | None = None) -> list[QuarantinedMessage]:
        query = (
            select(MessageRow, AccountRow.name)
            .join(AccountRow, AccountRow.id == MessageRow.account_id)
            .where(MessageRow.state == MessageState.FAILED)
            .order_by(AccountRow.name, MessageRow.id)
        )
        if account is not None:
            query = query.where(AccountRow.name == account)
        with self._transaction("read quarantine") as session:
            return [
                QuarantinedMessage(
                    id=row.id,
                    account=name,
                    uidl=row.uidl,
                    attempts=row.attempts,
                    last_error=row.last_error,
                    size=row.size,
                    pop_size=row.pop_size,
                    message_id=row.message_id,
                    updated_at=row.updated_at,
                )
                for row, name in session.execute(query)
            ]

    def release(self, ids: Sequence[int] | None, account: str | None = None) -> int:
        """Put quarantined messages (``ids``, or all when None) back to ``pending`` with no attempts.

        ``pending``, not new: the next poll looks for each in the destination before delivering it,
        because an attempt that was counted as failed may in fact have reached it.
        """
        query = update(MessageRow).where(MessageRow.state == MessageState.FAILED)
        if ids is not None:
            query = query.where(MessageRow.id.in_(list(ids)))
        if account is not None:
            query = query.where(
                MessageRow.account_id.in_(select(AccountRow.id).where(AccountRow.name == account))
            )
        with self._transaction("release quarantined messages") as session:
            result = session.execute(
                query.values(state=MessageState.PENDING, attempts=0, updated_at=self._clock())
            )
            return int(getattr(result, "rowcount", 0) or 0)
