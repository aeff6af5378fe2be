"""Logging set-up: human-readable lines or JSON lines, each tagged with the account and UIDL it is about.

The account and UIDL travel in context variables set around a poll (``log_context``) and around each
message (``message_context``), and a filter copies them onto every record. That way no log call has to
repeat them, and lines from libraries called during a poll (imapclient, SQLAlchemy) are tagged too.

Both formats cut every secret the process knows out of each line (``connector.redaction``): a library's
DEBUG trace or a server's reply may carry one that no log call of ours would write.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, account, uidl (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
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
    """Writes to whatever ``sys.stderr`` is at the time, so a live progress display can redirect it."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup_logging(level: str, log_format: LogFormat = "text") -> None:
    handler = _CurrentStderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    if level != "DEBUG":
        # Alembic announces every migration context at INFO on each start; only its warnings matter.
        logging.getLogger("alembic").setLevel(logging.WARNING)
