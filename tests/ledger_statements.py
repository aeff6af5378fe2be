"""The ledger's statements as the database driver runs them, grouped by transaction.

Seen at the DB-API connection, not through SQLAlchemy's events: a poll's own statements run on the
driver's cursor (connector/ledger/prepared.py), and SQLAlchemy never sees them. SQLite's trace callback
and a recording psycopg cursor are set on each pooled connection while it is checked out; every checkout
of the ledger is one transaction (``engine.begin()``, a session, ``driver_transaction``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import Engine, event

_BRACKETS = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "SET", "PRAGMA")


@dataclass
class Transactions:
    """The first three words of each statement (BEGIN, COMMIT, PRAGMA left out), per committed transaction."""

    committed: list[list[str]] = field(default_factory=list)
    current: list[str] = field(default_factory=list)
    rolled_back: bool = False
    # Every statement as it was sent, BEGIN, COMMIT and PRAGMA included.
    sent: list[str] = field(default_factory=list)

    def statement(self, text: str) -> None:
        self.sent.append(" ".join(text.split()))
        words = text.split()
        if not words:
            return
        if words[0].upper() == "ROLLBACK":
            self.rolled_back = True
        elif words[0].upper() not in _BRACKETS and text.strip() != "SELECT 1":  # the pool's ping
            self.current.append(" ".join(words[:3]))

    def end(self) -> None:
        if self.current and not self.rolled_back:
            self.committed.append(self.current)
        self.current, self.rolled_back = [], False

    def writes(self) -> list[list[str]]:
        return [t for t in self.committed if any(not s.startswith("SELECT") for s in t)]

    def reads(self) -> list[list[str]]:
        return [t for t in self.committed if t and all(s.startswith("SELECT") for s in t)]


@contextmanager
def counted(engine: Engine) -> Iterator[Transactions]:
    seen = Transactions()

    class Recording(psycopg.Cursor[Any]):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            seen.statement(str(query))
            return super().execute(query, *args, **kwargs)

    def checkout(dbapi_connection: Any, _record: object, _proxy: object) -> None:
        if isinstance(dbapi_connection, psycopg.Connection):
            dbapi_connection.cursor_factory = Recording
        else:
            dbapi_connection.set_trace_callback(seen.statement)

    def checkin(dbapi_connection: Any, _record: object) -> None:
        if isinstance(dbapi_connection, psycopg.Connection):
            dbapi_connection.cursor_factory = psycopg.Cursor
        elif dbapi_connection is not None:
            dbapi_connection.set_trace_callback(None)
        seen.end()

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)
    try:
        yield seen
    finally:
        event.remove(engine, "checkout", checkout)
        event.remove(engine, "checkin", checkin)
