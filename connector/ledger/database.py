"""Opening the ledger database and bringing its schema up to date with Alembic."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from connector.errors import ConfigError, LedgerError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# The newest migration in migrations/versions (tests/integration/test_ledger.py checks it is Alembic's head).
# A ledger already there is not handed to Alembic at all: importing it costs a command more start-up time
# than the command's own work.
HEAD_REVISION = "0007"

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Seconds; a ?connect_timeout= in the database URL wins.
POSTGRES_CONNECT_TIMEOUT = 10


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    # Let SQLAlchemy, not pysqlite, decide when transactions begin, so BEGIN IMMEDIATE below applies.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed "delivered" row survives a power cut, not just a process crash.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# An execution option of the ledger's reads (``Ledger._reading``): a plain BEGIN, see below.
READ_ONLY = "ledger_read_only"


def _sqlite_begin(connection: Any) -> None:
    # IMMEDIATE takes the write lock up front; a deferred transaction that later writes can fail with
    # SQLITE_BUSY at once instead of waiting for busy_timeout when several accounts poll in parallel.
    # A transaction that only reads needs no write lock (WAL: it reads its own snapshot), so that reads
    # neither wait for writers nor make them wait.
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _create_private_file(path: Path) -> None:
    """The ledger holds mailbox names and message metadata: readable by its owner only. SQLite gives its
    -wal and -shm files the same mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def make_engine(url: str, *, threads: int = 8) -> Engine:
    """An engine for ``url``; a SQLite file's directory is created when missing. ``threads``: how many
    threads use the ledger at once (``max_workers``): the pool keeps that many connections and two more
    (the lease renewer, the status page). A pool smaller than that closes a connection at each check-in
    beyond its size and opens one at the next check-out: with SQLAlchemy's default of 5 and 8 poll
    threads, dozens of connects per thousand idle polls (for PostgreSQL each a new server process)."""
    pool_size = threads + 2
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"service.database: not a database URL: {url!r}") from exc
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            _create_private_file(Path(database))
        engine = create_engine(
            parsed, pool_size=pool_size, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # libpq waits for an unreachable server as long as TCP does (minutes): a poll should fail sooner.
    connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT}
    try:
        return create_engine(parsed, pool_pre_ping=True, pool_size=pool_size, connect_args=connect_args)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"service.database: cannot use {parsed.render_as_string()}: {exc}") from exc


def migrations_dir() -> str:
    """The source tree's migrations/ when running from a checkout (so a work tree uses its own), else the
    copy installed as the package ``connector.migrations``."""
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").is_file():
        return str(checkout)
    return str(resources.files("connector.migrations"))


def alembic_config(engine: Engine) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", migrations_dir())
    config.attributes["engine"] = engine
    return config


# Any constant: on PostgreSQL several processes (distributed workers) may start on one fresh database at
# once, and two Alembic runs creating the same tables would fail; they take turns instead.
_MIGRATION_LOCK_KEY = 0x504F504D


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            connection.commit()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply every migration not yet applied (a no-op on an up-to-date database)."""
    if revision == "head" and _at_head(engine):
        return
    from alembic import command

    try:
        with _migration_lock(engine):
            command.upgrade(alembic_config(engine), revision)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot migrate the ledger database: {exc}") from exc


def open_database(url: str, *, migrate: bool = True, threads: int = 8) -> Engine:
    engine = make_engine(url, threads=threads)
    if migrate:
        upgrade(engine)
    return engine


def _at_head(engine: Engine) -> bool:
    """The ledger is at ``HEAD_REVISION`` already (one read; any failure: let Alembic decide)."""
    try:
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except SQLAlchemyError:
        return False
    return versions == [HEAD_REVISION]
