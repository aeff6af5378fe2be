"""Logging set-up: human-readable lines or JSON lines, each tagged with the account and UIDL it is about.

The account and UIDL travel in context variables set around a poll (``log_context``) and around each
message (``message_context``), and a filter copies them onto every record. That way no log call has to
repeat them, and lines from libraries called during a poll (imapclient, SQLAlchemy) are tagged too.

Both formats cut every secret the process knows out of each line (``connector.redaction``): a library's
DEBUG trace or a server's reply may carry one that no log call of ours would write.

Lines go to the console (stderr) and, with ``--log-file``, to that file too. A live display (sync's
progress bars) takes the console over for a while (``console_replaced``); the file goes on unchanged.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from io import TextIOWrapper
from pathlib import Path
from typing import Any, Literal, TextIO

from connector.redaction import redact

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

_account: ContextVar[str | None] = ContextVar("connector_account", default=None)
_uidl: ContextVar[str | None] = ContextVar("connector_uidl", default=None)


@contextmanager
def log_context(account: str) -> Iterator[None]:
    """Everything logged inside (in this thread) is about ``account``; no message yet."""
    account_token = _account.set(account)
    uidl_token = _uidl.set(None)
    try:
        yield
    finally:
        _uidl.reset(uidl_token)
        _account.reset(account_token)


def set_message(uidl: str | None) -> None:
    """From now on (until the next call or the end of the poll) log lines are about message ``uidl``."""
    _uidl.set(uidl)


@contextmanager
def about_message(uidl: str) -> Iterator[None]:
    """Log lines inside are about message ``uidl``; afterwards, about what they were about before."""
    token = _uidl.set(uidl)
    try:
        yield
    finally:
        _uidl.reset(token)


class ContextFilter(logging.Filter):
    """Puts ``account`` and ``uidl`` on every record; values given with ``extra=`` win."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "account", None) is None:
            record.account = _account.get()
        if getattr(record, "uidl", None) is None:
            record.uidl = _uidl.get()
        return True


def _once_per_record(formatter: logging.Formatter, record: logging.LogRecord, make: Callable[[], str]) -> str:
    """``make()``, the line ``formatter`` makes of ``record``, made once: the console and the log file share
    one formatter, and formatting (redacting above all, when the process knows many secrets) is most of a
    line's cost."""
    done = record.__dict__.get("_connector_line")
    if done is not None and done[0] is formatter:
        text: str = done[1]
        return text
    text = make()
    record.__dict__["_connector_line"] = (formatter, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, account, uidl (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        return _once_per_record(self, record, lambda: self._json(record))

    def _json(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in ("account", "uidl"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The usual one-line format, plus ``[account=.. uidl=..]`` for what the text does not already say."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return _once_per_record(self, record, lambda: self._line(record))

    def _line(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        message = record.getMessage()
        tags = [
            f"{key}={value}"
            for key in ("account", "uidl")
            if (value := getattr(record, key, None)) is not None and str(value) not in message
        ]
        if not tags:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} [{' '.join(tags)}]{newline}{rest}"


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The console: writes to whatever ``sys.stderr`` is at the time (a test or a live display may have
    replaced it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class PrivateFileHandler(logging.handlers.WatchedFileHandler):
    """``--log-file``: appends to the file, created with mode 600 (lines name accounts, mailboxes and
    messages); reopened when logrotate moved it away. An existing file keeps its mode and owner."""

    def _open(self) -> TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def make_formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def setup_logging(level: str, log_format: LogFormat = "text", log_file: Path | None = None) -> None:
    """Everything at ``level`` to stderr and, with ``log_file``, to that file too (same format).

    Raises ``OSError`` when the file cannot be opened; the handlers are then left as they were.
    """
    handlers: list[logging.Handler] = [_CurrentStderrHandler()]
    if log_file is not None:
        handlers.append(PrivateFileHandler(log_file, encoding="utf-8"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, PrivateFileHandler):  # a second set-up in one process (tests)
            old.close()
    formatter = make_formatter(log_format)  # one for both: a line is formatted once (``_once_per_record``)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    if level != "DEBUG":
        # Alembic announces every migration context at INFO on each start; only its warnings matter.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # APScheduler logs four lines at INFO for every poll `run` starts (added, running, removed,
        # executed): 130 lines a second with 1,000 accounts every 30 s, and a tenth of an idle poll's CPU.
        # The service logs each poll itself; APScheduler's warnings (a missed run, an error) still show.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)


def console_formatter() -> logging.Formatter:
    """The format of the console's lines (``setup_logging``), for a handler that takes the console's place."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _CurrentStderrHandler) and handler.formatter is not None:
            return handler.formatter
    return TextFormatter()


@contextmanager
def console_replaced(handler: logging.Handler) -> Iterator[None]:
    """Inside, ``handler`` writes what the console (stderr) would, at its own level: a live display takes
    the console over (``connector.ops.progress``) while the file handler goes on as before."""
    root = logging.getLogger()
    consoles = [old for old in root.handlers if isinstance(old, _CurrentStderrHandler)]
    for old in consoles:
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for old in consoles:
            root.addHandler(old)
