"""Alembic environment: runs against the engine the connector passes in, or alembic.ini's URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine, create_engine

from connector.errors import LedgerError
from connector.ledger.models import Base

config = context.config
target_metadata = Base.metadata


def _engine() -> Engine:
    engine: Engine | None = config.attributes.get("engine")
    if engine is not None:
        return engine
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url in alembic.ini or use `pop-connector db upgrade`")
    from connector.ledger.database import make_engine

    return make_engine(url) if url else create_engine(url)


def _sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    # On the DB-API connection: SQLAlchemy would open a transaction first, and SQLite ignores this pragma
    # inside one.
    driver = connection.connection.driver_connection
    assert driver is not None  # a connection of a live Connection
    driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode rebuilds a table as copy, DROP, rename. With foreign keys on, dropping the old
            # `accounts` deletes every row that references it (ON DELETE CASCADE): the whole ledger of
            # messages. So they are off while migrating, and checked before they are on again.
            _sqlite_foreign_keys(connection, on=False)
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
                render_as_batch=sqlite,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                connection.commit()
                if broken:
                    raise LedgerError(f"the migrated ledger has rows whose references are gone: {broken[:5]}")
        finally:
            if sqlite:
                _sqlite_foreign_keys(connection, on=True)


run_migrations_online()
