"""Is the service healthy? The scheduler must start polls when they are due, and the ledger must answer.

``HealthMonitor`` watches polls start and finish (their events) and remembers when each account is due
next; an account still not started ``health_grace`` after it was due means the scheduler is stuck (its
thread died, or every worker is blocked). The rules are the pure function ``health_problems``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from connector.ledger.store import Ledger
from connector.poll.events import Finished, PollEvent, Started


def overdue_accounts(due: Mapping[str, datetime], now: datetime, grace: timedelta) -> list[str]:
    """Accounts whose poll should have started more than ``grace`` ago, most overdue first."""
    late = [(when, name) for name, when in due.items() if now - when > grace]
    return [name for _when, name in sorted(late)]


def health_problems(
    due: Mapping[str, datetime], now: datetime, grace: timedelta, database_error: str | None
) -> list[str]:
    problems = []
    if database_error is not None:
        problems.append(f"database unreachable: {database_error}")
    for name in overdue_accounts(due, now, grace):
        problems.append(
            f"scheduler stuck: account {name} was due at {due[name].isoformat(timespec='seconds')} "
            f"and has not started (grace {grace.total_seconds():g}s)"
        )
    return problems


def database_error(ledger: Ledger) -> str | None:
    """None when the ledger database answers a trivial query, else why not (no secrets: no URL)."""
    try:
        with ledger.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
    return None


class HealthMonitor:
    """A ``PollObserver``: which accounts are being polled, and when the others are due."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[str, datetime] = {}
        self._polling: set[str] = set()
        self._configured: set[str] = set()

    def configure(self, accounts: Iterable[str], scheduled: Mapping[str, datetime]) -> None:
        """After start or reload: which accounts exist, and when the scheduler means to poll them."""
        with self._lock:
            self._configured = set(accounts)
            self._due = {name: when for name, when in self._due.items() if name in self._configured}
            for name, when in scheduled.items():
                if name in self._configured and name not in self._polling:
                    self._due[name] = when

    def notify(self, event: PollEvent) -> None:
        match event:
            case Started():
                with self._lock:
                    self._due.pop(event.account, None)
                    self._polling.add(event.account)
            case Finished():
                self._finished(event)
            case _:
                pass

    def _finished(self, event: Finished) -> None:
        result = event.result
        with self._lock:
            self._polling.discard(event.account)
            if result.next_poll_at is not None and event.account in self._configured:
                self._due[event.account] = result.next_poll_at

    def due(self) -> dict[str, datetime]:
        with self._lock:
            return dict(self._due)

    def polling(self) -> set[str]:
        with self._lock:
            return set(self._polling)
