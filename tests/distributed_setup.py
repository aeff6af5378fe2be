"""Shared by the distributed tests and bench/distributed.py: many POP3 accounts on the Dovecot fixture,
a fresh PostgreSQL database, worker processes running ``pop-connector run`` in distributed mode."""

from __future__ import annotations

import itertools
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from tests.configs import _table
from tests.postgres import POSTGRES_ADMIN_DSN, POSTGRES_URL_BASE
from tests.servers.dovecot import Dovecot, MailUser

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def fresh_database(prefix: str = "pop_connector_dist") -> Iterator[str]:
    """A database of its own (the workers' job queue must not meet other tests' rows), dropped after."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_URL_BASE + name
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def message(account: str, n: int, *, padding: int = 0) -> bytes:
    """A message whose Message-ID and body name its account, so deliveries can be counted per account."""
    body = f"Message {n} of {account}.\r\n" + ("x" * 76 + "\r\n") * padding
    return (
        "Received: from mx.hosted.example by pop.hosted.example; "
        f"Tue, 03 Jun 2025 08:{n % 60:02d}:05 +0000\r\n"
        f"From: Sender <sender@example.net>\r\nTo: {account}@example.net\r\n"
        f"Subject: {account} message {n}\r\nDate: Tue, 03 Jun 2025 07:58:00 +0000\r\n"
        f"Message-ID: <m{n}.{account}@example.net>\r\n\r\n{body}"
    ).encode()


@dataclass
class Fleet:
    """Source users (one per account), one destination user, and what was seeded into each source."""

    dovecot: Dovecot
    destination: MailUser
    sources: list[MailUser] = field(default_factory=list)
    seeded: dict[str, list[bytes]] = field(default_factory=dict)

    def remove(self) -> None:
        for user in [*self.sources, self.destination]:
            self.dovecot.remove_user(user.name)


def make_fleet(dovecot: Dovecot, accounts: int, messages_for: Any) -> Fleet:
    """``messages_for(index)`` -> how many messages account ``index`` starts with."""
    fleet = Fleet(dovecot, dovecot.new_user("ddst"))
    for index in range(accounts):
        user = dovecot.new_user("dsrc")
        fleet.sources.append(user)
        mail = [message(user.name, n) for n in range(messages_for(index))]
        fleet.seeded[user.name] = mail
        if mail:
            dovecot.seed(user.name, mail)
    return fleet


def config_text(fleet: Fleet, database: str, poll_interval: str = "1h", **service: Any) -> str:
    dovecot = fleet.dovecot
    service_fields = {
        "database": database,
        "mode": "distributed",
        "max_workers": 4,
        "dispatch_interval": "1s",
        "heartbeat_interval": "1s",
        "stalled_after": "3s",
        **service,
    }
    parts = [
        _table("[service]", service_fields),
        _table("[defaults]", {"poll_interval": poll_interval, "poll_jitter": 0, "timeout": "20s"}),
        _table(
            "[[destinations]]",
            {
                "name": "dovecot",
                "type": "imap",
                "host": dovecot.host,
                "port": dovecot.ports.imap,
                "tls": "none",
                "username": fleet.destination.name,
                "password": fleet.destination.password,
            },
        ),
    ]
    for user in fleet.sources:
        parts.append(
            _table(
                "[[accounts]]",
                {
                    "name": user.name,
                    "host": dovecot.host,
                    "port": dovecot.ports.pop3,
                    "tls": "none",
                    "username": user.name,
                    "password": user.password,
                    "destination": "dovecot",
                },
            )
        )
    return "\n".join(parts)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def start_worker(config: Path, name: str, log_dir: Path, prefix: Sequence[str] = ()) -> WorkerProcess:
    """``prefix`` runs the CLI through a driver module, e.g. the SIGKILL crash driver."""
    log = log_dir / f"{name}.log"
    module_args = list(prefix) or ["-m", "connector"]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, *module_args, "--config", str(config), "run"],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    return WorkerProcess(name, process, log)


_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ connector\.service\.distributed\.worker: "
    r"account (\S+): poll (started|finished) on worker (\S+)"
)


@dataclass(frozen=True)
class Session:
    account: str
    worker: str
    start: datetime
    end: datetime | None  # None: the worker died in the middle of it


def poll_sessions(logs: dict[str, str]) -> list[Session]:
    """Every poll the workers logged, from its start line to its finish line."""
    sessions: list[Session] = []
    for text in logs.values():
        open_polls: dict[str, tuple[str, datetime]] = {}
        for line in text.splitlines():
            match = _LINE.match(line)
            if match is None:
                continue
            stamp, account, what, worker = match.groups()
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
            if what == "started":
                open_polls[account] = (worker, when)
            else:
                started_by, start = open_polls.pop(account)
                sessions.append(Session(account, started_by, start, when))
        sessions.extend(Session(a, w, start, None) for a, (w, start) in open_polls.items())
    return sessions


def overlaps(sessions: list[Session], killed_at: datetime | None = None) -> list[tuple[Session, Session]]:
    """Pairs of polls of one account that ran at the same time (an unfinished one lasts until the kill)."""
    by_account: dict[str, list[Session]] = {}
    for session in sessions:
        by_account.setdefault(session.account, []).append(session)
    found = []
    for polls in by_account.values():
        polls.sort(key=lambda s: s.start)
        for earlier, later in itertools.pairwise(polls):
            end = earlier.end or killed_at or datetime.max
            if later.start < end:
                found.append((earlier, later))
    return found
