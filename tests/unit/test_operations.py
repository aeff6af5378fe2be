"""Pure parts of operations: log formats, account states, health rules, summary, reload diff, metrics."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connector.config import Account, ServiceConfig, parse_config
from connector.errors import ConfigError
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.ops.health import HealthMonitor, health_problems, overdue_accounts
from connector.ops.logs import ContextFilter, JsonFormatter, TextFormatter, log_context, set_message
from connector.ops.metrics import PollMetrics
from connector.ops.progress import SUMMARY_COLUMNS, format_duration, plain_table, summary_rows
from connector.ops.web import Operations, OpsServer, account_state, render_status_page
from connector.poll.events import Delivered, Finished, Started
from connector.poll.result import PollResult
from connector.service.reload import account_changes, service_changes
from connector.service.scheduler import Service
from tests.unit.test_scheduler import RecordingEngine

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def config(accounts: list[dict[str, Any]], **service: Any) -> Any:
    data = {
        "service": {"database": "sqlite:///:memory:", **service},
        "destinations": [{"name": "d", "type": "imap", "host": "h", "username": "u", "password": "p"}],
        "accounts": [
            {"host": "h", "username": "u", "password": "p", "destination": "d", **account}
            for account in accounts
        ],
    }
    return parse_config(data, Path("/virtual/config.toml"))


# --- logs --------------------------------------------------------------------------------------------


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(f"test.ops.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_account_and_uidl_from_the_context() -> None:
    logger, stream = capture(JsonFormatter())
    logger.info("before any poll")
    with log_context("alice"):
        logger.info("listing")
        set_message("UID-1")
        logger.warning("message %s: refused", "UID-1")
    logger.info("after")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line.get("account"), line.get("uidl")) for line in lines] == [
        (None, None),
        ("alice", None),
        ("alice", "UID-1"),
        (None, None),
    ]
    assert lines[2]["message"] == "message UID-1: refused" and lines[2]["level"] == "WARNING"


def test_extra_wins_over_the_context() -> None:
    logger, stream = capture(JsonFormatter())
    with log_context("alice"):
        logger.info("x", extra={"account": "bob", "uidl": "U9"})
    line = json.loads(stream.getvalue())
    assert (line["account"], line["uidl"]) == ("bob", "U9")


def test_text_lines_add_only_what_the_message_does_not_say() -> None:
    logger, stream = capture(TextFormatter())
    with log_context("alice"):
        set_message("UID-7")
        logger.info("account alice: message UID-7 delivered")
        logger.info("account alice: retrying")
        logger.info("connection closed")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("account alice: message UID-7 delivered")
    assert lines[1].endswith("account alice: retrying [uidl=UID-7]")
    assert lines[2].endswith("connection closed [account=alice uidl=UID-7]")


# --- status page and health --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "enabled", "state"),
    [
        ({"configured": True, "last_result": "ok"}, True, "ok"),
        ({"configured": True, "last_result": "stopped"}, True, "ok"),
        ({"configured": True, "last_result": "error"}, True, "backing off"),
        ({"configured": True, "last_result": "auth_error"}, True, "auth failing"),
        ({"configured": True, "last_result": "never polled"}, True, "waiting"),
        ({"configured": True, "last_result": "ok"}, False, "suspended"),
        ({"configured": True, "last_result": "error", "suspended": True}, True, "suspended"),
        ({"configured": False, "last_result": "ok"}, False, "removed"),
    ],
)
def test_account_state(record: dict[str, Any], enabled: bool, state: str) -> None:
    assert account_state(record, enabled=enabled) == state


def test_status_page_escapes_everything_it_shows() -> None:
    record = {
        "account": "alice",
        "configured": True,
        "state": "backing off",
        "last_result": "error",
        "last_error": "<script>alert(1)</script>",
    }
    page = render_status_page([record], ["database <down>"], refresh_seconds=7, now=NOW)
    assert "<script>" not in page and "&lt;script&gt;" in page and "database &lt;down&gt;" in page
    assert '<meta http-equiv="refresh" content="7">' in page


def test_overdue_accounts_and_health_problems() -> None:
    due = {"a": NOW - timedelta(minutes=11), "b": NOW - timedelta(minutes=9), "c": NOW + timedelta(hours=1)}
    assert overdue_accounts(due, NOW, timedelta(minutes=10)) == ["a"]
    assert health_problems(due, NOW, timedelta(hours=1), None) == []
    problems = health_problems(due, NOW, timedelta(minutes=5), "OperationalError: gone")
    assert problems[0] == "database unreachable: OperationalError: gone"
    assert problems[1].startswith("scheduler stuck: account a was due at 2026-01-02T02:53:05+00:00")
    assert problems[2].startswith("scheduler stuck: account b")


# --- listen address ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:9108", ("127.0.0.1", 9108)), ("9108", ("127.0.0.1", 9108)), ("[::1]:80", ("::1", 80))],
)
def test_listen_address(text: str, address: tuple[str, int]) -> None:
    assert ServiceConfig(metrics=text).metrics == address


def test_bad_listen_address_is_a_config_error_with_its_path() -> None:
    with pytest.raises(ConfigError, match=r"service\.metrics: .*'nine' is not a listen address"):
        config([], metrics="nine")


# --- summary -----------------------------------------------------------------------------------------


def test_summary_rows_and_plain_table() -> None:
    results = [
        PollResult("alice", delivered=3, recovered=1, skipped=1, quarantined=1, failed=2, not_delivered=5),
        PollResult("bob", status="auth_error", error="refused"),
        # Another process polls it: skipped, not an error (the exit code decides by --account).
        PollResult("carol", status="busy", error="account carol is being polled by PID 1 on host x"),
    ]
    rows = summary_rows(results, {"alice": 75.0, "bob": 0.5})
    assert [row.cells() for row in rows] == [
        ["alice", "ok", "4", "5", "1", "1", "2", "1m15s"],
        ["bob", "auth_error", "0", "0", "0", "0", "1", "0.5s"],
        ["carol", "busy", "0", "0", "0", "0", "0", "0.0s"],
        ["3 accounts", "1 failed", "4", "5", "1", "1", "3", "1m15s"],
    ]
    table = plain_table(rows).splitlines()
    assert table[0].split() == list(SUMMARY_COLUMNS)
    assert table[1].index("ok") == table[0].index("result")  # columns line up
    assert format_duration(3725) == "1h02m05s"


# --- reload ------------------------------------------------------------------------------------------


def test_account_changes() -> None:
    old = config([{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "off", "enabled": False}])
    new = config([{"name": "a"}, {"name": "b", "password": "new"}, {"name": "d"}, {"name": "off"}])
    changes = account_changes(old, new)
    assert (changes.added, changes.removed, changes.changed) == (["d", "off"], ["c"], ["b"])
    assert str(changes) == "added d, off; removed c; changed b"
    assert service_changes(old, config([{"name": "a"}], max_workers=3)) == ["max_workers"]


class HourlyEngine(RecordingEngine):
    """Every poll asks for the next one an hour later: only a reload can bring it forward."""

    def poll(self, account: Account, *, stop: threading.Event, dry_run: bool = False) -> PollResult:
        result = super().poll(account, stop=stop, dry_run=dry_run)
        result.next_poll_at = self.clock() + timedelta(hours=1)
        return result


def test_reload_reschedules_added_and_changed_accounts_and_drops_removed_ones(tmp_path: Path) -> None:
    engine = HourlyEngine()
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    service = Service(config([{"name": "a", "poll_interval": "1h"}, {"name": "b"}]), engine, ledger)  # type: ignore[arg-type]
    service.start()
    try:
        deadline = time.monotonic() + 30
        while (engine.polls["a"], engine.polls["b"]) != (1, 1) or len(service.scheduled()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        polls_of_a = engine.polls["a"]
        changes = service.reload(config([{"name": "a", "poll_interval": "2h"}, {"name": "c"}]))
        assert (changes.added, changes.removed, changes.changed) == (["c"], ["b"], ["a"])
        while (engine.polls["c"] < 1 or engine.polls["a"] <= polls_of_a) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.polls["c"] >= 1 and engine.polls["a"] > polls_of_a  # changed: polled again at once
        assert "b" not in service.scheduled()
        polls_of_b = engine.polls["b"]
        time.sleep(0.1)
        assert engine.polls["b"] == polls_of_b
    finally:
        service.shutdown()


# --- metrics -----------------------------------------------------------------------------------------


def finished(result: PollResult, *, planned: int | None = None, duration: float = 0.0) -> Finished:
    return Finished(result.account, result, duration, planned)


def test_metrics_from_a_poll_s_events() -> None:
    metrics = PollMetrics()
    metrics.notify(Started("alice"))
    assert 'pop_connector_polls_in_progress{account="alice"} 1.0' in metrics.render().decode()
    metrics.notify(Delivered("alice", "U1", 100, "0" * 64, "imap:1"))
    metrics.notify(Delivered("alice", "U2", 150, "1" * 64, "imap:2"))
    metrics.notify(
        finished(PollResult("alice", delivered=2, recovered=1, quarantined=1), planned=5, duration=2)
    )
    metrics.notify(finished(PollResult("alice", status="error", error="x")))  # ended before its plan
    text = metrics.render().decode()
    assert 'pop_connector_polls_in_progress{account="alice"} 0.0' in text
    assert 'pop_connector_bytes_delivered_total{account="alice"} 250.0' in text
    assert 'pop_connector_messages_delivered_total{account="alice"} 3.0' in text
    assert 'pop_connector_messages_quarantined_total{account="alice"} 1.0' in text
    assert 'pop_connector_polls_total{account="alice",result="ok"} 1.0' in text
    assert 'pop_connector_polls_total{account="alice",result="error"} 1.0' in text
    assert 'pop_connector_poll_failures_total{account="alice"} 1.0' in text
    assert 'pop_connector_backlog_messages{account="alice"} 2.0' in text  # 5 planned, 3 delivered
    assert 'pop_connector_poll_duration_seconds_count{account="alice"} 2.0' in text
    metrics.forget("alice")
    assert "pop_connector_backlog_messages{" not in metrics.render().decode()


def test_metric_of_messages_left_unidentified() -> None:
    metrics = PollMetrics()
    metrics.notify(finished(PollResult("alice", unidentified=2)))
    # A failed poll did not get through its listing: the last known value stays.
    metrics.notify(finished(PollResult("alice", status="error", error="x")))
    assert 'pop_connector_messages_unidentified{account="alice"} 2.0' in metrics.render().decode()
    metrics.notify(finished(PollResult("alice")))
    assert 'pop_connector_messages_unidentified{account="alice"} 0.0' in metrics.render().decode()


def test_a_short_status_token_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"service\.status_token: .*at least 8 characters"):
        config([], status_token="short")


def test_an_occupied_listener_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ops = Operations(lambda: config([]), None, PollMetrics(), HealthMonitor())  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}: Address"):
            OpsServer(("127.0.0.1", port), ops)
