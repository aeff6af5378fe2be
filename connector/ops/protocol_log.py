"""Protocol logs: the POP3 and IMAP conversation of one account in a rotating file of its own.

Turned on with ``protocol_log = true`` (per account, or under ``[defaults]`` for every account). The
records come from the loggers that already trace the protocols (``connector.pop3.wire`` from our POP3
client, ``imapclient`` from the IMAP library); a poll marks its thread with the account it serves (a
context variable) and one dispatching handler writes each record to that account's file.

Secrets: the POP3 client writes PASS/APOP/AUTH arguments as ``****``, imapclient writes LOGIN and
AUTHENTICATE as ``**REDACTED**``, SASL responses are logged by size only, and as a last guard every
secret the process knows (``connector.redaction``: those of the current configuration, and of every earlier
one since a reload; each OAuth token as soon as it was obtained) is replaced by ``****`` in each line
when it is written. Message bodies never appear: the POP3 trace gives size and SHA-256, imaplib only the
literal's size.

Files are ``<protocol_log_dir>/<account>.log`` (+ ``.1`` ... after rotation), created mode 600 in a
directory of mode 700.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import logging.handlers
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from connector import redaction
from connector.config import Account, Config, default_state_dir

PROTOCOL_LOGGERS = (
    "connector.pop3.wire",
    "connector.protocol",
    "imapclient",
    "connector.ews.wire",
    "connector.gmail.wire",
)

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("protocol_log_account", default=None)
_lock = threading.Lock()
_files: dict[str, _PrivateRotatingFile] = {}
_installed = False
_notes = logging.getLogger("connector.protocol")


class _PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A rotating file that is created (and, after rotation, re-created) with mode 600."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.chmod(self.baseFilename, 0o600)  # an older file may have been created more openly
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors="backslashreplace")


class _Redacting(logging.Formatter):
    """Reads the registry at each line, not a list taken when the file was opened: the file lives as long
    as the process, its secrets change with each reload and each new token."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(name)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime(datefmt or "%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))

    def format(self, record: logging.LogRecord) -> str:
        return redaction.redact(super().format(record))


class _Dispatcher(logging.Handler):
    """Installed once on the protocol loggers: hands each record to the current account's file."""

    def emit(self, record: logging.LogRecord) -> None:
        account = _current.get()
        handler = _files.get(account) if account is not None else None
        if handler is not None:
            handler.handle(record)


class _RootLevel(logging.Filter):
    """Keeps the console as quiet as --log-level says although the protocol loggers now log DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.getLogger().getEffectiveLevel()


def protocol_note(message: str, *args: object) -> None:
    """A line of our own in the protocol log (e.g. what was APPENDed, summarised by size and hash)."""
    _notes.debug(message, *args)


def log_dir(config: Config) -> Path:
    configured = config.service.protocol_log_dir
    if configured is None:
        return default_state_dir() / "protocol-logs"
    if not configured.is_absolute() and config.source is not None:
        return config.source.parent / configured
    return configured


def account_secrets(config: Config, account: Account) -> list[str]:
    secrets = [account.password.get_secret_value()] if account.password is not None else []
    if account.destination_password is not None:
        secrets.append(account.destination_password.get_secret_value())
    for destination in config.destinations:
        if destination.name != account.destination:
            continue
        for field in (
            "password",
            "master_password",
            "client_secret",
            "service_account_key",
            "client_secrets",
        ):
            secret = getattr(destination, field, None)
            if secret is not None:
                secrets.append(secret.get_secret_value())
    return secrets


def _install() -> None:
    global _installed
    if _installed:
        return
    dispatcher = _Dispatcher(logging.DEBUG)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RootLevel())
    for name in PROTOCOL_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(dispatcher)
    _installed = True


def _file_for(config: Config, account: Account) -> _PrivateRotatingFile:
    directory = log_dir(config)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = _PrivateRotatingFile(
        directory / f"{account.name}.log",
        maxBytes=config.service.protocol_log_max_bytes,
        backupCount=config.service.protocol_log_backups,
        encoding="utf-8",
    )
    handler.setFormatter(_Redacting())
    return handler


@contextlib.contextmanager
def recording(config: Config, account: Account) -> Iterator[None]:
    """Around one poll: its protocol traffic goes to the account's file when the account asks for it."""
    if not account.protocol_log:
        yield
        return
    # A configuration built in code, not by the loader, has its account's secrets redacted too.
    redaction.register(*account_secrets(config, account))
    with _lock:
        _install()
        if account.name not in _files:
            _files[account.name] = _file_for(config, account)
    token = _current.set(account.name)
    try:
        yield
    finally:
        _current.reset(token)
