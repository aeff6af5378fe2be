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
from sqlalchemy import insert

from connector.config import Account, Config, ServiceConfig, parse_config
from connector.errors import ConfigError, LedgerError
from connector.ledger.database import open_database
from connector.ledger.models import AccountRow
from connector.ledger.store import Ledger
from connector.ops.health import HealthMonitor, health_problems, overdue_accounts
from connector.ops.logs import ContextFilter, JsonFormatter, TextFormatter, log_context, set_message
from connector.ops.metrics import ACCOUNT_SERIES_LIMIT, PollMetrics, ServiceSeries
from connector.ops.progress import SUMMARY_COLUMNS, format_duration, plain_table, summary_rows
from connector.ops.web import Operations, OpsServer, account_state, render_status_page
from connector.poll.events import Delivered, Finished, Started
from connector.poll.probe import Done, IdleProbe, Take
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


class _DelayingProbe(IdleProbe):
    """Hands every account to the full poll with an hour's LOGIN-DELAY to wait first."""

    def __init__(self) -> None:
        self.taken: list[str] = []

    def refusal(self, account: Account) -> str | None:
        return None

    def serve(self, take: Take, done: Done, stop: threading.Event | None = None) -> None:
        assert stop is not None
        while not stop.is_set():
            for account in take(10, 0.05) or ():
                self.taken.append(account.name)
                self.before_verdict()
                done(account, None, 3600.0)  # the scheduler's callback runs in this call
                self.after_verdict()

    def before_verdict(self) -> None:
        pass

    def after_verdict(self) -> None:
        pass


def test_an_account_removed_while_its_poll_waits_for_login_delay_is_polled_when_added_back(
    tmp_path: Path,
) -> None:
    engine = HourlyEngine()
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    probe = _DelayingProbe()
    service = Service(config([{"name": "a"}]), engine, ledger, probe=probe)  # type: ignore[arg-type]
    service.start()
    try:
        deadline = time.monotonic() + 30
        # a's full poll waits for the server's delay (the probe's "taken" comes before its verdict).
        while "a" not in service.scheduled():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        service.reload(config([{"name": "other"}]))
        service.reload(config([{"name": "other"}, {"name": "a"}]))
        while probe.taken.count("a") < 2:
            assert time.monotonic() < deadline, "a, added back, was never polled again"
            time.sleep(0.02)
    finally:
        service.shutdown()
    assert engine.polls["a"] == 0  # the delayed full polls never ran


# --- metrics -----------------------------------------------------------------------------------------


def finished(result: PollResult, *, planned: int | None = None, duration: float = 0.0) -> Finished:
    return Finished(result.account, result, duration, planned)


def samples(text: bytes) -> dict[str, float]:
    """Every sample of a text exposition, by its name and labels as written."""
    found = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def test_metrics_from_a_poll_s_events() -> None:
    metrics = PollMetrics()
    metrics.notify(Started("alice"))
    metrics.notify(Started("bob"))
    assert samples(metrics.render())["pop_connector_polls_in_progress"] == 2
    metrics.notify(Delivered("alice", "U1", 100, "0" * 64, "imap:1"))
    metrics.notify(Delivered("alice", "U2", 150, "1" * 64, "imap:2"))
    metrics.notify(
        finished(
            PollResult("alice", delivered=2, recovered=1, quarantined=1, messages_done=3),
            planned=5,
            duration=2,
        )
    )
    metrics.notify(finished(PollResult("bob", status="error", error="x")))  # ended before its plan
    metrics.notify(finished(PollResult("carol", status="busy")))  # another process polls carol
    found = samples(metrics.render())
    assert found["pop_connector_polls_in_progress"] == 0
    assert found["pop_connector_bytes_delivered_total"] == 250
    assert found["pop_connector_messages_delivered_total"] == 3
    assert found["pop_connector_messages_quarantined_total"] == 1
    assert found['pop_connector_polls_total{result="ok"}'] == 1
    assert found['pop_connector_polls_total{result="error"}'] == 1
    assert found['pop_connector_polls_total{result="busy"}'] == 1
    assert found["pop_connector_poll_failures_total"] == 1  # busy is no failure
    assert found['pop_connector_backlog_messages{account="alice"}'] == 2  # 5 planned, 3 delivered
    assert found["pop_connector_poll_duration_seconds_count"] == 3
    assert found['pop_connector_poll_duration_seconds_bucket{le="2.5"}'] == 3
    assert found['pop_connector_poll_duration_seconds_bucket{le="1.0"}'] == 2
    # Only the per-account gauges name accounts, and only while they are not zero.
    assert [series for series in found if "account=" in series] == [
        'pop_connector_backlog_messages{account="alice"}'
    ]
    metrics.notify(finished(PollResult("alice", delivered=2, messages_done=2), planned=2))
    assert "pop_connector_backlog_messages{" not in metrics.render().decode()
    metrics.notify(finished(PollResult("alice"), planned=4))
    metrics.forget("alice")
    assert "pop_connector_backlog_messages{" not in metrics.render().decode()


def test_metric_of_messages_left_unidentified() -> None:
    metrics = PollMetrics()
    metrics.notify(finished(PollResult("alice", unidentified=2)))
    # A failed poll did not get through its listing: the last known value stays.
    metrics.notify(finished(PollResult("alice", status="error", error="x")))
    assert samples(metrics.render())['pop_connector_messages_unidentified{account="alice"}'] == 2
    metrics.notify(finished(PollResult("alice")))
    assert "pop_connector_messages_unidentified{" not in metrics.render().decode()


def test_no_created_series_and_the_process_metrics() -> None:
    metrics = PollMetrics()
    metrics.notify(finished(PollResult("alice", delivered=1), planned=1))
    metrics.observe_lag(0.3)
    text = metrics.render().decode()
    assert "_created" not in text
    assert "pop_connector_polls_total" in text  # the counters are there, only their _created is not
    found = samples(metrics.render())
    assert found["process_resident_memory_bytes"] > 0 and found["process_open_fds"] > 0
    assert "process_cpu_seconds_total" in found
    assert any(series.startswith("python_info{") for series in found)
    assert found["pop_connector_scheduling_lag_seconds_count"] == 1
    assert found['pop_connector_scheduling_lag_seconds_bucket{le="0.25"}'] == 0
    assert found['pop_connector_scheduling_lag_seconds_bucket{le="0.5"}'] == 1
    # Two listeners in one process (tests, several workers) have registries of their own.
    assert (
        PollMetrics().render().count(b"pop_connector_polls_total")
        == metrics.render().count(b"pop_connector_polls_total") - 1
    )


def test_per_account_gauges_list_at_most_the_limit_the_highest_first() -> None:
    metrics = PollMetrics()
    for n in range(ACCOUNT_SERIES_LIMIT + 50):
        metrics.notify(finished(PollResult(f"a{n}"), planned=n + 1))  # a{n} has a backlog of n + 1
    listed = {s for s in samples(metrics.render()) if s.startswith("pop_connector_backlog_messages{")}
    assert len(listed) == ACCOUNT_SERIES_LIMIT
    assert 'pop_connector_backlog_messages{account="a1049"}' in listed
    assert 'pop_connector_backlog_messages{account="a49"}' not in listed  # the 50 smallest are left out


def ledger_with(tmp_path: Path, rows: dict[str, dict[str, Any]]) -> Ledger:
    engine = open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    with engine.begin() as connection:
        for name, values in rows.items():
            connection.execute(
                insert(AccountRow).values(
                    name=name,
                    created_at=NOW,
                    consecutive_failures=0,
                    last_delivered=0,
                    last_failed=0,
                    last_deleted=0,
                    **values,
                )
            )
    return Ledger(engine)


def test_service_series_read_at_each_scrape(tmp_path: Path) -> None:
    an_hour_ago, yesterday = NOW - timedelta(hours=1), NOW - timedelta(days=1)
    ledger = ledger_with(
        tmp_path,
        {
            "ok": {"last_result": "ok", "last_success_at": NOW},
            "stopped": {"last_result": "stopped", "last_success_at": NOW},
            "never": {},
            "failing": {"last_result": "error", "last_success_at": an_hour_ago},
            "refused": {"last_result": "auth_error"},  # never succeeded: no last success
            "parked": {"last_result": "error", "last_success_at": yesterday, "suspended_at": an_hour_ago},
            "removed": {"last_result": "error", "last_success_at": yesterday},  # not configured any more
            "disabled": {"last_result": "error", "last_success_at": yesterday},
        },
    )
    names = ["ok", "stopped", "never", "failing", "refused", "parked"]
    the_config = config([*({"name": n} for n in names), {"name": "disabled", "enabled": False}])
    series = ServiceSeries(lambda: the_config, ledger, lambda c: 7)
    found = samples(PollMetrics().render(series))
    assert found["pop_connector_accounts_configured"] == 6
    assert found["pop_connector_overdue_accounts"] == 7
    assert {s: v for s, v in found.items() if s.startswith("pop_connector_account")} == {
        "pop_connector_accounts_configured": 6,
        'pop_connector_accounts{state="backing_off"}': 1,
        'pop_connector_accounts{state="auth_failing"}': 1,
        'pop_connector_accounts{state="suspended"}': 1,
        # The longest without a success first: never, then yesterday, then an hour ago.
        'pop_connector_account_state{account="refused",state="auth_failing"}': 1,
        'pop_connector_account_state{account="parked",state="suspended"}': 1,
        'pop_connector_account_state{account="failing",state="backing_off"}': 1,
    }
    text = PollMetrics().render(series).decode()
    assert text.index('account="refused"') < text.index('account="parked"') < text.index('account="failing"')
    assert {s: v for s, v in found.items() if s.startswith("pop_connector_last_success")} == {
        'pop_connector_last_success_timestamp_seconds{account="parked"}': yesterday.timestamp(),
        'pop_connector_last_success_timestamp_seconds{account="failing"}': an_hour_ago.timestamp(),
    }


def test_service_series_list_at_most_the_limit_of_failing_accounts(tmp_path: Path) -> None:
    count = ACCOUNT_SERIES_LIMIT + 10
    ledger = ledger_with(
        tmp_path,
        {
            f"a{n:04d}": {"last_result": "error", "last_success_at": NOW - timedelta(minutes=count - n)}
            for n in range(count)
        },
    )
    the_config = config([{"name": f"a{n:04d}"} for n in range(count)])
    found = samples(PollMetrics().render(ServiceSeries(lambda: the_config, ledger, lambda c: 0)))
    assert found['pop_connector_accounts{state="backing_off"}'] == count  # the count is whole
    listed = [s for s in found if s.startswith("pop_connector_account_state{")]
    assert len(listed) == ACCOUNT_SERIES_LIMIT
    assert 'pop_connector_account_state{account="a0000",state="backing_off"}' in listed  # the oldest
    assert f'pop_connector_account_state{{account="a{count - 1:04d}",state="backing_off"}}' not in listed
    assert len([s for s in found if s.startswith("pop_connector_last_success")]) == ACCOUNT_SERIES_LIMIT


def test_service_series_without_a_database_still_serve_the_rest(tmp_path: Path) -> None:
    ledger = ledger_with(tmp_path, {"alice": {"last_result": "error"}})
    (tmp_path / "ledger.db").unlink()  # a new, empty file on the next connection: every query fails
    ledger.engine.dispose()
    broken = ServiceSeries(lambda: config([{"name": "alice"}]), ledger, lambda c: 1)

    def no_database(c: Config) -> int:
        raise LedgerError("database unreachable")

    found = samples(PollMetrics().render(broken))
    assert found["pop_connector_accounts_configured"] == 1
    assert not any(s.startswith("pop_connector_account_state") for s in found)
    found = samples(PollMetrics().render(ServiceSeries(broken.config, ledger, no_database)))
    assert "pop_connector_overdue_accounts" not in found and "pop_connector_polls_in_progress" in found


class GatedEngine(HourlyEngine):
    """The first poll holds the only worker until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def poll(self, account: Account, *, stop: threading.Event, dry_run: bool = False) -> PollResult:
        self.gate.wait(30)
        return super().poll(account, stop=stop, dry_run=dry_run)


def test_the_service_reports_each_poll_s_scheduling_lag(tmp_path: Path) -> None:
    lags: list[float] = []
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    engine = GatedEngine()
    the_config = config([{"name": "a"}, {"name": "b"}], max_workers=1)
    service = Service(the_config, engine, ledger, on_lag=lags.append)  # type: ignore[arg-type]
    service.start(poll_now=True)  # both due now for the one worker (else the second is spread out)
    try:
        deadline = time.monotonic() + 30
        while not lags:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # the other account is due and waits for the only worker meanwhile
        engine.gate.set()
        while len(lags) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        service.shutdown()
    first, second = lags
    assert first >= 0 and second >= 0.3, lags  # due at start, started once the first poll was over


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


class _HeldProbe(_DelayingProbe):
    """_DelayingProbe that gives its verdict on each account only once the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def before_verdict(self) -> None:
        self.holding.set()
        self.release.wait(30)
        self.release.clear()

    def after_verdict(self) -> None:
        self.holding.clear()


def test_an_account_removed_while_the_probe_has_it_gets_no_delayed_poll_and_is_polled_when_added_back(
    tmp_path: Path,
) -> None:
    engine = HourlyEngine()
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    probe = _HeldProbe()
    service = Service(config([{"name": "a"}]), engine, ledger, probe=probe)  # type: ignore[arg-type]
    service.start()
    try:
        assert probe.holding.wait(30)
        service.reload(config([{"name": "other"}]))  # a is removed while the probe has it
        probe.release.set()  # its verdict: a full poll after an hour's LOGIN-DELAY
        deadline = time.monotonic() + 30
        while probe.holding.is_set() or "other" not in probe.taken:
            assert time.monotonic() < deadline
            probe.release.set()
            time.sleep(0.02)
        assert "a" not in service.scheduled()  # no poll of a removed account, an hour later
        service.reload(config([{"name": "other"}, {"name": "a"}]))
        while probe.taken.count("a") < 2:
            assert time.monotonic() < deadline, "a, added back, was never polled again"
            probe.release.set()
            time.sleep(0.02)
    finally:
        probe.release.set()
        service.shutdown()
    assert engine.polls["a"] == 0
