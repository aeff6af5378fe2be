"""The poll's observers fed with events: the per-message log lines, health, progress, the standard set and
the listener that reads it (metrics: tests/unit/test_operations.py)."""

from __future__ import annotations

import io
import itertools
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.ops.bars import BarProgress
from connector.ops.health import HealthMonitor
from connector.ops.logs import ContextFilter, JsonFormatter, log_context, set_message
from connector.ops.observers import operations_listener, standard_observers
from connector.ops.poll_log import PollLog
from connector.ops.progress import LogProgress
from connector.ops.summary import PollSummary
from connector.poll.engine import SyncEngine
from connector.poll.events import Delivered, Fetched, Finished, Planned, PollEvent, Recovered, Started
from connector.poll.result import PollResult
from tests.unit.test_operations import config

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SHA = "ab" * 32


@contextmanager
def captured(name: str, level: int = logging.INFO) -> Iterator[list[dict[str, Any]]]:
    """The JSON lines logger ``name`` writes meanwhile, with the log context as the service sets it up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(name)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        lines.extend(json.loads(line) for line in stream.getvalue().splitlines())


def in_other_thread(observer: Any, event: PollEvent) -> None:
    """As the fetch thread of a poll would, but without the poll's log context."""
    thread = threading.Thread(target=observer.notify, args=(event,))
    thread.start()
    thread.join()


def finished(result: PollResult, *, planned: int | None = None, duration: float = 1.0) -> Finished:
    return Finished(result.account, result, duration, planned)


# --- PollLog -----------------------------------------------------------------------------------------


def test_delivered_and_recovered_lines_are_the_engine_s_with_account_and_uidl() -> None:
    poll_log = PollLog()
    with captured("connector.ops.poll_log") as lines, log_context("alice"):
        set_message("U0")
        poll_log.notify(Delivered("alice", "U1", 2714, SHA, "imap:INBOX;UID=7"))
        poll_log.notify(Delivered("alice", "U2", 99, SHA, "imap:UID=8", mailbox="sales"))
        poll_log.notify(Recovered("alice", "U3", "imap:UID=3"))
        poll_log.notify(Recovered("alice", "U4", "imap:UID=4", mailbox="bob"))
        poll_log.notify(Started("alice"))  # nothing to say
        logging.getLogger("connector.ops.poll_log").info("after")
    assert [(line["message"], line["account"], line.get("uidl")) for line in lines] == [
        ("account alice: message U1 delivered (2714 bytes) to imap:INBOX;UID=7", "alice", "U1"),
        ("account alice: message U2 delivered (99 bytes) to sales: imap:UID=8", "alice", "U2"),
        ("account alice: message U3 was already delivered (imap:UID=3); recorded it", "alice", "U3"),
        ("account alice: message U4 was already delivered to bob (imap:UID=4); recorded it", "alice", "U4"),
        ("after", "alice", "U0"),  # the poll's own context is back
    ]
    assert all(line["level"] == "INFO" for line in lines)


def test_poll_log_lines_carry_the_account_from_any_thread() -> None:
    with captured("connector.ops.poll_log") as lines:
        in_other_thread(PollLog(), Delivered("bob", "U9", 10, SHA, "ews:1"))
    assert [(line["account"], line["uidl"]) for line in lines] == [("bob", "U9")]


def test_a_delivery_is_noted_in_the_protocol_log_by_size_and_hash() -> None:
    with captured("connector.protocol", logging.DEBUG) as notes, captured("connector.ops.poll_log"):
        PollLog().notify(Delivered("alice", "U1", 2714, SHA, "imap:UID=7"))
        PollLog().notify(Delivered("alice", "U2", 99, SHA, "imap:UID=8", mailbox="sales"))
        PollLog().notify(Recovered("alice", "U3", "imap:UID=3"))
    assert [line["message"] for line in notes] == [
        f"delivered U1: 2714 bytes, sha256 {SHA} -> imap:UID=7",
        f"delivered U2 to sales: 99 bytes, sha256 {SHA} -> imap:UID=8",
    ]
    assert [(line["account"], line["uidl"]) for line in notes] == [("alice", "U1"), ("alice", "U2")]


def test_every_engine_logs_deliveries_whatever_observers_it_was_given(tmp_path: Any) -> None:
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    seen: list[PollEvent] = []

    class Recording:
        def notify(self, event: PollEvent) -> None:
            seen.append(event)

    for observers in ([], [Recording()]):
        engine = SyncEngine(config([{"name": "alice"}]), ledger, observers=observers)
        with captured("connector.ops.poll_log") as lines:
            engine.observers.emit(Delivered("alice", "U1", 5, SHA, "imap:1"))
        assert [line["message"] for line in lines] == [
            "account alice: message U1 delivered (5 bytes) to imap:1"
        ]
    assert len(seen) == 1


# --- health ------------------------------------------------------------------------------------------


def test_health_follows_polls_starting_and_finishing() -> None:
    health = HealthMonitor()
    health.configure(["alice", "bob"], {"alice": NOW, "bob": NOW})
    health.notify(Started("alice"))
    assert health.polling() == {"alice"} and health.due() == {"bob": NOW}
    health.notify(Delivered("alice", "U1", 1, SHA, "r"))  # no change
    assert health.polling() == {"alice"}
    health.notify(finished(PollResult("alice", next_poll_at=NOW + timedelta(hours=1)), planned=0))
    assert health.polling() == set()
    assert health.due() == {"alice": NOW + timedelta(hours=1), "bob": NOW}
    # An account the scheduler does not know (removed meanwhile, or polled by another worker) is not due.
    health.notify(Started("carol"))
    health.notify(finished(PollResult("carol", next_poll_at=NOW)))
    assert "carol" not in health.due() and health.polling() == set()


# --- progress ----------------------------------------------------------------------------------------


def poll_of_three(account: str = "alice", status: str = "ok") -> list[PollEvent]:
    """Three messages of 100 bytes by LIST, received a little shorter (as servers send them)."""
    return [
        Started(account),
        Planned(account, messages=3, size=300, to_delete=0),
        *(Fetched(account, f"U{n}", size=100, received=97) for n in range(3)),
        finished(PollResult(account, status=status, delivered=3), planned=3, duration=2.5),
    ]


def test_log_progress_counts_by_list_size_and_ends_at_100_percent() -> None:
    progress = LogProgress(clock=itertools.count(0.0, 0.5).__next__)
    with captured("connector.ops.progress") as lines:
        for event in poll_of_three():
            in_other_thread(progress, event)  # Fetched comes from the fetch thread
    messages = [line["message"] for line in lines]
    assert messages[0] == "account alice: 3 messages (300 bytes) to deliver"
    assert [m.split(", ")[:2] for m in messages[1:]] == [
        ["account alice: 1/3 messages", "100/300 bytes"],
        ["account alice: 2/3 messages", "200/300 bytes"],
        ["account alice: 3/3 messages", "300/300 bytes"],
    ]
    assert all(line["account"] == "alice" for line in lines)
    assert progress.durations == {"alice": 2.5}


def test_log_progress_keeps_each_account_s_counts_apart() -> None:
    progress = LogProgress()
    alice, bob = poll_of_three("alice"), poll_of_three("bob")
    with captured("connector.ops.progress") as lines:
        for pair in zip(alice, bob, strict=True):
            for event in pair:
                progress.notify(event)
    last = {line["account"]: line["message"] for line in lines}
    assert last["alice"].startswith("account alice: 3/3 messages, 300/300 bytes")
    assert last["bob"].startswith("account bob: 3/3 messages, 300/300 bytes")
    # A second poll counts from zero again.
    progress.notify(Started("alice"))
    assert progress.progress["alice"].fetched == 0


def test_bar_progress_shows_messages_and_the_result() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    bars = BarProgress([], console)
    with bars:
        for event in poll_of_three():
            bars.notify(event)
    text = out.getvalue()
    assert "3/3 msgs" in text and "alice (ok)" in text
    assert bars.durations == {"alice": 2.5}
    assert bars.progress["alice"].fetched_bytes == 300


def test_a_failed_poll_s_bar_stops_where_its_fetching_did() -> None:
    out = io.StringIO()
    bars = BarProgress([], Console(file=out, force_terminal=True, width=120))
    events = poll_of_three(status="error")
    with bars:
        for event in [*events[:3], events[-1]]:  # one message fetched, then the poll failed
            bars.notify(event)
    assert "alice (error)" in out.getvalue() and "1/3 msgs" in out.getvalue()


# --- PollSummary --------------------------------------------------------------------------------------


def test_a_summary_line_at_info_each_quarter_hour_counts_the_polls_since_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Idle polls log at DEBUG; this line is what says at INFO that the service is polling."""
    now = [0.0]
    summary = PollSummary(clock=lambda: now[0])
    polls = [
        PollResult("alice"),
        PollResult("bob", delivered=2, recovered=1, deleted=3),
        PollResult("carol", status="error", error="x"),
        PollResult("dave", quarantined=1),
        PollResult("alice"),
    ]
    with caplog.at_level(logging.DEBUG, logger="connector.ops.summary"):
        for at, result in enumerate(polls):
            now[0] = at * 225.0  # the last one 900 s after the start: 15 minutes
            summary.notify(Started(result.account))
            summary.notify(finished(result))
        now[0] = 1000.0
        summary.notify(finished(PollResult("erin")))  # counted towards the next line
        now[0] = 1800.0
        summary.notify(finished(PollResult("frank")))
    lines = [(record.levelno, record.getMessage()) for record in caplog.records]
    assert lines == [
        (
            logging.INFO,
            "in the last 15 min: 5 polls of 4 accounts, 2 with nothing to do, 1 failed; 3 messages "
            "delivered, 3 deleted, 1 quarantined",
        ),
        (
            logging.INFO,
            "in the last 15 min: 2 polls of 2 accounts, 2 with nothing to do, 0 failed; 0 messages "
            "delivered, 0 deleted, 0 quarantined",
        ),
    ]


# --- the standard set and the listener ---------------------------------------------------------------


def test_the_standard_observers_of_each_run_mode() -> None:
    plain = standard_observers()
    assert plain.all() == [plain.metrics, plain.health, plain.summary]
    assert plain.metrics is not standard_observers().metrics  # each run has its own registry


def test_the_listener_serves_what_the_observers_saw(tmp_path: Any) -> None:
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    observers = standard_observers()
    assert operations_listener(lambda: config([]), ledger, observers) is None
    the_config = config([{"name": "alice"}, {"name": "bob"}], metrics="127.0.0.1:0", health_grace="1s")
    server = operations_listener(lambda: the_config, ledger, observers)
    assert server is not None
    # bob was due an hour ago and has not started: overdue (the scheduler tells the health monitor).
    observers.health.configure(
        ["alice", "bob"], {"alice": NOW, "bob": datetime.now(UTC) - timedelta(hours=1)}
    )
    for observer in observers.all():
        observer.notify(Started("alice"))
        observer.notify(finished(PollResult("alice", delivered=1), planned=1))
    server.start()
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        with pytest.raises(urllib.error.HTTPError) as failing:
            urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10)
        health = json.loads(failing.value.read())
        failing.value.close()
    finally:
        server.stop()
    assert failing.value.code == 503
    lines = text.splitlines()
    assert 'pop_connector_polls_total{result="ok"} 1.0' in lines
    assert "pop_connector_messages_delivered_total 1.0" in lines
    assert "pop_connector_accounts_configured 2.0" in lines
    assert "pop_connector_overdue_accounts 1.0" in lines
    assert 'pop_connector_accounts{state="backing_off"} 0.0' in lines
    assert "process_resident_memory_bytes" in text
    assert health["status"] == "failing" and health["problems"][0].startswith("scheduler stuck: account bob")


def test_a_worker_s_listener_counts_overdue_accounts_its_own_way(tmp_path: Any) -> None:
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    the_config = config([{"name": "alice"}], metrics="127.0.0.1:0")
    asked: list[Any] = []

    def overdue(config: Any) -> int:
        asked.append(config)
        return 3

    server = operations_listener(lambda: the_config, ledger, standard_observers(), overdue)
    assert server is not None
    server.start()
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
    assert "pop_connector_overdue_accounts 3.0" in text.splitlines() and asked == [the_config]
