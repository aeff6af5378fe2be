"""``sync`` in a terminal: progress bars, only warnings and errors above them, everything in --log-file."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import ROOT, RunCli
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_in_terminal(*args: str, timeout: float = 120) -> tuple[int, str]:
    """Runs ``pop-connector ARGS`` with stdin, stdout and stderr on a pseudo-terminal, as an admin at a
    shell would; returns its exit code and what the terminal received, escape sequences removed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("NO_COLOR", "FORCE_COLOR")}
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        [sys.executable, "-m", "connector", *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    os.close(terminal)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every process holding the terminal is gone
                break
            if not chunk:
                break
            received += chunk
        code = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return code, ESCAPES.sub("", received.decode(errors="replace")).replace("\r", "\n")


def seed_with_one_too_large(dovecot: Dovecot, mail_users: MailUsers) -> None:
    """Three messages to deliver and one over the account's max_message_size: a quarantine, a WARNING."""
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)] + [simple(3, size=20_000)])


def test_a_terminal_shows_bars_and_warnings_but_no_per_message_lines(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], tmp_path: Path
) -> None:
    seed_with_one_too_large(dovecot, mail_users)
    config = write_cfg(account={"max_message_size": 5000})
    log_file = tmp_path / "sync.log"

    code, screen = run_in_terminal("--config", str(config), "--log-file", str(log_file), "sync")

    assert code == 1, screen  # the quarantined message is a problem of the run
    assert "alice: ok delivered=3" in screen and "sync summary" in screen
    assert re.search(r"WARNING connector\.\S+: account alice: message \S+: quarantined: ", screen), screen
    # Neither the per-message lines, nor the listing line, nor any other INFO line.
    assert "delivered (" not in screen and "to deliver (" not in screen, screen
    assert " INFO " not in screen, screen
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3

    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    written = log_file.read_text()
    per_message = re.findall(
        r"INFO connector\.ops\.poll_log: account alice: message \S+ delivered \(", written
    )
    assert len(per_message) == 3, written
    assert "to deliver (" in written and "WARNING" in written and "quarantined" in written


def test_without_a_terminal_the_console_keeps_every_line_and_the_file_gets_them_too(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli, tmp_path: Path
) -> None:
    seed_with_one_too_large(dovecot, mail_users)
    config = write_cfg(account={"max_message_size": 5000})
    log_file = tmp_path / "sync.jsonl"

    result = run_cli("--config", str(config), "--log-format", "json", "--log-file", str(log_file), "sync")

    assert result.returncode == 1, result.stderr
    console = [json.loads(line) for line in result.stderr.splitlines()]
    written = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [entry["message"] for entry in console] == [entry["message"] for entry in written]
    delivered = [entry for entry in written if entry["logger"] == "connector.ops.poll_log"]
    assert len(delivered) == 3 and {entry["level"] for entry in delivered} == {"INFO"}
    assert any(entry["level"] == "WARNING" and "quarantined" in entry["message"] for entry in written)
