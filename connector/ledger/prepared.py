"""The statements of every poll, run on the database driver's own connection (issue 16).

SQLAlchemy costs 30-60 µs of CPU per statement before SQLite runs it (more after the thread slept in a
socket read), and 35 µs per transaction: more than SQLite needs to run the statement and commit it. An
idle poll makes a handful of them, and that was most of its CPU (docs/benchmarks.md, "Idle polls").
The statements of every poll are therefore still written once as SQLAlchemy Core (models.py's tables, the
same SQL for SQLite and PostgreSQL), but compiled once per dialect (``Prepared``) and run on the DB-API
cursor, in transactions of their own (``driver_transaction``) or inside a SQLAlchemy one (``cursor_of``).

What SQLAlchemy did that these must still do: its type conversions (bind and result processors: an aware
datetime on SQLite is a string in a fixed format, which the lease's compare-and-set compares), SQLite's
``BEGIN`` / ``BEGIN IMMEDIATE`` (connector/ledger/database.py) and PostgreSQL's snapshot for reads of
several statements, and its errors: a driver error leaves here as SQLAlchemy's ``DBAPIError`` subclass
(``IntegrityError``, ``OperationalError``), which the ledger turns into ``LedgerError`` as before, and a
connection the error broke is invalidated, not handed back to the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, Executable
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

# A DB-API cursor (sqlite3's or psycopg's): only execute, rowcount and the fetches are used.
Cursor = Any
_Processor = Callable[[Any], Any] | None


class Prepared:
    """One Core statement compiled once for ``dialect``, run on a DB-API cursor with SQLAlchemy's own
    conversions of its parameters and result columns."""

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        # A parameter rendered only when the statement runs (IN lists, aggregate_strings' separator) has
        # no place in a statement compiled once.
        assert "POSTCOMPILE" not in self.sql, self.sql
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error
        binds = compiled.binds
        positional = compiled.positiontup
        names: Sequence[str] = positional if positional is not None else list(binds)
        self._positional = positional is not None
        # Per parameter, in the order the text wants them: its name, its type's conversion, and the value
        # it has in the statement itself (a literal such as ``consecutive_failures = 0``).
        self._params: list[tuple[str, _Processor, Any]] = []
        for name in names:
            bind = binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self._params.append((name, processor, bind.effective_value))
        columns = statement.exported_columns if hasattr(statement, "exported_columns") else ()
        self._results: list[_Processor] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]
        self._convert_rows = any(processor is not None for processor in self._results)

    def _arguments(self, params: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        values = []
        for name, processor, default in self._params:
            value = params.get(name, default)
            values.append(processor(value) if processor is not None and value is not None else value)
        if self._positional:
            return values
        return {name: value for (name, _processor, _default), value in zip(self._params, values, strict=True)}

    def execute(self, cursor: Cursor, params: Mapping[str, Any]) -> Cursor:
        """Run the statement; a driver error becomes SQLAlchemy's (see the module doc)."""
        try:
            cursor.execute(self.sql, self._arguments(params))
        except self._dbapi_error as exc:
            raise _sqlalchemy_error(self.sql, exc) from exc
        return cursor

    def rowcount(self, cursor: Cursor, params: Mapping[str, Any]) -> int:
        return int(self.execute(cursor, params).rowcount)

    def rows(self, cursor: Cursor, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        fetched: list[tuple[Any, ...]] = self.execute(cursor, params).fetchall()
        if not self._convert_rows:
            return fetched
        processors = self._results
        return [
            tuple(
                value if process is None or value is None else process(value)
                for process, value in zip(processors, row, strict=True)
            )
            for row in fetched
        ]

    def first(self, cursor: Cursor, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        rows = self.rows(cursor, params)
        return rows[0] if rows else None


def _sqlalchemy_error(statement: str | None, exc: Exception) -> DBAPIError:
    error = DBAPIError.instance(statement, None, exc, type(exc), hide_parameters=True)
    assert isinstance(error, DBAPIError)
    return error


def cursor_of(connection: Connection) -> Cursor:
    """A cursor on the DB-API connection under a SQLAlchemy one: its statements run in that connection's
    transaction."""
    return connection.connection.driver_connection.cursor()  # type: ignore[union-attr]


@contextmanager
def driver_transaction(
    engine: Engine, *, write: bool, snapshot: bool = False, durable: bool = True, single: bool = False
) -> Iterator[Cursor]:
    """A transaction on a pooled connection's DB-API connection, committed at the end (rolled back on an
    exception). SQLite: ``BEGIN IMMEDIATE`` for a write (the write lock up front, as the ledger's other
    writes), a plain ``BEGIN`` for a read. PostgreSQL: the driver begins by itself; ``snapshot`` makes all
    the statements see one state of the ledger (REPEATABLE READ), as ``Ledger._snapshots`` does.
    ``single``: one read statement, which SQLite runs as a transaction of its own (no BEGIN, no COMMIT).

    ``durable=False``: a SQLite write that records nothing a message's fate depends on (an idle poll's
    result and lease) commits without its own fsync (``synchronous=NORMAL`` for this commit; the ledger's
    other commits keep ``FULL``, connector/ledger/database.py). A process crash loses nothing; a power cut
    may lose this commit, never a later one (the next fsync of the write-ahead log takes it along), and
    losing it leaves the account as before the poll: the lease expired, the result of the poll before.
    That fsync was a fifth of an idle poll's CPU (docs/benchmarks.md, issue 16)."""
    dialect = engine.dialect
    dbapi_error: type[Exception] = dialect.loaded_dbapi.Error
    pooled = engine.raw_connection()
    driver = pooled.driver_connection
    cursor = None
    relaxed = write and not durable and dialect.name == "sqlite"
    try:
        cursor = driver.cursor()  # type: ignore[union-attr]
        if relaxed:  # SQLite refuses to change it inside a transaction
            cursor.execute("PRAGMA synchronous=NORMAL")
        if dialect.name == "sqlite" and not (single and not write):
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        elif snapshot:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        yield cursor
        driver.commit()  # type: ignore[union-attr]
    except BaseException as exc:
        cause = exc.__cause__ if isinstance(exc, DBAPIError) else exc
        if isinstance(cause, dbapi_error) and dialect.is_disconnect(cause, driver, cursor):  # type: ignore[arg-type]
            pooled.invalidate(cause)  # a dead connection must not go back to the pool
        else:
            try:
                driver.rollback()  # type: ignore[union-attr]
            except dbapi_error as rollback_error:
                pooled.invalidate(rollback_error)
        if isinstance(exc, dbapi_error):  # BEGIN or COMMIT
            raise _sqlalchemy_error(None, exc) from exc
        raise
    finally:
        if relaxed:
            _restore_full_sync(pooled, driver)
        pooled.close()


def _restore_full_sync(pooled: Any, driver: Any) -> None:
    """Every other commit of this pooled connection fsyncs again; one that cannot be sure of it is not
    used again."""
    try:
        driver.execute("PRAGMA synchronous=FULL")
    except Exception as exc:
        if pooled.is_valid:
            pooled.invalidate(exc)
