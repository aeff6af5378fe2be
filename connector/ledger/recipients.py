"""Ledger operations for catch-all (multidrop) delivery: one row per (message, recipient mailbox).

``Ledger.recipients``. Each write is its own committed transaction, like every other ledger write, so a
crash between two recipients leaves exactly the delivered ones recorded.
"""

from __future__ import annotations

from sqlalchemy import Select, select, update

from connector.ledger.journal import JournalStatements, entry_params
from connector.ledger.models import MessageRow, RecipientRow
from connector.ledger.records import Clock, JournalEntry, RecipientState
from connector.ledger.transactions import Transaction


class Recipients:
    def __init__(self, transaction: Transaction, clock: Clock, journal: JournalStatements) -> None:
        self._transaction = transaction
        self._clock = clock
        self._journal = journal

    def states(self, account_id: int, uidl: str) -> dict[str, RecipientState]:
        """mailbox -> state of every recipient row of one message (empty for a message never routed)."""
        with self._transaction(f"read recipients of message {uidl!r}") as session:
            rows = session.execute(
                select(RecipientRow.mailbox, RecipientRow.state).where(
                    RecipientRow.message_id == _message(account_id, uidl).scalar_subquery()
                )
            )
            return {row.mailbox: RecipientState(row.state) for row in rows}

    def record_pending(self, account_id: int, uidl: str, mailbox: str) -> None:
        """About to deliver into ``mailbox``; the message row must exist (``Ledger.record_pending`` first)."""
        now = self._clock()
        with self._transaction(f"record recipient {mailbox!r} of message {uidl!r}", account_id) as session:
            message_id = session.scalar(_message(account_id, uidl))
            assert message_id is not None, "record_pending must come first"
            found = session.scalar(
                select(RecipientRow).where(
                    RecipientRow.message_id == message_id, RecipientRow.mailbox == mailbox
                )
            )
            if found is None:
                session.add(
                    RecipientRow(
                        message_id=message_id, mailbox=mailbox, state=RecipientState.PENDING, updated_at=now
                    )
                )

    def record_delivered(
        self,
        account_id: int,
        uidl: str,
        mailbox: str,
        destination_ref: str,
        *,
        journal: JournalEntry | None = None,
    ) -> None:
        """The recipient has the message; journaled (connector/ledger/journal.py) in the same transaction."""
        now = self._clock()
        with self._transaction(f"record delivery of message {uidl!r} to {mailbox!r}", account_id) as session:
            if journal is not None:
                entry = entry_params(account_id, journal, now)
                session.execute(self._journal.insert, entry)
            session.execute(
                update(RecipientRow)
                .where(
                    RecipientRow.message_id == _message(account_id, uidl).scalar_subquery(),
                    RecipientRow.mailbox == mailbox,
                )
                .values(
                    state=RecipientState.DELIVERED,
                    destination_ref=destination_ref,
                    delivered_at=now,
                    updated_at=now,
                )
            )


def _message(account_id: int, uidl: str) -> Select[int]:
    return select(MessageRow.id).where(MessageRow.account_id == account_id, MessageRow.uidl == uidl)
