"""The ledger failing in the middle of a poll (issue 12.4): a DELE goes out only for a message whose
``delivered`` row is committed, however the commit fails, and the next poll loses nothing and delivers
nothing twice.

The failures are real ones: SQLite's own "database or disk is full" (``PRAGMA max_page_count`` keeps the
file from growing) and a PostgreSQL backend terminated by the server (``pg_terminate_backend``) while the
transaction that carries a deferred ``delivered`` update runs. A SQLAlchemy event only picks the moment.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event

from connector.errors import LedgerError
from connector.ledger.records import MessageState, PollOutcome
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.postgres import POSTGRES_ADMIN_DSN
from tests.servers.dovecot import Dovecot, MailUsers


def message_ids(messages: list[bytes]) -> list[str]:
    ids = []
    for message in messages:
        for line in message.replace(b"\r\n", b"\n").split(b"\n"):
            if line.lower().startswith(b"message-id:"):
                ids.append(line.split(b":", 1)[1].strip().decode())
                break
    return ids


def assert_deleted_only_when_recorded(
    dovecot: Dovecot, mail_users: MailUsers, engine: SyncEngine, seeded: list[bytes]
) -> None:
    """Every seeded message that is no longer on the POP3 server has a committed delivered row."""
    account_id = engine.ledger.account_id(engine.config.accounts[0].name, create=False)
    assert account_id is not None
    rows = {row.message_id: row for row in engine.ledger.known_messages(account_id).values()}
    left = set(message_ids(dovecot.maildir_messages(mail_users.source.name)))
    for message_id in message_ids(seeded):
        if message_id in left:
            continue
        row = rows.get(message_id)
        state = row.state if row is not None else None
        assert state in (MessageState.DELIVERED, MessageState.DELETED), (
            f"{message_id[:40]} was DELEted from the POP3 server while its row is {state}"
        )


def assert_each_delivered_once(dovecot: Dovecot, mail_users: MailUsers, seeded: list[bytes]) -> None:
    delivered = message_ids(dovecot.imap_messages(mail_users.destination.name))
    assert sorted(delivered) == sorted(message_ids(seeded))
    assert dovecot.maildir_count(mail_users.source.name) == 0


def big_message_id(n: int, size: int) -> bytes:
    """A message whose ``pending`` row needs ``size`` bytes of new pages (an overflow chain)."""
    return simple(n).replace(f"<msg{n}@example.net>".encode(), f"<{'x' * size}.{n}@example.net>".encode())


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("outage", ["next message's row", "rest of the poll"])
def test_sqlite_disk_full_on_the_commit_carrying_a_delivery(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, database: str, outage: str
) -> None:
    _, engine = make_sync(destination={"multiappend": False})
    account = engine.config.accounts[0]
    path = database.removeprefix("sqlite:///")
    ledger_engine: Engine = engine.ledger.engine
    limit: list[int | None] = [None]
    with closing(sqlite3.connect(path)) as setup:
        free = int(setup.execute("PRAGMA freelist_count").fetchone()[0])
        setup.execute("CREATE TABLE disk_filler (data BLOB)")

    @event.listens_for(ledger_engine, "begin")
    def apply_limit(connection: Any) -> None:
        # Per connection, so set at each transaction on whichever pooled connection runs it.
        connection.exec_driver_sql(f"PRAGMA max_page_count = {limit[0] or 4294967294}")

    @event.listens_for(ledger_engine, "before_cursor_execute")
    def fill_the_disk(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        # "Rest of the poll": whatever else the transaction that carries a "delivered" update writes,
        # it needs room the file cannot have, down to the flush before the DELEs.
        if outage == "rest of the poll" and limit[0] and statement.startswith("UPDATE messages"):
            connection.exec_driver_sql("INSERT INTO disk_filler VALUES (zeroblob(65536))")

    original = engine.ledger.record_delivered

    def then_disk_full(*args: Any, **kwargs: Any) -> Any:
        done = original(*args, **kwargs)
        if limit[0] is None:
            with closing(sqlite3.connect(path)) as probe:
                limit[0] = int(probe.execute("PRAGMA page_count").fetchone()[0])
        return done

    engine.ledger.record_delivered = then_disk_full  # type: ignore[method-assign]
    # The second message's row cannot fit in the pages the file has: its "pending" insert, which carries
    # the first message's deferred "delivered" update, fails with SQLITE_FULL.
    seeded = [simple(1), big_message_id(2, (free + 4) * 4096), simple(3)]
    dovecot.seed(mail_users.source.name, seeded)

    first = engine.poll(account)

    assert first.status == "error" and "database or disk is full" in (first.error or ""), first
    assert first.delivered == 1
    assert_deleted_only_when_recorded(dovecot, mail_users, engine, seeded)
    if outage == "rest of the poll":
        assert dovecot.maildir_count(mail_users.source.name) == 3  # nothing could be recorded delivered
    else:
        # The flush before the DELEs found room for the small update alone: it committed, then the DELE.
        assert dovecot.maildir_count(mail_users.source.name) == 2

    limit[0] = None  # space again
    engine.ledger.record_delivered = original  # type: ignore[method-assign]
    second = engine.poll(account)

    assert second.ok, second
    if outage == "rest of the poll":
        assert second.recovered == 1  # the first message's row was "pending": found by the lookup
    assert_each_delivered_once(dovecot, mail_users, seeded)
    event.remove(ledger_engine, "begin", apply_limit)
    event.remove(ledger_engine, "before_cursor_execute", fill_the_disk)


@pytest.fixture
def postgres_admin() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
@pytest.mark.parametrize("outage", ["one connection", "rest of the poll"])
def test_postgresql_backend_terminated_while_a_delivery_is_committed(
    dovecot: Dovecot,
    mail_users: MailUsers,
    make_sync: SyncFactory,
    postgres_admin: psycopg.Connection[Any],
    outage: str,
) -> None:
    _, engine = make_sync(destination={"multiappend": False})
    account = engine.config.accounts[0]
    ledger_engine: Engine = engine.ledger.engine
    terminated: list[int] = []
    armed = [True]

    @event.listens_for(ledger_engine, "before_cursor_execute")
    def terminate(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not (armed[0] and statement.startswith("UPDATE messages") and "delivered_at" in statement):
            return
        if outage == "one connection" and terminated:
            return
        pid = connection.connection.dbapi_connection.info.backend_pid
        # The server ends the backend (waiting until it is gone); this statement then meets a dead
        # connection, as after an administrator's or a failover's termination.
        postgres_admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        terminated.append(pid)

    seeded = [simple(1), simple(2), simple(3)]
    dovecot.seed(mail_users.source.name, seeded)

    first = engine.poll(account)

    assert terminated, "the delivered update was never applied"
    assert first.status == "error" and "terminat" in (first.error or "").lower(), first
    assert_deleted_only_when_recorded(dovecot, mail_users, engine, seeded)
    if outage == "rest of the poll":
        # No transaction carrying the delivered update could commit: nothing may have been deleted.
        assert dovecot.maildir_count(mail_users.source.name) == 3
    else:
        # The error path's flush, on a new connection, committed it: then, and only then, the DELE.
        assert dovecot.maildir_count(mail_users.source.name) == 2

    armed[0] = False
    second = engine.poll(account)

    assert second.ok, second
    if outage == "rest of the poll":
        assert second.recovered == 1  # the first message's row was "pending": found by the lookup
    assert_each_delivered_once(dovecot, mail_users, seeded)
    event.remove(ledger_engine, "before_cursor_execute", terminate)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_deferred_writes_leave_the_queue_only_when_committed(ledger_engine: Engine) -> None:
    ledger = Ledger(ledger_engine)
    account = ledger.account_id("alice")
    assert account is not None
    for uidl in ("u1", "u2"):
        ledger.record_pending(account, uidl, pop_size=10, size=10, message_id=f"<{uidl}>", sha256="0" * 64)
    ledger.record_delivered(account, "u1", "ref-1", defer=True)
    path = str(ledger_engine.url.database)
    with closing(sqlite3.connect(path)) as setup:
        setup.execute("CREATE TABLE disk_filler (data BLOB)")
    full = [True]

    @event.listens_for(ledger_engine, "begin")
    def no_room(connection: Any) -> None:
        with closing(sqlite3.connect(path)) as probe:
            pages = probe.execute("PRAGMA page_count").fetchone()[0] if full[0] else 4294967294
        connection.exec_driver_sql(f"PRAGMA max_page_count = {pages}")

    @event.listens_for(ledger_engine, "before_cursor_execute")
    def every_write_needs_room(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if full[0] and statement.startswith(("UPDATE", "INSERT INTO messages")):
            connection.exec_driver_sql("INSERT INTO disk_filler VALUES (zeroblob(65536))")

    def state(uidl: str) -> MessageState:
        return ledger.known_messages(account)[uidl].state

    with pytest.raises(LedgerError, match="database or disk is full"):
        ledger.flush(account)
    with pytest.raises(LedgerError, match="database or disk is full"):  # carried by the next one: fails too
        ledger.record_pending(account, "u3", pop_size=10, size=10, message_id="<u3>", sha256="0" * 64)
    assert state("u1") is MessageState.PENDING
    full[0] = False
    ledger.flush(account)  # still queued: committed now
    assert state("u1") is MessageState.DELIVERED

    # What a poll could not commit by its result write is dropped with it, not applied by a later poll.
    ledger.record_delivered(account, "u2", "ref-2", defer=True)
    full[0] = True
    with pytest.raises(LedgerError, match="database or disk is full"):
        ledger.poll_finished(account, PollOutcome("error", "x", 0, 0, 0, None))
    full[0] = False
    ledger.flush(account)
    assert state("u2") is MessageState.PENDING
    event.remove(ledger_engine, "begin", no_room)
    event.remove(ledger_engine, "before_cursor_execute", every_write_needs_room)
