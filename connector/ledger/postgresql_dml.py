"""PostgreSQL's ``INSERT ... ON CONFLICT``, with SQLAlchemy's PostgreSQL dialect imported when the first such
statement is built: only by a ledger on PostgreSQL.

``from sqlalchemy.dialects import postgresql`` loads the whole dialect package and its four drivers' modules:
about 120 M instructions, 6% of ``pop-connector status`` on a SQLite ledger, which never builds a PostgreSQL
statement (issue 16's start-up goal). The ledger's modules import this one in its place
(``from connector.ledger import postgresql_dml as postgresql``), so that ``postgresql.insert`` reads as
before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.dialects.postgresql import Insert


def insert(table: Any) -> Insert:
    """``sqlalchemy.dialects.postgresql.insert(table)``: ``table`` a ``Table`` or a mapped class."""
    from sqlalchemy.dialects.postgresql import insert as postgresql_insert

    return postgresql_insert(table)
