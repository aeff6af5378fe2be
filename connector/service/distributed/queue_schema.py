"""procrastinate's tables, in a PostgreSQL schema of their own, applied by procrastinate's schema applier.

They live in the schema ``procrastinate`` (not ``public``) so that the ledger's Alembic migrations and
model comparisons never see them, and every procrastinate connection runs with that ``search_path``.
Alembic does not manage them: a migration is frozen history, while this schema belongs to whichever
procrastinate version is installed. The version whose schema was applied is recorded; when a newer
procrastinate is installed, its own migration scripts newer than that version are applied in order.

One index is ours (``LOCK_INDEX``), created at every start when missing: procrastinate's job fetch looks up
the other waiting or running jobs of a candidate's ``lock``, and its own index for that leads with the
job id, so each look-up reads the whole index: with a few thousand poll jobs waiting (every account due
at once, after an outage or at the first start) each fetch took tens of milliseconds of database CPU and
the fleet polled a few accounts per second (procrastinate issue 1242; bench/distributed_scale.py).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path

from procrastinate.schema import SchemaManager
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from connector.errors import LedgerError

log = logging.getLogger(__name__)

QUEUE_SCHEMA = "procrastinate"
SEARCH_PATH_OPTION = f"-c search_path={QUEUE_SCHEMA}"
_VERSION_TABLE = f"{QUEUE_SCHEMA}.pop_connector_queue_version"
# Any constant: serialises concurrent start-ups of several workers on one fresh database.
_ADVISORY_LOCK_KEY = 0x504F5051
_MIGRATION_NAME = re.compile(r"^(\d+)\.(\d+)\.(\d+)_(\d+)_.*\.sql$")

Version = tuple[int, int, int]

LOCK_INDEX = "pop_connector_jobs_lock_idx"
_LOCK_INDEX_DDL = (
    f"CREATE INDEX IF NOT EXISTS {LOCK_INDEX} ON {QUEUE_SCHEMA}.procrastinate_jobs (lock, priority, id) "
    "WHERE status IN ('todo', 'doing')"
)


def installed_version() -> Version:
    return parse_version(importlib.metadata.version("procrastinate"))


def parse_version(text_version: str) -> Version:
    parts = re.findall(r"\d+", text_version)[:3]
    major, minor, patch = (int(part) for part in parts + ["0"] * (3 - len(parts)))
    return major, minor, patch


def migrations_after(names: list[str], applied: Version, target: Version) -> list[str]:
    """procrastinate's migration scripts that take a schema from ``applied`` up to ``target``, in order.

    A script named ``03.04.00_01_pre_...sql`` upgrades a schema older than 3.4.0 to 3.4.0; the serial
    number orders pre (01..) before post (50..) scripts of one version.
    """
    selected: list[tuple[Version, int, str]] = []
    for name in names:
        match = _MIGRATION_NAME.match(name)
        if match is None:
            continue
        major, minor, patch, serial = (int(group) for group in match.groups())
        if applied < (major, minor, patch) <= target:
            selected.append(((major, minor, patch), serial, name))
    return [name for *_key, name in sorted(selected)]


def ensure_queue_schema(engine: Engine) -> None:
    """Create or upgrade procrastinate's schema; a no-op when it is current. Safe to run concurrently."""
    target = installed_version()
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
            applied = _applied_version(connection)
            if applied == target:
                _ensure_lock_index(connection)  # a schema applied before the index was added
                return
            if applied is None:
                log.info("creating the job queue schema (procrastinate %s)", ".".join(map(str, target)))
                connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {QUEUE_SCHEMA}"))
                _run_script(connection, SchemaManager.get_schema())
                connection.execute(text(f"CREATE TABLE {_VERSION_TABLE} (version text NOT NULL)"))
                connection.execute(text(f"INSERT INTO {_VERSION_TABLE} VALUES ('')"))
            elif applied < target:
                _migrate(connection, applied, target)
            else:
                raise LedgerError(
                    f"the job queue schema is from procrastinate {'.'.join(map(str, applied))}, newer than "
                    f"the installed {'.'.join(map(str, target))}: upgrade pop-connector on this machine"
                )
            connection.execute(
                text(f"UPDATE {_VERSION_TABLE} SET version = :version"),
                {"version": ".".join(map(str, target))},
            )
            _ensure_lock_index(connection)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot create or upgrade the job queue schema: {exc}") from exc


def _ensure_lock_index(connection: Connection) -> None:
    # Looked up first: CREATE INDEX IF NOT EXISTS would lock the job table against writes at every start.
    name = f"{QUEUE_SCHEMA}.{LOCK_INDEX}"
    if connection.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar() is None:
        log.info("adding index %s to the job queue (fetching a job with many waiting)", LOCK_INDEX)
        connection.execute(text(_LOCK_INDEX_DDL))


def _applied_version(connection: Connection) -> Version | None:
    exists = connection.execute(text("SELECT to_regclass(:name)"), {"name": _VERSION_TABLE}).scalar()
    if exists is None:
        return None
    value = connection.execute(text(f"SELECT version FROM {_VERSION_TABLE}")).scalar()
    return parse_version(value) if value else None


def _migrate(connection: Connection, applied: Version, target: Version) -> None:
    directory = Path(SchemaManager.get_migrations_path())
    names = sorted(path.name for path in directory.glob("*.sql"))
    for name in migrations_after(names, applied, target):
        log.info("applying job queue migration %s", name)
        _run_script(connection, (directory / name).read_text(encoding="utf-8"))


def _run_script(connection: Connection, script: str) -> None:
    """A multi-statement SQL script, run as is (psycopg sends it in one simple-protocol query)."""
    connection.exec_driver_sql(f"SET LOCAL search_path = {QUEUE_SCHEMA}")
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(script)
    finally:
        cursor.close()
