"""Waiting for a mail server started as a child process to greet on each of its ports."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Mapping


def unanswered(
    process: subprocess.Popen[bytes], host: str, greetings: Mapping[int, bytes], timeout: float
) -> list[int]:
    """Connect to each port until it greets with its expected first bytes (``b"* OK"``, ``b"+OK"``), for at
    most ``timeout`` seconds; the ports still silent then (empty: all answered). Raises ``ChildProcessError``
    when the process exits meanwhile, so that the caller reports its log instead of waiting it out."""
    deadline = time.monotonic() + timeout
    pending = dict(greetings)
    while pending and time.monotonic() < deadline:
        if process.poll() is not None:
            raise ChildProcessError(f"exited with {process.returncode}")
        for port, greeting in list(pending.items()):
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2) as sock:
                if sock.makefile("rb").readline().startswith(greeting):
                    del pending[port]
        if pending:
            time.sleep(0.05)
    return sorted(pending)
