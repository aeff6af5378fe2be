"""The one way the ledger's parts write and read through the ORM: ``Ledger``'s transaction, handed to
the parts composed into it (``Recipients``, ``Suspensions``, ``Quarantine``) when it builds them; and the
translation of driver errors into ``LedgerError`` that every part uses (``translated``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from connector.errors import LedgerError


class Transaction(Protocol):
    """A committed transaction (``Ledger._transaction``): driver errors, commit failures included, come out
    as ``LedgerError`` naming ``what``. With ``account_id`` it is one of that account's writes: it first
    checks that the account's poll still holds its lease and applies the writes the poll deferred, so that
    they commit in order with this one. Reads pass no ``account_id``."""

    def __call__(self, what: str, account_id: int | None = None) -> AbstractContextManager[Session]: ...


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Driver errors become ``LedgerError`` naming what the ledger was doing (commit failures included:
    this wraps the transaction). Every part of the ledger translates at its boundary with this."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise LedgerError(f"ledger: cannot {what}: {exc.__class__.__name__}: {exc}") from exc
