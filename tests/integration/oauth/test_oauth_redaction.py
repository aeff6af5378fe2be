"""12.8: access tokens obtained at runtime are redacted as soon as they exist. A POP3 server and an IMAP
server that repeat the token and the base64 XOAUTH2 response in their refusal leave neither in the protocol
log, the logs (text and JSON, DEBUG) or the ledger: ``pop-connector sync`` runs twice, each time with a
token it has just obtained."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import pytest

from tests.acceptance.conftest import ROOT
from tests.configs import write_tables
from tests.integration.oauth.conftest import App, OAuthSync
from tests.servers.scripted_pop3 import Pop3Session, ScriptedPop3Server, StoredMessage

pytestmark = pytest.mark.acceptance


def _token_in(encoded: str) -> str:
    return base64.b64decode(encoded).split(b"Bearer ", 1)[1].split(b"\x01", 1)[0].decode()


def _refusal(encoded: str) -> str:
    return f"token {_token_in(encoded)} refused; you sent {encoded}"


def _pop3_echoing_auth(session: Pop3Session, argument: str) -> None:
    _mechanism, _, encoded = argument.partition(" ")
    if not encoded:
        session.send_line("+ ")
        encoded = session.rfile.readline().rstrip(b"\r\n").decode()
    session.err(f"[AUTH] {_refusal(encoded)}")


class EchoingImapServer:
    """Just enough IMAP for imapclient to connect and AUTHENTICATE XOAUTH2, which it refuses with the token
    and the response repeated in its tagged NO."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.refusals = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> EchoingImapServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                self._session(stream)

    def _session(self, stream: BinaryIO) -> None:
        def send(line: str) -> None:
            stream.write(line.encode() + b"\r\n")
            stream.flush()

        send("* OK echoing IMAP ready")
        while line := stream.readline():
            tag, _, command = line.decode().rstrip("\r\n").partition(" ")
            verb = command.split(" ", 1)[0].upper()
            if verb == "CAPABILITY":
                send("* CAPABILITY IMAP4rev1 AUTH=XOAUTH2")
                send(f"{tag} OK done")
            elif verb == "AUTHENTICATE":
                send("+ ")
                encoded = stream.readline().decode().strip()
                self.refusals += 1
                send(f"{tag} NO [AUTHENTICATIONFAILED] {_refusal(encoded)}")
            elif verb == "LOGOUT":
                send("* BYE")
                send(f"{tag} OK bye")
                return
            else:
                send(f"{tag} BAD not here")


def _sync_twice(
    oauth_sync: OAuthSync, tmp_path: Path, destination: dict[str, Any], account: dict[str, Any]
) -> tuple[Path, list[subprocess.CompletedProcess[str]]]:
    """``sync`` at DEBUG, in the text and then the JSON log format, with the account's protocol log on."""
    logs = tmp_path / "protocol"
    config = write_tables(tmp_path / "config.toml", oauth_sync.database, [destination], [account])
    text = config.read_text().replace("[service]\n", f'[service]\nprotocol_log_dir = "{logs}"\n', 1)
    config.write_text(text)
    command = [sys.executable, "-m", "connector", "--config", str(config), "--log-level", "DEBUG"]
    runs = [
        subprocess.run(
            [*command, "--log-format", log_format, "sync"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            check=False,
        )
        for log_format in ("text", "json")
    ]
    for run in runs:
        assert run.returncode == 1 and "auth" in run.stdout, run.stdout + run.stderr
    return logs, runs


def _assert_nowhere(
    oauth_sync: OAuthSync, app: App, user: str, logs: Path, runs: list[subprocess.CompletedProcess[str]]
) -> str:
    """Each run obtained a token of its own, and neither token, nor its XOAUTH2 response, is anywhere;
    returns the protocol log."""
    tokens = [token.value for token in oauth_sync.token_server.issued() if token.client_id == app.client_id]
    assert len(tokens) == 2
    responses = [
        base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode() for token in tokens
    ]
    trace = "".join(path.read_text() for path in logs.iterdir())
    ledger = Path(oauth_sync.database.removeprefix("sqlite:///"))
    everywhere = {
        "protocol log": trace,
        "output": "".join(run.stdout + run.stderr for run in runs),
        "ledger": b"".join(path.read_bytes() for path in ledger.parent.glob(ledger.name + "*")).decode(
            "latin-1"
        ),
    }
    assert "XOAUTH2" in everywhere["output"]  # the DEBUG trace was on
    for where, text in everywhere.items():
        for secret in [*tokens, *responses]:
            assert secret not in text, f"a token or XOAUTH2 response is in the {where}"
    return trace


def test_pop3_server_echoing_the_token(oauth_sync: OAuthSync, tmp_path: Path) -> None:
    app = oauth_sync.register("hosted-box")
    pop3 = ScriptedPop3Server([StoredMessage("u1", b"Subject: x\r\n\r\nbody\r\n")], username="hosted-box")
    pop3.on("AUTH", _pop3_echoing_auth)
    dovecot, users = oauth_sync.dovecot, oauth_sync.users
    destination = {"name": "d", "type": "imap", "host": dovecot.host, "port": dovecot.ports.imap,
                   "tls": "none", "username": users.destination.name,
                   "password": users.destination.password}  # fmt: skip
    with pop3:
        account = {"name": "a", "host": pop3.host, "port": pop3.port, "tls": "none", "username": "hosted-box",
                   "auth": "oauth2", "oauth": app.table(oauth_sync.token_server), "destination": "d",
                   "protocol_log": True}  # fmt: skip
        logs, runs = _sync_twice(oauth_sync, tmp_path, destination, account)
    assert "-ERR [AUTH] token **** refused; you sent ****" in runs[1].stdout
    trace = _assert_nowhere(oauth_sync, app, "hosted-box", logs, runs)
    assert trace.count("S: -ERR [AUTH] token **** refused; you sent ****") == 2


def test_imap_server_echoing_the_token(oauth_sync: OAuthSync, tmp_path: Path) -> None:
    app = oauth_sync.register(oauth_sync.users.destination.name)
    oauth_sync.seed(1)
    dovecot, users = oauth_sync.dovecot, oauth_sync.users
    with EchoingImapServer() as imap:
        destination = {"name": "d", "type": "imap", "host": "127.0.0.1", "port": imap.port, "tls": "none",
                       "username": users.destination.name, "auth": "oauth2",
                       "oauth": app.table(oauth_sync.token_server)}  # fmt: skip
        account = {"name": "a", "host": dovecot.host, "port": dovecot.ports.pop3, "tls": "none",
                   "username": users.source.name, "password": users.source.password, "destination": "d",
                   "protocol_log": True}  # fmt: skip
        logs, runs = _sync_twice(oauth_sync, tmp_path, destination, account)
    assert imap.refusals == 2
    assert "refused; you sent ****" in runs[1].stdout
    trace = _assert_nowhere(oauth_sync, app, users.destination.name, logs, runs)
    assert trace.count("refused; you sent ****") == 4  # imaplib logs each reply and then its parse
