"""The service's scheduling rules, with a stand-in engine (the poll itself is tested against Dovecot)."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connector.config import Account, Config, parse_config
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.ops.logs import setup_logging
from connector.poll.result import PollResult
from connector.service.scheduler import Service


def config_with(accounts: int, max_workers: int) -> Config:
    data = {
        "service": {"max_workers": max_workers, "database": "sqlite:///:memory:"},
        "destinations": [{"name": "d", "type": "imap", "host": "h", "username": "u", "password": "p"}],
        "accounts": [
            {"name": f"a{i}", "host": "h", "username": "u", "password": "p", "destination": "d"}
            for i in range(accounts)
        ],
    }
    return parse_config(data, Path("/virtual/config.toml"))


class RecordingEngine:
    """Polls take a while and ask to be polled again almost at once; records overlaps."""

    def __init__(self, fail: set[str] | None = None, delivering: set[str] | None = None) -> None:
        self.lock = threading.Lock()
        self.delivering = delivering or set()  # their polls deliver one message each (not idle)
        self.running: dict[str, int] = defaultdict(int)
        self.polls: dict[str, int] = defaultdict(int)
        self.max_running_total = 0
        self.max_running_per_account = 0
        self.fail = fail or set()
        self.stopped_mid_poll = 0

    def clock(self) -> datetime:
        return datetime.now(UTC)

    def poll(self, account: Account, *, stop: threading.Event, dry_run: bool = False) -> PollResult:
        with self.lock:
            self.running[account.name] += 1
            self.polls[account.name] += 1
            self.max_running_per_account = max(self.max_running_per_account, self.running[account.name])
            self.max_running_total = max(self.max_running_total, sum(self.running.values()))
        time.sleep(0.03)
        with self.lock:
            self.running[account.name] -= 1
        if account.name in self.fail:
            return PollResult(
                account.name, status="error", error="x", next_poll_at=self.clock() + timedelta(hours=1)
            )
        delivered = 1 if account.name in self.delivering else 0
        return PollResult(
            account.name, delivered=delivered, next_poll_at=self.clock() + timedelta(milliseconds=10)
        )


def run_for(service: Service, seconds: float, *, poll_now: bool = False) -> None:
    service.start(poll_now=poll_now)
    time.sleep(seconds)
    service.shutdown()


def test_no_account_is_polled_twice_at_once_and_workers_are_bounded(tmp_path: Path) -> None:
    config = config_with(accounts=6, max_workers=2)
    engine = RecordingEngine()
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    # --now: all six due at once for two workers (without it, four would be spread over the interval).
    run_for(Service(config, engine, ledger), 0.8, poll_now=True)  # type: ignore[arg-type]
    assert engine.max_running_per_account == 1
    assert engine.max_running_total <= 2
    assert all(engine.polls[f"a{i}"] >= 2 for i in range(6)), dict(engine.polls)


def test_failed_account_waits_for_its_backoff(tmp_path: Path) -> None:
    config = config_with(accounts=2, max_workers=2)
    engine = RecordingEngine(fail={"a0"})
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    run_for(Service(config, engine, ledger), 0.6)  # type: ignore[arg-type]
    assert engine.polls["a0"] == 1
    assert engine.polls["a1"] >= 3


def test_disabled_accounts_are_not_scheduled(tmp_path: Path) -> None:
    config = config_with(accounts=2, max_workers=2)
    disabled = config.accounts[1].model_copy(update={"enabled": False})
    config = config.model_copy(update={"accounts": [config.accounts[0], disabled]})
    engine = RecordingEngine()
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    run_for(Service(config, engine, ledger), 0.3)  # type: ignore[arg-type]
    assert engine.polls["a1"] == 0 and engine.polls["a0"] >= 1


def test_shutdown_waits_for_polls_in_flight(tmp_path: Path) -> None:
    config = config_with(accounts=1, max_workers=1)
    engine = RecordingEngine()
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    service = Service(config, engine, ledger)  # type: ignore[arg-type]
    service.start()
    time.sleep(0.05)
    service.shutdown()
    assert sum(engine.running.values()) == 0
    polls = dict(engine.polls)
    time.sleep(0.1)
    assert dict(engine.polls) == polls  # nothing runs after shutdown


class _SlowToReturn(Service):
    """A poll job that is still returning when its next run is due: it schedules that run first (as a poll
    that took longer than the interval, or a slow end of the poll, does), then takes a while."""

    def _schedule(self, account: Account, when: datetime) -> None:
        super()._schedule(account, when)
        time.sleep(0.1)


def test_a_next_run_due_before_the_last_one_returned_still_runs(tmp_path: Path) -> None:
    # With one instance per job APScheduler skips such a run, and a date job skipped is gone: the account
    # would never be polled again (seen in the 100-account load test under CI load).
    config = config_with(accounts=1, max_workers=2)
    engine = RecordingEngine()
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    run_for(_SlowToReturn(config, engine, ledger), 0.8)  # type: ignore[arg-type]
    assert engine.polls["a0"] >= 3, dict(engine.polls)
    assert engine.max_running_per_account == 1


# --- first polls (policies/schedule.py decides; these check that the service schedules what it says) ----

AHEAD = datetime.now(UTC).replace(microsecond=0) + timedelta(days=365)


class FutureEngine(RecordingEngine):
    """Its clock is a year ahead: every first poll lies in APScheduler's future, so nothing runs and
    ``Service.scheduled()`` shows what ``start`` scheduled."""

    def clock(self) -> datetime:
        return AHEAD


def started(tmp_path: Path, accounts: int, *, poll_now: bool = False) -> Service:
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    service = Service(config_with(accounts, max_workers=4), FutureEngine(), ledger)  # type: ignore[arg-type]
    service.start(poll_now=poll_now)
    return service


def test_a_start_of_many_accounts_spreads_their_first_polls_over_the_interval(tmp_path: Path) -> None:
    service = started(tmp_path, 100)
    try:
        times = sorted(service.scheduled().values())
    finally:
        service.shutdown()
    assert len(times) == 100
    assert times.count(AHEAD) == 4  # one per worker at once, the other 96 one after the other
    assert len(set(times)) == 97
    # The default interval (5 minutes) for 100 accounts: one every 3 s, the last within the interval.
    assert times[4] - AHEAD == timedelta(seconds=3)
    assert max(times) == AHEAD + timedelta(seconds=96 * 3)


def test_a_single_account_is_polled_at_once(tmp_path: Path) -> None:
    service = started(tmp_path, 1)
    try:
        assert service.scheduled() == {"a0": AHEAD}
    finally:
        service.shutdown()


def test_run_now_polls_every_account_at_once(tmp_path: Path) -> None:
    service = started(tmp_path, 100, poll_now=True)
    try:
        assert set(service.scheduled().values()) == {AHEAD}
    finally:
        service.shutdown()


def test_a_reload_spreads_many_added_accounts_and_polls_a_few_at_once(tmp_path: Path) -> None:
    service = started(tmp_path, 100)
    try:
        service.reload(config_with(103, max_workers=4))
        added = [service.scheduled()[f"a{i}"] for i in range(100, 103)]
        assert added == [AHEAD] * 3
        service.reload(config_with(200, max_workers=4))
        added = sorted(service.scheduled()[f"a{i}"] for i in range(103, 200))
    finally:
        service.shutdown()
    # 200 accounts every 5 minutes need 2 every 3 s: 4 at once, then one every 1.5 s.
    assert added.count(AHEAD) == 4 and max(added) == AHEAD + timedelta(seconds=93 * 1.5)


def test_a_start_of_many_accounts_logs_one_summary_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="connector.service.scheduler"):
        started(tmp_path, 100).shutdown()
    first = [record for record in caplog.records if "first poll" in record.getMessage()]
    assert [record.levelno for record in first].count(logging.DEBUG) == 100  # one per account
    (summary,) = [record.getMessage() for record in first if record.levelno == logging.INFO]
    assert summary == (
        "first polls of 100 accounts: 4 now, 96 spread over the next 288s (due or never polled: at the "
        "rate their poll intervals need, not all at once)"
    )


def test_the_log_at_info_has_the_service_s_lines_not_apscheduler_s_four_per_poll(tmp_path: Path) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    scheduler_level = logging.getLogger("apscheduler").level
    try:
        setup_logging("INFO", "text", tmp_path / "connector.log")
        config = config_with(accounts=1, max_workers=1)
        ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
        engine = RecordingEngine(delivering={"a0"})  # an idle poll's lines are DEBUG (the next test)
        run_for(Service(config, engine, ledger), 0.3)  # type: ignore[arg-type]
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.getLogger("apscheduler").setLevel(scheduler_level)
    lines = (tmp_path / "connector.log").read_text().splitlines()
    assert engine.polls["a0"] >= 2
    assert sum("a0: next poll at" in line for line in lines) >= 2
    assert not [line for line in lines if "apscheduler" in line]


def test_an_idle_poll_says_when_the_next_comes_at_debug_any_other_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At INFO, 100,000 idle accounts every 5 minutes would log 660 lines a second, more than journald lets
    through by default, and it would drop the warnings with them."""
    config = config_with(accounts=3, max_workers=3)
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    engine = RecordingEngine(fail={"a1"}, delivering={"a2"})
    with caplog.at_level(logging.DEBUG, logger="connector.service.scheduler"):
        run_for(Service(config, engine, ledger), 0.3, poll_now=True)  # type: ignore[arg-type]
    levels = {
        (record.getMessage().split(":")[0], record.levelno)
        for record in caplog.records
        if "next poll at" in record.getMessage()
    }
    assert levels == {
        ("account a0", logging.DEBUG),
        ("account a1", logging.INFO),
        ("account a2", logging.INFO),
    }


def test_run_and_each_worker_log_an_idle_polls_result_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    from connector.service import runtime
    from connector.service.distributed import _log_result as worker_log_result

    with caplog.at_level(logging.DEBUG):
        for log_result in (runtime._log_result, worker_log_result):
            log_result(PollResult("idle1"))
            log_result(PollResult("busy1", delivered=1))
            log_result(PollResult("failed1", status="error", error="x"))
    levels = [(record.getMessage().split(":")[0], record.levelno) for record in caplog.records]
    assert levels == 2 * [("idle1", logging.DEBUG), ("busy1", logging.INFO), ("failed1", logging.INFO)]
