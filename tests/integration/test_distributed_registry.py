"""Distributed mode on real PostgreSQL: the registry, the queue schema, live configuration changes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text, update

from connector.config import Account, Config, parse_config
from connector.connections import Connections
from connector.ledger.database import open_database
from connector.ledger.models import AccountRow
from connector.ledger.records import utcnow
from connector.service.distributed import ensure_queue_schema, sync_accounts
from connector.service.distributed.queue_schema import LOCK_INDEX
from connector.service.distributed.registry import claimed, count_overdue, due_accounts
from connector.service.distributed.worker import DistributedWorker
from tests.distributed_setup import (
    Fleet,
    config_text,
    fresh_database,
    make_fleet,
    poll_sessions,
    start_worker,
)
from tests.servers.dovecot import Dovecot

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    with fresh_database() as url:
        engine = open_database(url)
        yield engine
        engine.dispose()


def _account(name: str, *, enabled: bool = True) -> Account:
    return Account.model_validate(
        {"name": name, "host": "pop.example", "username": name, "password": "pw", "destination": "d",
         "enabled": enabled}
    )  # fmt: skip


def _active(engine: Engine) -> dict[str, bool]:
    with engine.connect() as connection:
        return {
            name: active for name, active in connection.execute(select(AccountRow.name, AccountRow.active))
        }


def test_queue_schema_is_created_once_even_by_concurrent_workers(engine: Engine) -> None:
    errors: list[BaseException] = []

    def create() -> None:
        try:
            ensure_queue_schema(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    ensure_queue_schema(engine)
    with engine.connect() as connection:
        tables = connection.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'procrastinate'")
        ).scalars()
        assert {"procrastinate_jobs", "procrastinate_workers"} <= set(tables)
        # The ledger's own schema is untouched: Alembic's model comparison never sees the queue.
        public = connection.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        ).scalars()
        assert set(public) == {
            "accounts",
            "messages",
            "recipients",
            "leases",
            "deliveries",
            "account_totals",
            "alembic_version",
        }


def _fetch_job_buffers(engine: Engine) -> int:
    """Shared buffers one procrastinate job fetch reads (the function's inner queries included), once
    its plan is cached (the first fetch of a connection also reads the catalog)."""
    with engine.begin() as connection:
        connection.exec_driver_sql("SET LOCAL search_path = procrastinate")
        worker = connection.execute(text("SELECT procrastinate_register_worker_v1()")).scalar()
        fetch = text(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM procrastinate_fetch_job_v2(NULL, :w)"
        )
        for _ in range(2):
            plan = connection.execute(fetch, {"w": worker}).scalar()
    top = plan[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


def test_fetching_a_job_with_thousands_waiting_reads_a_few_index_pages(engine: Engine) -> None:
    """Every account due at once queues a poll job per account; each fetch looks up the other jobs of the
    candidate's lock. Without an index led by the lock that look-up read the whole job index: hundreds of
    pages per fetch with 20,000 jobs waiting (and one look-up per waiting job under some plans)."""
    ensure_queue_schema(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("SET LOCAL search_path = procrastinate")
        connection.execute(
            text(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args) "
                "SELECT 'default', 'pop_connector.poll', 'poll:a' || n, 'poll:a' || n, '{}' "
                "FROM generate_series(1, 20000) AS n"
            )
        )
        connection.execute(text("ANALYZE procrastinate_jobs"))
    assert _fetch_job_buffers(engine) < 80  # 140 without the index


def test_the_lock_index_is_added_to_a_queue_schema_made_without_it(engine: Engine) -> None:
    ensure_queue_schema(engine)
    with engine.begin() as connection:
        connection.execute(text(f"DROP INDEX procrastinate.{LOCK_INDEX}"))
    ensure_queue_schema(engine)
    with engine.connect() as connection:
        found = connection.execute(text("SELECT to_regclass(:n)"), {"n": f"procrastinate.{LOCK_INDEX}"})
        assert found.scalar() is not None


def test_sync_accounts_adds_disables_and_keeps_removed_accounts(engine: Engine) -> None:
    ensure_queue_schema(engine)
    summary = sync_accounts(engine, [_account("a"), _account("b"), _account("c", enabled=False)])
    assert (summary.added, summary.active, summary.inactive) == (3, 2, 1)
    assert _active(engine) == {"a": True, "b": True, "c": False}

    summary = sync_accounts(engine, [_account("b", enabled=False), _account("c"), _account("d")])
    assert (summary.added, summary.active, summary.inactive) == (1, 2, 2)
    # "a" left the configuration: kept (its ledger stays), never polled again.
    assert _active(engine) == {"a": False, "b": False, "c": True, "d": True}
    assert sorted(due_accounts(engine, utcnow())) == ["c", "d"]


def test_a_claim_excludes_a_second_poll_and_a_poll_that_is_not_due(engine: Engine) -> None:
    sync_accounts(engine, [_account("a")])
    now = utcnow()
    with claimed(engine, "a", "w1", now) as first:
        assert first.reason is None
        with claimed(engine, "a", "w2", now) as second:
            assert second.reason == "another worker is polling it"
        with engine.begin() as connection:
            connection.execute(text("UPDATE accounts SET next_poll_at = now() + interval '1 hour'"))
    with claimed(engine, "a", "w2", now) as third:
        assert third.reason == "not due any more (polled meanwhile)"
    with claimed(engine, "nobody", "w2", now) as missing:
        assert missing.reason is not None and "sync-config" in missing.reason
    with engine.connect() as connection:
        assert connection.scalar(select(AccountRow.last_worker)) == "w1"


def test_a_claim_costs_one_commit_and_never_locks_an_inactive_account(engine: Engine) -> None:
    """Every poll of every worker claims: the claim is one transaction (lock, due test, last_worker), its
    release one more."""
    sync_accounts(engine, [_account("a"), _account("gone", enabled=False)])
    commits: list[str] = []
    event.listen(engine, "commit", lambda connection: commits.append("commit"))
    locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    with claimed(engine, "a", "w1", utcnow()) as claim:
        assert claim.reason is None and len(commits) == 1
        with engine.connect() as connection:
            assert connection.scalar(text(locks)) == 1
    assert len(commits) == 2
    with claimed(engine, "gone", "w1", utcnow()) as claim:
        assert claim.reason == "no longer active in the configuration"
        with engine.connect() as connection:
            assert connection.scalar(text(locks)) == 0


def test_overdue_accounts_and_when_a_claimed_account_was_due(engine: Engine) -> None:
    """For /metrics: accounts due more than the grace ago and not started (a queued job is no start, a
    running one is); and a claim says when its account was due, for the scheduling lag."""
    ensure_queue_schema(engine)
    now = utcnow().replace(microsecond=0)
    names = ("late", "soon", "never", "queued", "running", "off")
    sync_accounts(engine, [_account(n, enabled=n != "off") for n in names], now=now - timedelta(hours=2))
    an_hour_ago = now - timedelta(hours=1)
    due = {"late": an_hour_ago, "soon": now + timedelta(hours=1), "queued": an_hour_ago,
           "running": an_hour_ago, "off": an_hour_ago}  # fmt: skip
    with engine.begin() as connection:
        for name, when in due.items():
            connection.execute(update(AccountRow).where(AccountRow.name == name).values(next_poll_at=when))
        connection.execute(text("SET LOCAL search_path TO procrastinate"))  # for the queue's triggers
        for name, status in (("queued", "todo"), ("running", "doing")):
            connection.execute(
                text(
                    "INSERT INTO procrastinate.procrastinate_jobs (queue_name, task_name, lock,"
                    " queueing_lock, args, status)"
                    " VALUES ('default', 'pop_connector.poll', :lock, :lock, '{}', :status)"
                ),
                {"lock": f"poll:{name}", "status": status},
            )
    # late and queued (due an hour ago), never (added two hours ago); not running, soon or off.
    assert count_overdue(engine, now, timedelta(minutes=10)) == 3
    assert count_overdue(engine, now, timedelta(minutes=90)) == 1  # never
    assert count_overdue(engine, now, timedelta(hours=3)) == 0
    with claimed(engine, "late", "w1", now) as claim:
        assert claim.reason is None and claim.due_at == an_hour_ago
    with claimed(engine, "never", "w1", now) as claim:
        assert claim.reason is None and claim.due_at == now - timedelta(hours=2)


@pytest.fixture
def small_fleet(dovecot: Dovecot) -> Iterator[Fleet]:
    fleet = make_fleet(dovecot, 3, lambda index: 1)
    try:
        yield fleet
    finally:
        fleet.remove()


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting until {what}")


def test_running_workers_pick_up_added_and_removed_accounts(
    small_fleet: Fleet, postgres_url: str, tmp_path: Path
) -> None:
    dovecot = small_fleet.dovecot
    first, second, added = small_fleet.sources
    with fresh_database() as database:
        config = tmp_path / "config.toml"
        small_fleet.sources = [first, second]
        config.write_text(config_text(small_fleet, database, poll_interval="1s"))
        workers = [start_worker(config, f"w{index}", tmp_path) for index in range(2)]
        try:
            _wait(lambda: not any(dovecot.maildir_count(u.name) for u in (first, second)), 40, "drained")
            # Drop `first`, add `added`: no restart, no sync-config.
            small_fleet.sources = [second, added]
            config.write_text(config_text(small_fleet, database, poll_interval="1s"))
            _wait(lambda: not dovecot.maildir_count(added.name), 30, "the new account was polled")
            changed_at = datetime.now()
            time.sleep(2.5)  # a few more dispatch periods with poll_interval = 1s
        finally:
            codes = [worker.stop() for worker in workers]
        engine = open_database(database)
        try:
            active = _active(engine)
        finally:
            engine.dispose()
    logs = {worker.name: worker.text() for worker in workers}
    assert codes == [0, 0], "\n".join(logs.values())
    assert active == {first.name: False, second.name: True, added.name: True}
    assert all("configuration reloaded" in text for text in logs.values())
    sessions = poll_sessions(logs)
    assert not [s for s in sessions if s.account == first.name and s.start > changed_at]
    assert len(dovecot.imap_messages(small_fleet.destination.name)) == 3


def _one_account_worker_config(engine: Engine) -> Config:
    """A distributed worker ``w-test`` on ``engine``'s database with one account, ``a``."""
    url = engine.url.render_as_string(hide_password=False)
    return parse_config(
        {
            "service": {"mode": "distributed", "database": url, "worker_name": "w-test"},
            "destinations": [{"name": "d", "type": "imap", "host": "127.0.0.1", "username": "u",
                              "password": "p"}],
            "accounts": [{"name": "a", "host": "127.0.0.1", "username": "a", "password": "p",
                          "destination": "d"}],
        },
        Path("/nonexistent/config.toml"),
    )  # fmt: skip


def test_a_poll_that_crashes_backs_off_instead_of_being_queued_every_tick(engine: Engine) -> None:
    config = _one_account_worker_config(engine)
    ensure_queue_schema(engine)
    sync_accounts(engine, config.accounts)

    def broken_source(account: Account) -> Any:
        raise RuntimeError("a bug")

    worker = DistributedWorker(config, engine, connections=Connections(open_source=broken_source))
    assert worker.poll_account("a") == "error"
    assert worker.poll_account("not-configured") == "skipped"
    with engine.connect() as connection:
        row = connection.execute(select(AccountRow.last_worker, AccountRow.next_poll_at)).one()
    assert row.last_worker == "w-test"
    assert row.next_poll_at is not None and row.next_poll_at > utcnow()
    assert due_accounts(engine, utcnow()) == []


def test_the_dispatch_runs_before_the_poll_jobs_waiting(engine: Engine) -> None:
    """With every account due at once the queue holds a poll job per account; the dispatch (stalled jobs,
    configuration changes, new due accounts) is fetched next anyway, not after the backlog."""
    config = _one_account_worker_config(engine)
    ensure_queue_schema(engine)
    worker = DistributedWorker(config, engine)
    (periodic,) = worker.app.periodic_registry.periodic_tasks.values()
    dispatch = periodic.task.configure(**periodic.configure_kwargs, task_kwargs={"timestamp": 0}).job
    poll = worker._poll_job_for("a")
    assert dispatch.priority > poll.priority
    with engine.begin() as connection:
        connection.exec_driver_sql("SET LOCAL search_path = procrastinate")
        insert = text(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, queueing_lock, args) "
            "VALUES ('default', :task, :priority, :lock, :lock, '{}')"
        )
        for n in range(20):
            connection.execute(
                insert, {"task": poll.task_name, "priority": poll.priority, "lock": f"poll:{n}"}
            )
        connection.execute(insert, {"task": dispatch.task_name, "priority": dispatch.priority, "lock": None})
        worker_id = connection.execute(text("SELECT procrastinate_register_worker_v1()")).scalar()
        fetched = connection.execute(
            text("SELECT task_name FROM procrastinate_fetch_job_v2(NULL, :w)"), {"w": worker_id}
        ).scalar()
    assert fetched == dispatch.task_name
