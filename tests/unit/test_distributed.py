"""Pure parts of distributed mode: configuration rules, queue-schema migration choice, status output, the
account on procrastinate's log lines about a poll job, telling a worker the queue gave up on."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from procrastinate.exceptions import ConnectorException
from procrastinate.jobs import Job

from connector.cli.report import status_records, status_text
from connector.config import parse_config
from connector.errors import ConfigError
from connector.ledger.records import AccountStatus
from connector.service.distributed.queue_schema import migrations_after, parse_version
from connector.service.distributed.worker import (
    POLL_TASK,
    job_ended,
    job_taken_over,
    libpq_url,
    tag_poll_jobs,
    worker_row_pruned,
)

CONFIG = Path("/etc/pop-connector/config.toml")


def _error(service: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"service": service}, CONFIG)
    return str(caught.value)


def test_distributed_mode_needs_postgresql() -> None:
    message = _error({"mode": "distributed", "database": "sqlite:///state.db"})
    assert message.startswith(f"{CONFIG}: service.mode:") and "PostgreSQL" in message
    # No database at all means the default SQLite file: the same error.
    assert "service.mode" in _error({"mode": "distributed"})


def test_distributed_mode_on_postgresql() -> None:
    config = parse_config(
        {"service": {"mode": "distributed", "database": "postgresql+psycopg://u@db/pop"}}, CONFIG
    )
    assert config.service.mode == "distributed"
    assert config.service.dispatch_interval.total_seconds() == 10


@pytest.mark.parametrize("interval", ["7s", "90s", "1.5s", "0s"])
def test_dispatch_interval_must_divide_a_minute(interval: str) -> None:
    assert "service.dispatch_interval:" in _error({"dispatch_interval": interval})


def test_stall_detection_must_outlast_heartbeats() -> None:
    message = _error({"heartbeat_interval": "10s", "stalled_after": "15s"})
    assert "service.stalled_after:" in message


def test_unknown_mode_is_named() -> None:
    assert "service.mode:" in _error({"mode": "cluster"})


def test_migrations_after_picks_newer_scripts_in_order() -> None:
    names = [
        "03.04.00_50_post_add_retry.sql",
        "03.02.00_01_pre_batch_defer_jobs.sql",
        "03.04.00_01_pre_add_retry.sql",
        "03.01.00_01_pre_add_heartbeat.sql",
        "03.05.00_01_pre_future.sql",
        "__init__.py",
    ]
    chosen = migrations_after(names, applied=(3, 1, 0), target=(3, 4, 2))
    assert chosen == [
        "03.02.00_01_pre_batch_defer_jobs.sql",
        "03.04.00_01_pre_add_retry.sql",
        "03.04.00_50_post_add_retry.sql",
    ]
    assert migrations_after(names, applied=(3, 5, 0), target=(3, 5, 0)) == []


def test_parse_version() -> None:
    assert parse_version("3.10.0") == (3, 10, 0)
    assert parse_version("3.11") == (3, 11, 0)
    assert parse_version("4.0.0rc1") == (4, 0, 0)


def test_libpq_url_keeps_credentials_and_parameters() -> None:
    url = libpq_url("postgresql+psycopg://pop:s%40cret@db.example:5433/pop?sslmode=require")
    assert url == "postgresql://pop:s%40cret@db.example:5433/pop?sslmode=require"


def test_status_names_the_worker_that_polled_last() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    status = AccountStatus(
        name="alice", last_poll_started_at=when, last_poll_finished_at=when, last_success_at=when,
        last_result="ok", last_error=None, consecutive_failures=0, next_poll_at=when, last_delivered=1,
        last_failed=0, last_deleted=1, counts={"deleted": 1}, last_worker="pop-2:4711",
    )  # fmt: skip
    records = status_records([], [status])
    assert records[0]["last_worker"] == "pop-2:4711"
    assert "last polled by worker pop-2:4711" in status_text(records)


def _procrastinate_record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("procrastinate.worker", logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return record


def test_procrastinate_lines_about_a_poll_job_carry_its_account() -> None:
    logger = logging.getLogger("tests.procrastinate.worker")
    tag_poll_jobs(logger)
    tag_poll_jobs(logger)  # every worker of a process asks: installed once
    assert len(logger.filters) == 1
    (tagger,) = logger.filters
    job = {"task_name": POLL_TASK, "task_kwargs": {"account": "alice"}}
    started = _procrastinate_record(f"Starting job {POLL_TASK}[7](account='alice')", job=job)
    # At shutdown procrastinate names the running job in the text only.
    waiting = _procrastinate_record(f"Waiting for job to finish: worker: {POLL_TASK}[8](account='bob')")
    dispatch = _procrastinate_record(
        "Starting job pop_connector.dispatch[9](timestamp=1)",
        job={"task_name": "pop_connector.dispatch", "task_kwargs": {"timestamp": 1}},
    )
    given = _procrastinate_record("x", job=job, account="carol")
    assert isinstance(tagger, logging.Filter)
    assert all(logger.filter(record) for record in (started, waiting, dispatch, given))
    assert [getattr(r, "account", None) for r in (started, waiting, dispatch, given)] == [
        "alice",
        "bob",
        None,
        "carol",
    ]


def _translated(cause: Exception) -> ConnectorException:
    """What procrastinate's connector raises for a psycopg error: ``ConnectorException from`` it."""
    try:
        raise ConnectorException() from cause
    except ConnectorException as exc:
        return exc


_PRUNED = (
    'insert or update on table "procrastinate_jobs" violates foreign key constraint '
    '"procrastinate_jobs_worker_id_fkey"'
)
_NOT_RUNNING = 'Job was not found or not in "doing" or "todo" status (job id: 7)'


def test_a_job_fetch_failing_on_the_deleted_worker_row_is_told_apart() -> None:
    assert worker_row_pruned(_translated(psycopg.errors.ForeignKeyViolation(_PRUNED)))
    other_key = _PRUNED.replace("worker_id", "queue_id")
    assert not worker_row_pruned(_translated(psycopg.errors.ForeignKeyViolation(other_key)))
    assert not worker_row_pruned(_translated(psycopg.errors.OperationalError("server closed")))
    assert not worker_row_pruned(psycopg.errors.ForeignKeyViolation(_PRUNED))  # not through procrastinate


def test_a_job_end_refused_because_another_worker_has_it_is_told_apart() -> None:
    assert job_taken_over(_translated(psycopg.errors.RaiseException(_NOT_RUNNING)))
    assert not job_taken_over(_translated(psycopg.errors.OperationalError("server closed")))
    assert not job_taken_over(RuntimeError(_NOT_RUNNING))


def _ended_task(exc: BaseException | None, job: Job) -> None:
    """A job's task ending with ``exc``, read by ``job_ended`` and then garbage-collected in its loop."""
    loop = asyncio.new_event_loop()
    try:
        future: asyncio.Future[None] = loop.create_future()
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
        job_ended(job, future)
        del future
        gc.collect()
    finally:
        loop.close()


def _poll_job(account: str) -> Job:
    return Job(
        id=7,
        queue="default",
        lock=None,
        queueing_lock=None,
        task_name=POLL_TASK,
        task_kwargs={"account": account},
    )


def test_the_end_of_a_taken_over_job_is_one_warning_naming_the_account(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    _ended_task(_translated(psycopg.errors.RaiseException(_NOT_RUNNING)), _poll_job("alice"))
    (record,) = caplog.records  # asyncio's "Task exception was never retrieved" is not among them
    assert record.levelname == "WARNING" and record.exc_info is None
    assert getattr(record, "account", None) == "alice"
    message = record.getMessage()
    assert message.startswith("account alice: poll job was taken over by another worker")
    assert "stalled_after" in message


def test_other_failures_to_end_a_job_stay_errors_with_their_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    dispatch = Job(
        id=9,
        queue="default",
        lock=None,
        queueing_lock=None,
        task_name="pop_connector.dispatch",
        task_kwargs={"timestamp": 1},
    )
    _ended_task(_translated(psycopg.errors.OperationalError("server closed")), dispatch)
    (record,) = caplog.records
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert record.getMessage().startswith("job pop_connector.dispatch[9](timestamp=1): cannot record its end")
    caplog.clear()
    _ended_task(None, _poll_job("bob"))
    assert caplog.records == []
