"""What ``sync`` shows while it works and when it is done.

In a terminal: a rich progress bar per account (messages, bytes, rate, ETA) on stderr, with only warnings
and errors printed above the bars (the per-message lines would scroll the bars away; ``--log-file`` keeps
them); those are in connector/ops/bars.py, the only module of the display that imports rich. Otherwise:
plain log lines at every tenth of the way, and every log line as before. At the end, either way, a summary
table of every account. Both displays are ``PollObserver``s: they count what each poll planned and fetched
from its events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

from connector.config import Account
from connector.ops.logs import log_context
from connector.poll.events import Fetched, Finished, Planned, PollEvent, Started
from connector.poll.result import PollResult

log = logging.getLogger("connector.ops.progress")

SUMMARY_COLUMNS = (
    "account",
    "result",
    "delivered",
    "undelivered",
    "skipped",
    "quarantined",
    "errors",
    "duration",
)


@dataclass(frozen=True)
class SummaryRow:
    account: str
    result: str
    delivered: int
    # Left for the next poll with no attempt counted (the destination was down): not errors of messages.
    not_delivered: int
    skipped: int
    quarantined: int
    errors: int
    duration: float

    def cells(self) -> list[str]:
        return [
            self.account,
            self.result,
            str(self.delivered),
            str(self.not_delivered),
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
    """One row per account and a total; errors are failed messages (an attempt counted in the ledger) plus
    one for a failed poll."""
    rows = [
        SummaryRow(
            account=r.account,
            result=r.status,
            delivered=r.delivered + r.recovered,
            not_delivered=r.not_delivered,
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
        not_delivered=sum(r.not_delivered for r in rows),
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
    from connector.ops.bars import print_table

    print_table(rows, out)


@dataclass
class PollProgress:
    """How far one account's poll is. Bytes are counted in the server's LIST sizes, as the plan's are, so
    that a poll that fetched all it planned is at exactly 100%."""

    started: float  # the clock's time at Started
    planned: int | None = None  # None until the plan is made
    planned_bytes: int = 0
    fetched: int = 0
    fetched_bytes: int = 0


class SyncProgress:
    """Base of both displays, and what a dry run shows (nothing): keeps each account's running counts
    (``progress``) and its poll's duration for the summary. Events come one at a time (``Observers``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.durations: dict[str, float] = {}
        self.progress: dict[str, PollProgress] = {}
        self._clock = clock

    def notify(self, event: PollEvent) -> None:
        match event:
            case Started():
                self.progress[event.account] = PollProgress(self._clock())
            case Planned():
                poll = self._poll(event.account)
                poll.planned, poll.planned_bytes = event.messages, event.size
            case Fetched():
                poll = self._poll(event.account)
                poll.fetched += 1
                poll.fetched_bytes += event.size
            case Finished():
                self.durations[event.account] = event.duration
            case _:
                pass

    def _poll(self, account: str) -> PollProgress:
        poll = self.progress.get(account)
        if poll is None:  # no Started seen: count from now
            poll = self.progress[account] = PollProgress(self._clock())
        return poll

    def elapsed(self, account: str) -> float:
        return self._clock() - self._poll(account).started

    def __enter__(self) -> SyncProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


class LogProgress(SyncProgress):
    """Not a terminal: a log line when the plan is known and at each further tenth of the bytes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._reported: dict[str, int] = {}

    def notify(self, event: PollEvent) -> None:
        super().notify(event)
        match event:
            case Planned():
                self._reported[event.account] = 0
                with log_context(event.account):
                    log.info(
                        "account %s: %d messages (%d bytes) to deliver",
                        event.account,
                        event.messages,
                        event.size,
                    )
            case Fetched():
                self._fetched(event.account)
            case _:
                pass

    def _fetched(self, account: str) -> None:
        poll = self.progress[account]
        if not poll.planned or not poll.planned_bytes:
            return
        tenth = min(10, poll.fetched_bytes * 10 // poll.planned_bytes)
        if tenth <= self._reported.get(account, 0):
            return
        self._reported[account] = tenth
        rate = poll.fetched_bytes / max(self.elapsed(account), 1e-6)
        remaining = max(poll.planned_bytes - poll.fetched_bytes, 0) / rate if rate else 0.0
        # Fetched comes from the poll's fetch thread; the line is about the account, not the message.
        with log_context(account):
            log.info(
                "account %s: %d/%d messages, %d/%d bytes, %.0f bytes/s, about %s left",
                account,
                poll.fetched,
                poll.planned,
                poll.fetched_bytes,
                poll.planned_bytes,
                rate,
                format_duration(remaining),
            )


def sync_progress(accounts: Sequence[Account], err: TextIO) -> SyncProgress:
    """Bars when ``err`` is a terminal, log lines otherwise."""
    if err.isatty():
        from connector.ops.bars import terminal_progress

        return terminal_progress(accounts, err)
    return LogProgress()
