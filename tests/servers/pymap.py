"""pymap (a Python IMAP server, ``pip install pymap``) as a destination that does not store what it is given.

Measured (0.36): LITERAL+, UIDPLUS and MULTIAPPEND are offered; NAMESPACE is not (and answers BAD); a
stored message differs from the APPEND literal (bare LF becomes CRLF, long header lines are re-wrapped),
so its RFC822.SIZE and SHA-256 differ from ours: the kind of server crash recovery cannot find by bytes
(Exchange Online's IMAP converts every message the same way). It runs here with its in-memory backend,
one process per test, on a free port of loopback, without TLS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imapclient import IMAPClient

from tests.servers.dovecot import HOST

USER = "pymapuser"
PASSWORD = "pymap-secret"
_START_TIMEOUT = 30.0


class PymapError(RuntimeError):
    pass


@dataclass
class Pymap:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    user: str = USER
    password: str = PASSWORD

    @contextlib.contextmanager
    def imap(self) -> Iterator[IMAPClient]:
        client = IMAPClient(self.host, port=self.port, ssl=False, timeout=20)
        try:
            client.login(self.user, self.password)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def stored(self, folder: str = "INBOX") -> list[bytes]:
        """Every stored message of ``folder``, in UID order, as pymap gives it back (EXAMINE, BODY.PEEK)."""
        with self.imap() as client:
            client.select_folder(folder, readonly=True)
            uids = sorted(client.search("ALL"))
            data = client.fetch(uids, ["BODY.PEEK[]"]) if uids else {}
        return [data[uid][b"BODY[]"] for uid in uids]

    def append(self, message: bytes, folder: str = "INBOX") -> None:
        with self.imap() as client:
            client.append(folder, message)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            return sock.recv(64).startswith(b"* OK")
    except OSError:
        return False


@contextlib.contextmanager
def running_pymap() -> Iterator[Pymap]:
    """A fresh pymap (empty INBOX for ``USER``) on a free port; stopped afterwards. Fails, never skips."""
    workdir = Path(tempfile.mkdtemp(prefix="pymap-test-"))
    log = workdir / "pymap.log"
    port = _free_port()
    services = ["--no-service", "admin", "--no-service", "managesieve", "--no-service", "swim"]
    command = [sys.executable, "-c", "from pymap.main import main; main()", "--no-tls", *services]
    command += ["--host", HOST, "--port", str(port), "dict", "--demo-user", USER, "--demo-password", PASSWORD]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    server = Pymap(HOST, port, process, log)
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not _answers(HOST, port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise PymapError(f"pymap did not start on port {port}: {log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
