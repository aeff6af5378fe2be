"""The ledger on real databases: SQLite and PostgreSQL, migrated by Alembic."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, event, inspect, select, text

from connector.ledger.database import HEAD_REVISION, alembic_config, make_engine, open_database, upgrade
from connector.ledger.models import Base, RecipientRow
from connector.ledger.records import KnownMessages, MessageState, PollOutcome, RecipientState
from connector.ledger.store import Ledger
from connector.policies.uidl import hashed_uidls

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = open_database(database_url)
    yield engine
    if engine.dialect.name == "postgresql":
        # The PostgreSQL database is shared by the session: leave it empty for the next test.
        with engine.begin() as connection:
            tables = "deliveries, account_totals, leases, recipients, messages, accounts, alembic_version"
            connection.execute(text(f"DROP TABLE IF EXISTS {tables} CASCADE"))
    engine.dispose()


def test_upgrade_of_empty_database_equals_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_the_index_of_rows_missing_from_the_listing_is_partial_on_both_databases(engine: Engine) -> None:
    """The models declare its WHERE for SQLite only (a PostgreSQL option would load that dialect into every
    process, issue 16), and Alembic's comparison above does not look at an index's WHERE: the migration's
    own ``postgresql_where`` is what keeps it partial on PostgreSQL."""
    indexes = {index["name"]: index for index in inspect(engine).get_indexes("messages")}
    where = indexes["ix_messages_account_missing"]["dialect_options"][f"{engine.dialect.name}_where"]
    assert "missing_since IS NOT NULL" in str(where)


def test_the_head_revision_the_ledger_skips_alembic_at_is_alembics_head(engine: Engine) -> None:
    """``database.HEAD_REVISION`` must name the newest migration: a ledger there is not migrated at start."""
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(alembic_config(engine)).get_current_head() == HEAD_REVISION
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD_REVISION


def test_upgrade_is_idempotent(engine: Engine) -> None:
    upgrade(engine)
    upgrade(engine)
    assert {"accounts", "messages", "alembic_version"} <= set(inspect(engine).get_table_names())


@pytest.mark.parametrize("revision", ["0001", "0002", "0003", "0004", "0005", "0006"])
def test_a_ledger_left_between_two_migrations_is_finished_at_the_next_start(
    tmp_path: Path, revision: str
) -> None:
    """On SQLite each migration commits on its own, so a process killed while migrating leaves the ledger
    at an older revision, as does an older release: the next start applies the rest and keeps every row
    written before (0003 once deleted every message: rebuilding `accounts` cascaded)."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    old = make_engine(url)
    upgrade(old, revision)
    now = datetime.now(UTC)
    with old.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO accounts (name, created_at, consecutive_failures, last_delivered, last_failed,"
                " last_deleted) VALUES ('alice', :now, 0, 1, 0, 0)"
            ),
            {"now": now},
        )
        connection.execute(
            text(
                "INSERT INTO messages (account_id, uidl, state, attempts, first_seen_at, updated_at)"
                " SELECT id, 'U1', 'delivered', 1, :now, :now FROM accounts WHERE name = 'alice'"
            ),
            {"now": now},
        )
        if revision >= "0004":
            connection.execute(
                text(
                    "INSERT INTO recipients (message_id, mailbox, state, updated_at)"
                    " SELECT id, 'bob@example.org', 'delivered', :now FROM messages"
                ),
                {"now": now},
            )
    old.dispose()
    engine = open_database(url)
    try:
        ledger = Ledger(engine)
        account = ledger.account_id("alice", create=False)
        assert account is not None
        assert ledger.known_messages(account)["U1"].state is MessageState.DELIVERED
        with engine.connect() as connection:
            recipients = connection.execute(text("SELECT count(*) FROM recipients")).scalar()
            assert recipients == (1 if revision >= "0004" else 0)
            # Foreign keys are back on for the ledger's own connections.
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
            assert version == HEAD_REVISION
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_every_poll_thread_keeps_its_ledger_connection_between_polls(database_url: str) -> None:
    """With ``max_workers`` threads each in a ledger transaction at once, round after round, the pool opens
    each connection once: a pool smaller than the threads closes the extra ones at check-in and opens them
    again at the next round (SQLAlchemy's default keeps 5, the default ``max_workers`` is 8)."""
    threads = 12
    engine = make_engine(database_url, threads=threads)
    connects: list[object] = []
    event.listen(engine, "connect", lambda _driver, record: connects.append(record))
    all_in = threading.Barrier(threads)
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            # A pooled connection as the ledger's polls take one (prepared.py), held by every thread at once.
            connection = engine.raw_connection()
            try:
                all_in.wait(timeout=30)
            finally:
                connection.close()
        except BaseException as exc:
            errors.append(exc)

    try:
        for _ in range(3):
            workers = [threading.Thread(target=poll) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
    finally:
        engine.dispose()
    assert errors == []
    assert len(connects) == threads


@pytest.mark.parametrize(("query", "expected"), [("", 10), ("?connect_timeout=3", "3")])
def test_postgresql_connections_give_up_after_a_connect_timeout(
    postgres_url: str, query: str, expected: object
) -> None:
    engine = make_engine(postgres_url + query)
    seen: list[dict[str, object]] = []
    event.listen(engine, "do_connect", lambda _dialect, _record, _args, params: seen.append(dict(params)))
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()
    assert seen[0]["connect_timeout"] == expected


def test_message_lifecycle(engine: Engine) -> None:
    ledger = Ledger(engine)
    account = ledger.account_id("alice")
    assert account is not None and ledger.account_id("alice") == account
    attempts = ledger.record_pending(account, "U1", pop_size=10, size=12, message_id="<a@b>", sha256="f" * 64)
    assert attempts == 1
    row = ledger.known_messages(account)["U1"]
    assert row.state is MessageState.PENDING and row.size == 12 and row.message_id == "<a@b>"
    delivered_at = ledger.record_delivered(account, "U1", "imap:INBOX;UIDVALIDITY=1;UID=7")
    row = ledger.known_messages(account)["U1"]
    assert row.state is MessageState.DELIVERED and row.delivered_at == delivered_at
    assert row.delivered_at is not None and row.delivered_at.tzinfo is not None
    ledger.record_deleted(account, ["U1"])
    assert ledger.known_messages(account)["U1"].state is MessageState.DELETED
    assert ledger.prune(account, ["U1"]) == 1
    assert ledger.known_messages(account) == {}


def test_failures_count_until_quarantine(engine: Engine) -> None:
    ledger = Ledger(engine)
    account = ledger.account_id("bob")
    assert account is not None
    for attempt in range(1, 4):
        ledger.record_pending(account, "U2", pop_size=1, size=1, message_id="<x@y>", sha256="0" * 64)
        state = ledger.record_failure(account, "U2", f"rejected {attempt}", counted=True, max_attempts=3)
        assert state is (MessageState.FAILED if attempt == 3 else MessageState.PENDING)
    assert ledger.known_messages(account)["U2"].attempts == 3


def test_uncounted_failure_gives_the_attempt_back(engine: Engine) -> None:
    ledger = Ledger(engine)
    account = ledger.account_id("carol")
    assert account is not None
    for _ in range(5):
        ledger.record_pending(account, "U3", pop_size=1, size=1, message_id="<x@y>", sha256="0" * 64)
        assert (
            ledger.record_failure(account, "U3", "quota", counted=False, max_attempts=2)
            is MessageState.PENDING
        )
    assert ledger.known_messages(account)["U3"].attempts == 0


def test_known_messages_of_a_large_mailbox_is_one_query(engine: Engine) -> None:
    ledger = Ledger(engine)
    account = ledger.account_id("big")
    assert account is not None
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            Base.metadata.tables["messages"].insert(),
            [
                {
                    "account_id": account,
                    "uidl": f"u{i}",
                    "state": "delivered",
                    "attempts": 1,
                    "first_seen_at": now,
                    "updated_at": now,
                    "delivered_at": now,
                }
                for i in range(20_000)
            ],
        )
    statements: list[str] = []
    from sqlalchemy import event

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        known = ledger.known_messages(account)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(known) == 20_000
    assert sum("messages" in s for s in statements) == 1


def test_known_to_plan_names_only_what_retention_keeps(engine: Engine) -> None:
    ledger = Ledger(engine)
    account = ledger.account_id("split")
    other = ledger.account_id("split-other")
    assert account is not None and other is not None
    now = datetime.now(UTC)
    ages = {"old": 30, "young": 2, "undated": None}
    rows = [_row(account, uidl, "delivered", now, age) for uidl, age in ages.items()]
    rows += [_row(account, state, state, now, 1) for state in ("pending", "failed", "seen", "deleted")]
    rows.append(_row(other, "young", "delivered", now, 2))
    with engine.begin() as connection:
        connection.execute(Base.metadata.tables["messages"].insert(), rows)
    everything = set(ledger.known_messages(account))
    for until, kept in [
        (None, {"old", "young", "undated"}),  # keep
        (now - timedelta(days=14), {"young"}),  # days = 14
        (datetime.max.replace(tzinfo=UTC), set()),  # delete
    ]:
        known = ledger.known_to_plan(account, until)
        assert known.kept == kept, until
        assert set(known.rows) == everything - kept and set(known) == everything
    old = ledger.known_to_plan(account, now - timedelta(days=14)).rows["old"]
    assert old.state is MessageState.DELIVERED and old.delivered_at is not None
    assert old.delivered_at.tzinfo is not None and old.delivered_at <= now - timedelta(days=30)


def test_missing_rows_are_counted_read_in_full_and_listed_again(engine: Engine) -> None:
    start = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    clock = [start]
    ledger = Ledger(engine, clock=lambda: clock[0])
    account = ledger.account_id("absent")
    assert account is not None
    with engine.begin() as connection:
        rows = [_row(account, uidl, "delivered", start, 1) for uidl in ("a", "b", "c")]
        connection.execute(Base.metadata.tables["messages"].insert(), rows)
    ledger.record_missing(account, ["a", "b"])
    clock[0] = start + timedelta(hours=5)
    ledger.record_missing(account, ["a"])
    ledger.record_missing(account, ["b"], counted=False)  # a listing not to be believed
    known = ledger.known_to_plan(account, None)
    # Kept rows missing from the listing come in full, with their counts; the others by UIDL.
    assert known.kept == {"c"} and set(known.rows) == {"a", "b"}
    assert (known.rows["a"].missing_polls, known.rows["a"].missing_since) == (2, start)
    assert (known.rows["b"].missing_polls, known.rows["b"].missing_since) == (1, start)
    ledger.record_listed_again(account, ["a"])
    known = ledger.known_to_plan(account, None)
    assert known.kept == {"a", "c"} and set(known.rows) == {"b"}
    ledger.set_listing_note(account, "short")
    ledger.flush(account)
    assert [s.listing_note for s in ledger.statuses() if s.name == "absent"] == ["short"]


def test_known_to_plan_reads_a_uidl_with_a_line_break_right(engine: Engine) -> None:
    ledger = Ledger(engine)
    account = ledger.account_id("odd")
    assert account is not None
    now = datetime.now(UTC)
    rows = [_row(account, uidl, "delivered", now, 1) for uidl in ("a\nb", "a", "c")]
    with engine.begin() as connection:
        connection.execute(Base.metadata.tables["messages"].insert(), rows)
    assert ledger.known_to_plan(account, None).kept == {"a\nb", "a", "c"}
    assert ledger.known_to_plan(ledger.account_id("empty") or 0, None) == KnownMessages({}, set())


def test_known_to_plan_finds_hashed_forms_in_the_string_it_read(engine: Engine) -> None:
    # policies.uidl.hashed_uidls searches the UIDLs as the ledger read them (one string), not a join of
    # ``known``: that string must hold every UIDL, kept or read in full.
    ledger = Ledger(engine)
    account = ledger.account_id("hashed")
    assert account is not None
    now = datetime.now(UTC)
    digest = "ab" * 32
    uidls = {"plain": "delivered", f"kept/hdr:{digest}": "delivered", f"failing/hdr:{digest}": "failed"}
    rows = [_row(account, uidl, state, now, 1) for uidl, state in uidls.items()]
    with engine.begin() as connection:
        connection.execute(Base.metadata.tables["messages"].insert(), rows)
    known = ledger.known_to_plan(account, None)
    assert known.joined is not None and sorted(known.joined.split("\n")) == sorted(uidls)
    assert known.kept == {"plain", f"kept/hdr:{digest}"} and set(known.rows) == {f"failing/hdr:{digest}"}
    assert hashed_uidls(known) == {"kept", "failing"}
    only_plain = KnownMessages({}, {"plain"}, joined="plain")
    assert hashed_uidls(only_plain) == set() == hashed_uidls(KnownMessages({}, {"plain"}))


def test_rows_of_reads_the_rows_asked_for_in_full(engine: Engine) -> None:
    """For kept rows, which ``known_to_plan`` gives by UIDL only: a UIDL listed twice needs its header hash
    (policies.uidl.key_twins)."""
    ledger = Ledger(engine)
    account = ledger.account_id("rows-of")
    other = ledger.account_id("rows-of-other")
    assert account is not None and other is not None
    now = datetime.now(UTC)
    rows = [
        {**_row(account, "a", "delivered", now, 1), "header_hash": "ab" * 32, "pop_size": 120},
        {**_row(account, "b", "delivered", now, 1), "header_hash": None, "pop_size": None},
        {**_row(other, "a", "delivered", now, 1), "header_hash": "cd" * 32, "pop_size": 120},
    ]
    with engine.begin() as connection:
        connection.execute(Base.metadata.tables["messages"].insert(), rows)
    found = ledger.rows_of(account, ["a", "b", "unknown"])
    assert set(found) == {"a", "b"}
    assert (found["a"].header_hash, found["a"].pop_size, found["a"].state) == (
        "ab" * 32,
        120,
        MessageState.DELIVERED,
    )
    assert found["b"].header_hash is None
    assert ledger.rows_of(account, []) == {}


def _row(account: int, uidl: str, state: str, now: datetime, age_days: int | None) -> dict[str, object]:
    delivered_at = None if age_days is None else now - timedelta(days=age_days)
    return {
        "account_id": account,
        "uidl": uidl,
        "state": state,
        "attempts": 1,
        "first_seen_at": now,
        "updated_at": now,
        "delivered_at": delivered_at,
    }


def test_poll_status_and_counts(engine: Engine) -> None:
    ledger = Ledger(engine)
    account = ledger.account_id("dave")
    assert account is not None
    ledger.poll_started(account)
    ledger.poll_finished(account, PollOutcome("error", "boom", 0, 0, 0, None))
    ledger.poll_finished(account, PollOutcome("error", "boom", 0, 0, 0, None))
    assert ledger.consecutive_failures(account) == 2
    ledger.record_pending(account, "U", pop_size=1, size=1, message_id="<x@y>", sha256="0" * 64)
    ledger.poll_finished(account, PollOutcome("ok", None, 1, 0, 0, None))
    (status,) = [s for s in ledger.statuses() if s.name == "dave"]
    assert status.consecutive_failures == 0 and status.last_result == "ok"
    assert status.last_success_at is not None and status.counts["pending"] == 1


def test_recipient_writes_go_through_the_ledgers_transaction(engine: Engine) -> None:
    """``Ledger.recipients`` writes are the account's writes: the account's deferred writes commit with
    them, and the ledger's clock stamps them."""
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    ledger = Ledger(engine, clock=lambda: when)
    account = ledger.account_id("catch-all")
    assert account is not None
    ledger.record_pending(account, "U", pop_size=1, size=1, message_id="<x@y>", sha256="0" * 64)
    ledger.record_delivered(account, "U", "ref", defer=True)
    assert ledger.known_messages(account)["U"].state is MessageState.PENDING
    assert ledger.recipients.states(account, "U") == {}
    ledger.recipients.record_pending(account, "U", "ann")
    assert ledger.known_messages(account)["U"].state is MessageState.DELIVERED
    assert ledger.recipients.states(account, "U") == {"ann": RecipientState.PENDING}
    ledger.recipients.record_delivered(account, "U", "ann", "ref-ann")
    assert ledger.recipients.states(account, "U") == {"ann": RecipientState.DELIVERED}
    with engine.connect() as connection:
        recipient = connection.execute(select(RecipientRow.destination_ref, RecipientRow.delivered_at)).one()
    assert tuple(recipient) == ("ref-ann", when)
    assert ledger.known_messages(account)["U"].delivered_at == when


def test_suspension_and_quarantine(engine: Engine) -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    ledger = Ledger(engine, clock=lambda: when)
    account = ledger.account_id("erin")
    assert account is not None
    ledger.suspensions.suspend(account, "failed 5 times")
    assert ledger.account_state(account).suspension == (when, "failed 5 times")
    assert ledger.suspensions.resume("erin") and not ledger.suspensions.resume("nobody")
    assert ledger.account_state(account).suspension is None
    (status,) = [s for s in ledger.statuses() if s.name == "erin"]
    assert status.next_poll_at == when and status.consecutive_failures == 0
    ledger.record_pending(account, "U", pop_size=7, size=7, message_id="<x@y>", sha256="0" * 64)
    assert (
        ledger.record_failure(account, "U", "rejected", counted=True, max_attempts=1) is MessageState.FAILED
    )
    (quarantined,) = ledger.quarantine.messages("erin")
    assert (quarantined.uidl, quarantined.attempts, quarantined.last_error) == ("U", 1, "rejected")
    assert ledger.quarantine.messages("nobody") == []
    assert ledger.quarantine.release([quarantined.id], "nobody") == 0
    assert ledger.quarantine.release([quarantined.id]) == 1
    row = ledger.known_messages(account)["U"]
    assert (row.state, row.attempts) == (MessageState.PENDING, 0)
    assert ledger.quarantine.messages() == []


def test_parallel_writers_on_one_database(engine: Engine) -> None:
    """Several accounts polled at once write to the same ledger without 'database is locked'."""
    ledger = Ledger(engine)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            account = ledger.account_id(f"w{index}")
            assert account is not None
            for n in range(30):
                ledger.record_pending(
                    account, f"u{n}", pop_size=1, size=1, message_id="<x@y>", sha256="0" * 64
                )
                ledger.record_delivered(account, f"u{n}", "ref")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(s.counts["delivered"] for s in ledger.statuses()) == 180


def test_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    engine = open_database(f"sqlite:///{path}")
    engine.dispose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            assert stat.S_IMODE(extra.stat().st_mode) & 0o077 == 0
