"""How big ``/metrics`` gets: ``python -m bench.metrics [--accounts N]``.

Feeds ``PollMetrics`` one poll's events for each of N synthetic accounts (named like
``user000042@example.com``), writes their rows into a synthetic ledger (SQLite), and renders ``/metrics``
as the listener serves it (events, process metrics, and the series read from the ledger at each scrape).
Three days of a service: every account fine; a bad day (1 % backing off, 0.1 % failing their login, 0.1 %
suspended, 1 % with a backlog, 0.1 % with unidentified messages, 0.5 % overdue); an outage in which every
account fails with a backlog and unidentified messages. Reports the size in bytes and the number of
samples (lines that are not comments), and how long one scrape took.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

from connector.config import Config, parse_config
from connector.ledger.database import open_database
from connector.ledger.models import AccountRow
from connector.ledger.store import Ledger
from connector.ops.health import HealthMonitor
from connector.ops.metrics import PollMetrics, ServiceSeries
from connector.ops.observers import overdue_polls
from connector.poll.events import Delivered, Finished, Started
from connector.poll.result import PollResult

NOW = datetime.now(UTC)


@dataclass(frozen=True)
class Day:
    """Which fraction of the accounts is in which trouble (every ``1/x``-th account, so they mix)."""

    name: str
    backing_off: float = 0.0
    auth_failing: float = 0.0
    suspended: float = 0.0
    backlog: float = 0.0
    unidentified: float = 0.0
    overdue: float = 0.0


DAYS = (
    Day("every account fine"),
    Day("a bad day", 0.01, 0.001, 0.001, 0.01, 0.001, 0.005),
    Day("an outage: every account failing", 1.0, backlog=1.0, unidentified=1.0, overdue=1.0),
)


@dataclass(frozen=True)
class Scrape:
    size: int
    samples: int
    seconds: float


def name(index: int) -> str:
    return f"user{index:06d}@example.com"


def picked(index: int, fraction: float) -> bool:
    """Is account ``index`` among the ``fraction`` of all (spread evenly)?"""
    if fraction <= 0:
        return False
    return int((index + 1) * fraction) != int(index * fraction)


def synthetic_config(accounts: int) -> Config:
    """A configuration of ``accounts`` accounts, copied from one (parsing 100,000 takes seconds)."""
    data = {
        "service": {"database": "sqlite:///:memory:", "metrics": "127.0.0.1:0"},
        "destinations": [{"name": "d", "type": "imap", "host": "h", "username": "u", "password": "p"}],
        "accounts": [{"name": name(0), "host": "h", "username": "u", "password": "p", "destination": "d"}],
    }
    config = parse_config(data, Path("/virtual/config.toml"))
    model = config.accounts[0]
    return config.model_copy(
        update={"accounts": [model.model_copy(update={"name": name(i)}) for i in range(accounts)]}
    )


def synthetic_ledger(path: Path, accounts: int, day: Day) -> Ledger:
    engine = open_database(f"sqlite:///{path}")
    rows = []
    for i in range(accounts):
        failing = picked(i, day.backing_off) or picked(i, day.auth_failing)
        rows.append(
            {
                "name": name(i),
                "created_at": NOW - timedelta(days=30),
                "active": True,
                "consecutive_failures": 3 if failing else 0,
                "last_delivered": 0,
                "last_failed": 0,
                "last_deleted": 0,
                "last_result": "auth_error" if picked(i, day.auth_failing) else "error" if failing else "ok",
                "last_success_at": NOW - timedelta(hours=2 if failing else 0, seconds=i % 300),
                "suspended_at": NOW - timedelta(hours=1) if picked(i, day.suspended) else None,
                "next_poll_at": NOW + timedelta(seconds=i % 300),
            }
        )
    with engine.begin() as connection:
        connection.execute(insert(AccountRow), rows)
    return Ledger(engine)


def fed_metrics(accounts: int, day: Day) -> PollMetrics:
    """One poll of every account, as its events tell it."""
    metrics = PollMetrics()
    for i in range(accounts):
        account = name(i)
        metrics.notify(Started(account))
        if picked(i, day.backing_off):
            result = PollResult(account, status="error", error="connection refused")
        elif picked(i, day.auth_failing):
            result = PollResult(account, status="auth_error", error="login refused")
        else:
            metrics.notify(Delivered(account, "U1", 4096, "0" * 64, "imap:1"))
            unidentified = 2 if picked(i, day.unidentified) else 0
            result = PollResult(account, delivered=1, messages_done=1, unidentified=unidentified)
        planned = 1 + (5 if picked(i, day.backlog) else 0)
        if picked(i, day.unidentified) and result.status != "ok":
            # The outage: the last poll that got through its listing left some unidentified.
            metrics.notify(Finished(account, PollResult(account, unidentified=2), 0.4, planned=None))
        metrics.notify(Finished(account, result, 0.2 + (i % 50) / 10, planned=planned))
        metrics.observe_lag((i % 20) / 10)
    return metrics


def health_of(accounts: int, day: Day) -> HealthMonitor:
    health = HealthMonitor()
    due = {
        name(i): NOW - (timedelta(hours=1) if picked(i, day.overdue) else -timedelta(minutes=5))
        for i in range(accounts)
    }
    health.configure(due, due)
    return health


def scrape(accounts: int, day: Day, directory: Path) -> Scrape:
    config = synthetic_config(accounts)
    ledger = synthetic_ledger(directory / f"{day.name[:8].replace(' ', '-')}.db", accounts, day)
    metrics = fed_metrics(accounts, day)
    health = health_of(accounts, day)
    overdue: Callable[[Config], int] = lambda c: overdue_polls(health, c)  # noqa: E731
    series = ServiceSeries(lambda: config, ledger, overdue)
    started = time.perf_counter()
    text = metrics.render(series)
    seconds = time.perf_counter() - started
    samples = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    ledger.engine.dispose()
    return Scrape(len(text), samples, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    args = parser.parse_args()
    print(f"/metrics with {args.accounts:,} accounts")
    print(f"{'':36} {'bytes':>12} {'samples':>9} {'scrape':>9}")
    with tempfile.TemporaryDirectory() as directory:
        for day in DAYS:
            result = scrape(args.accounts, day, Path(directory))
            print(f"{day.name:36} {result.size:>12,} {result.samples:>9,} {result.seconds * 1000:>7.0f}ms")


if __name__ == "__main__":
    main()
