"""What ``sync`` shows while it works and when it is done.

In a terminal: a rich progress bar per account (messages, bytes, rate, ETA) on stderr. Otherwise: plain
log lines at every tenth of the way. At the end, either way, a summary table of every account.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from connector.config import Account
from connector.poll.observe import PollObserver, PollStats
from connector.poll.result import PollResult

log = logging.getLogger("connector.ops.progress")

SUMMARY_COLUMNS = ("account", "result", "delivered", "skipped", "quarantined", "errors", "duration")


@dataclass(frozen=True)
class SummaryRow:
    account: str
    result: str
    delivered: int
    skipped: int
    quarantined: int
    errors: int
    duration: float

    def cells(self) -> list[str]:
        return [
            self.account,
            self.result,
            str(self.delivered),
            str(self.skipped),
            str(self.quarantined),
            str(self.errors),
            format_duration(self.duration),
        ]


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def summary_rows(results: Sequence[PollResult], durations: dict[str, float]) -> list[SummaryRow]:
    """One row per account and a total; errors are failed messages plus one for a failed poll."""
    rows = [
        SummaryRow(
            account=r.account,
            result=r.status,
            delivered=r.delivered + r.recovered,
            skipped=r.skipped,
            quarantined=r.quarantined,
            errors=r.failed + (1 if r.poll_failed else 0),
            duration=durations.get(r.account, 0.0),
        )
        for r in results
    ]
    failed = sum(1 for r in results if r.poll_failed)
    total = SummaryRow(
        account=f"{len(rows)} accounts",
        result="ok" if not failed else f"{failed} failed",
        delivered=sum(r.delivered for r in rows),
        skipped=sum(r.skipped for r in rows),
        quarantined=sum(r.quarantined for r in rows),
        errors=sum(r.errors for r in rows),
        duration=max(durations.values(), default=0.0),
    )
    return [*rows, total]


def plain_table(rows: Sequence[SummaryRow]) -> str:
    table = [list(SUMMARY_COLUMNS)] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(SUMMARY_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in table]
    return "\n".join(line.rstrip() for line in lines)


def print_summary(rows: Sequence[SummaryRow], out: TextIO) -> None:
    if not out.isatty():
        print(plain_table(rows), file=out)
        return
    table = Table(title="sync summary")
    for i, column in enumerate(SUMMARY_COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right")
    for i, row in enumerate(rows):
        table.add_row(*row.cells(), end_section=i == len(rows) - 2)
    Console(file=out).print(table)


class SyncProgress(PollObserver):
    """Base of both displays: remembers each account's duration for the summary."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    def poll_finished(self, result: PollResult, stats: PollStats) -> None:
        self.durations[result.account] = stats.duration

    def __enter__(self) -> SyncProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


class LogProgress(SyncProgress):
    """Not a terminal: a log line when the plan is known and at each further tenth of the bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._reported: dict[str, int] = {}

    def poll_planned(self, stats: PollStats) -> None:
        self._reported[stats.account] = 0
        log.info(
            "account %s: %d messages (%d bytes) to deliver", stats.account, stats.planned, stats.planned_bytes
        )

    def message_fetched(self, stats: PollStats, uidl: str, size: int) -> None:
        if not stats.planned or not stats.planned_bytes:
            return
        tenth = min(10, stats.fetched_bytes * 10 // stats.planned_bytes)
        if tenth <= self._reported.get(stats.account, 0):
            return
        self._reported[stats.account] = tenth
        elapsed = max(time.monotonic() - stats.started, 1e-6)
        rate = stats.fetched_bytes / elapsed
        remaining = max(stats.planned_bytes - stats.fetched_bytes, 0) / rate if rate else 0.0
        log.info(
            "account %s: %d/%d messages, %d/%d bytes, %.0f bytes/s, about %s left",
            stats.account,
            stats.fetched,
            stats.planned,
            stats.fetched_bytes,
            stats.planned_bytes,
            rate,
            format_duration(remaining),
        )


class BarProgress(SyncProgress):
    """A terminal: one rich progress bar per account, on ``console`` (stderr)."""

    def __init__(self, accounts: Sequence[Account], console: Console) -> None:
        super().__init__()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[messages]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskID] = {}
        for account in accounts:
            self._tasks[account.name] = self._progress.add_task(
                f"{account.name} (waiting)", total=None, messages="", start=False
            )

    def _task(self, account: str) -> TaskID:
        with self._lock:
            if account not in self._tasks:
                self._tasks[account] = self._progress.add_task(account, total=None, messages="")
            return self._tasks[account]

    def poll_started(self, account: Account, stats: PollStats) -> None:
        task = self._task(account.name)
        self._progress.start_task(task)
        self._progress.update(task, description=f"{account.name} (listing)")

    def poll_planned(self, stats: PollStats) -> None:
        self._progress.update(
            self._task(stats.account),
            description=stats.account,
            total=stats.planned_bytes,
            messages=f"0/{stats.planned} msgs",
        )

    def message_fetched(self, stats: PollStats, uidl: str, size: int) -> None:
        self._progress.update(
            self._task(stats.account),
            completed=min(stats.fetched_bytes, stats.planned_bytes or stats.fetched_bytes),
            messages=f"{stats.fetched}/{stats.planned} msgs",
        )

    def poll_finished(self, result: PollResult, stats: PollStats) -> None:
        super().poll_finished(result, stats)
        task = self._task(result.account)
        done = stats.planned_bytes if result.status == "ok" else stats.fetched_bytes
        self._progress.update(task, description=f"{result.account} ({result.status})", completed=done)
        self._progress.stop_task(task)

    def __enter__(self) -> BarProgress:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()


def sync_progress(accounts: Sequence[Account], err: TextIO) -> SyncProgress:
    """Bars when ``err`` is a terminal, log lines otherwise."""
    if err.isatty():
        return BarProgress(accounts, Console(file=err))
    return LogProgress()
