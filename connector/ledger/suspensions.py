"""Suspending an account after repeated failed polls, and lifting the suspension (``pop-connector resume``).

``Ledger.suspensions``.
"""

from __future__ import annotations

from sqlalchemy import update

from connector.ledger.models import AccountRow
from connector.ledger.records import Clock
from connector.ledger.transactions import Transaction


class Suspensions:
    def __init__(self, transaction: Transaction, clock: Clock) -> None:
        self._transaction = transaction
        self._clock = clock

    def suspend(self, account_id: int, reason: str) -> None:
        with self._transaction("suspend account") as session:
            session.execute(
                update(AccountRow)
                .where(AccountRow.id == account_id)
                .values(suspended_at=self._clock(), suspended_reason=reason)
            )

    def resume(self, name: str) -> bool:
        """Lift a suspension and start counting failures afresh; the account is due at once. False when
        the ledger does not know the account."""
        with self._transaction("resume account") as session:
            result = session.execute(
                update(AccountRow)
                .where(AccountRow.name == name)
                .values(
                    suspended_at=None,
                    suspended_reason=None,
                    consecutive_failures=0,
                    next_poll_at=self._clock(),
                )
            )
            return bool(getattr(result, "rowcount", 0))
