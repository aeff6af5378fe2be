"""Hostile POP3 servers (tests/servers/scripted_pop3.py) against the whole `pop-connector sync` process:
each poll ends with the account's error, and the process's memory stays bounded (peak RSS from wait4).

Time is bounded by the poll ending at all (the subprocess timeout only catches a hang); no wall-clock
figure is asserted.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.configs import write_tables
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import (
    CloseConnection,
    Pop3Session,
    ScriptedPop3Server,
    StoredMessage,
    dot_stuffed,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Python, SQLAlchemy, pydantic and imapclient take ~75 MB; a connector that buffered a hostile reply would
# pass this many times over (the endless replies below send far more than this).
MAX_RSS_KB = 256 * 1024
_BLOCK = 256 * 1024


def _endless(session: Pop3Session, status: bytes, line: bytes) -> None:
    """A multi-line reply that never ends (until the client gives up and the socket breaks)."""
    session.send_raw(status)
    block = line * (_BLOCK // len(line))
    try:
        while True:
            session.send_raw(block)
    except OSError:
        raise CloseConnection from None


def endless_retr(session: Pop3Session, argument: str) -> None:
    _endless(session, b"+OK here it comes\r\n", b"Subject: again and again and again and again\r\n")


def endless_uidl(session: Pop3Session, argument: str) -> None:
    _endless(session, b"+OK\r\n", b"1 uid-always-the-same-length-line\r\n")


def huge_status_line(session: Pop3Session, argument: str) -> None:
    session.send_raw(b"+OK " + b"x" * (8 * 1024 * 1024) + b"\r\n")


def retr_of(lines: list[bytes]) -> Callable[[Pop3Session, str], None]:
    def answer(session: Pop3Session, argument: str) -> None:
        session.send_raw(b"+OK\r\n" + dot_stuffed(lines))

    return answer


Setup = Callable[[ScriptedPop3Server], None]

CASES: dict[str, tuple[dict[str, object], Setup | None, str]] = {
    "garbage-greeting": ({"greeting": b"\x00\xff HELLO? \r\n"}, None, "greeting"),
    "close-after-greeting": ({"close_after_greeting": True}, None, "closed the connection"),
    "status-line-of-8-mb": ({}, lambda s: s.on("USER", huge_status_line), "longer than"),
    "endless-uidl": ({}, lambda s: s.on("UIDL", endless_uidl), "longer than"),
    # LIST said a few hundred bytes; the bound is 2 x LIST + 16 MiB, then the session is given up.
    "endless-retr": ({}, lambda s: s.on("RETR", endless_retr), "RETR reply longer than"),
}


def _config(tmp_path: Path, dovecot: Dovecot, users: MailUsers, port: int) -> Path:
    account = {"name": "hostile", "host": "127.0.0.1", "port": port, "tls": "none", "username": "alice",
               "password": "secret", "destination": "dovecot", "timeout": "10s"}  # fmt: skip
    destination = {"name": "dovecot", "type": "imap", "host": dovecot.host, "port": dovecot.ports.imap,
                   "tls": "none", "username": users.destination.name,
                   "password": users.destination.password}  # fmt: skip
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return write_tables(tmp_path / "config.toml", database, [destination], [account])


# Linux keeps a process's peak RSS across execve (the old address space's high-water mark goes into
# ru_maxrss), and subprocess starts a child in pytest's address space (vfork, or fork's copy of it):
# measured directly, a connector started by a pytest that has run much of the suite "peaks" at pytest's
# size (190-285 MiB seen). So a small Python in between forks the connector from its own ~10 MiB, waits
# for it and writes its ru_maxrss to a file: the connector's own peak (below ~10 MiB it reads as 10).
_PEAK_RSS_OF_CHILD = """
import os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as file:
    file.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _sync(config: Path) -> tuple[int, str, int]:
    """Exit code, stdout+stderr, and the peak RSS (KiB) of one `pop-connector sync` process."""
    report = config.with_name("peak_rss_kb")
    process = subprocess.Popen(
        [sys.executable, "-c", _PEAK_RSS_OF_CHILD, str(report),
         sys.executable, "-m", "connector", "--config", str(config), "sync"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    output = process.stdout.read().decode(errors="replace")
    process.wait()
    return process.returncode, output, int(report.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_server_ends_in_an_account_error_with_bounded_memory(
    case: str, tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    options, setup, cause = CASES[case]
    messages = [StoredMessage("uid-1", simple(1, size=300)), StoredMessage("uid-2", simple(2))]
    server = ScriptedPop3Server(messages, **options)  # type: ignore[arg-type]
    if setup is not None:
        setup(server)
    with server:
        code, output, peak_kb = _sync(_config(tmp_path, dovecot, mail_users, server.port))
    print(f"{case}: exit {code}, peak RSS {peak_kb // 1024} MiB")
    assert code == 1, output
    assert "hostile" in output and cause in output, output
    assert peak_kb < MAX_RSS_KB, f"peak RSS {peak_kb // 1024} MiB"
    assert dovecot.imap_messages(mail_users.destination.name) == []


@pytest.mark.parametrize("body_lines", [1, 5000], ids=["retr-shorter-than-list", "retr-longer-than-list"])
def test_list_disagreeing_with_retr_within_bounds_is_delivered_as_served(
    body_lines: int, tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    served = [b"Subject: disagreeing", b"Message-ID: <d@x>", b"", *[b"x" * 70] * body_lines]
    server = ScriptedPop3Server([StoredMessage("uid-1", simple(1, size=5000))])
    server.on("RETR", retr_of(served))
    with server:
        code, output, _ = _sync(_config(tmp_path, dovecot, mail_users, server.port))
    assert code == 0, output
    assert dovecot.imap_messages(mail_users.destination.name) == [b"".join(line + b"\r\n" for line in served)]


def test_the_peak_rss_measured_is_the_connectors_own_not_that_of_pytest(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    # In CI the whole suite runs in one pytest process, which grows large; that must not count. A ballast
    # as large as the ceiling, resident in this process while the connector runs, would fail a measurement
    # that included it.
    ballast = b"\x01" * (MAX_RSS_KB * 1024)
    with ScriptedPop3Server([], close_after_greeting=True) as server:
        code, output, peak_kb = _sync(_config(tmp_path, dovecot, mail_users, server.port))
    del ballast
    assert code == 1, output
    assert peak_kb < MAX_RSS_KB, f"peak RSS {peak_kb // 1024} MiB"
