"""The one way the ledger's parts write and read through the ORM: ``Ledger``'s transaction, handed to
the parts composed into it (``Recipients``, ``Suspensions``, ``Quarantine``) when it builds them."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from sqlalchemy.orm import Session


class Transaction(Protocol):
    """A committed transaction (``Ledger._transaction``): driver errors, commit failures included, come out
    as ``LedgerError`` naming ``what``. With ``account_id`` it is one of that account's writes: it first
    checks that the account's poll still holds its lease and applies the writes the poll deferred, so that
    they commit in order with this one. Reads pass no ``account_id``."""

    def __call__(self, what: str, account_id: int | None = None) -> AbstractContextManager[Session]: ...
