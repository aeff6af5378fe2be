"""The service's scheduling rules, with a stand-in engine (the poll itself is tested against Dovecot)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connector.config import Account, Config, parse_config
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
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

    def __init__(self, fail: set[str] | None = None) -> None:
        self.lock = threading.Lock()
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
        return PollResult(account.name, next_poll_at=self.clock() + timedelta(milliseconds=10))


def run_for(service: Service, seconds: float) -> None:
    service.start()
    time.sleep(seconds)
    service.shutdown()


def test_no_account_is_polled_twice_at_once_and_workers_are_bounded(tmp_path: Path) -> None:
    config = config_with(accounts=6, max_workers=2)
    engine = RecordingEngine()
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    run_for(Service(config, engine, ledger), 0.8)  # type: ignore[arg-type]
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
