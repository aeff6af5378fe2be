"""The terminal's side of ``sync``'s display (connector/ops/progress.py): a rich progress bar per account
and the summary as a rich table. Imported only when stderr (the bars) or stdout (the table) is a terminal,
so that a sync whose output goes to a file or a pipe does not load rich.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
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
from rich.text import Text

from connector.config import Account
from connector.ops.logs import ContextFilter, console_formatter, console_replaced
from connector.ops.progress import SUMMARY_COLUMNS, SummaryRow, SyncProgress
from connector.poll.events import Fetched, Finished, Planned, PollEvent, Started


def print_table(rows: Sequence[SummaryRow], out: TextIO) -> None:
    table = Table(title="sync summary")
    for i, column in enumerate(SUMMARY_COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right")
    for i, row in enumerate(rows):
        table.add_row(*row.cells(), end_section=i == len(rows) - 2)
    Console(file=out).print(table)


class ProgressConsoleHandler(logging.Handler):
    """The console's log lines while bars are on screen: WARNING and above (``level``), printed through the
    bars' rich ``console``, which puts them above the bars instead of through them."""

    def __init__(self, console: Console, formatter: logging.Formatter, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._console = console
        self.setFormatter(formatter)
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            # Text: the line is printed as it is (no markup, no highlighting); soft_wrap: long lines are
            # wrapped by the terminal, not cut into several.
            self._console.print(Text(line), soft_wrap=True)
        except Exception:
            self.handleError(record)


class BarProgress(SyncProgress):
    """A terminal: one rich progress bar per account, on ``console`` (stderr). While the bars are up the
    console shows only warnings and errors (``ProgressConsoleHandler``)."""

    def __init__(
        self, accounts: Sequence[Account], console: Console, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(clock)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[messages]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._console = console
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskID] = {}
        self._quiet = ExitStack()
        for account in accounts:
            self._tasks[account.name] = self._progress.add_task(
                f"{account.name} (waiting)", total=None, messages="", start=False
            )

    def _task(self, account: str) -> TaskID:
        with self._lock:
            if account not in self._tasks:
                self._tasks[account] = self._progress.add_task(account, total=None, messages="")
            return self._tasks[account]

    def notify(self, event: PollEvent) -> None:
        super().notify(event)
        match event:
            case Started():
                task = self._task(event.account)
                self._progress.start_task(task)
                self._progress.update(task, description=f"{event.account} (listing)")
            case Planned():
                self._progress.update(
                    self._task(event.account),
                    description=event.account,
                    total=event.size,
                    messages=f"0/{event.messages} msgs",
                )
            case Fetched():
                poll = self.progress[event.account]
                self._progress.update(
                    self._task(event.account),
                    completed=min(poll.fetched_bytes, poll.planned_bytes or poll.fetched_bytes),
                    messages=f"{poll.fetched}/{poll.planned} msgs",
                )
            case Finished():
                self._finished(event)
            case _:
                pass

    def _finished(self, event: Finished) -> None:
        status = event.result.status
        poll = self._poll(event.account)
        task = self._task(event.account)
        done = poll.planned_bytes if status == "ok" else poll.fetched_bytes
        self._progress.update(task, description=f"{event.account} ({status})", completed=done)
        self._progress.stop_task(task)

    def __enter__(self) -> BarProgress:
        self._progress.start()
        handler = ProgressConsoleHandler(self._console, console_formatter())
        self._quiet.enter_context(console_replaced(handler))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._quiet.close()
        self._progress.stop()


def terminal_progress(accounts: Sequence[Account], err: TextIO) -> BarProgress:
    return BarProgress(accounts, Console(file=err))
