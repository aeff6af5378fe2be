"""12.8: access tokens obtained at runtime are redacted as soon as they exist. A POP3 server and an IMAP
server that repeat the token and the base64 XOAUTH2 response in their refusal leave neither in the protocol
log, the logs (both formats) or the ledger, for the first token and for the one fetched after it."""

from __future__ import annotations

import base64
import io
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import pytest

from connector.config import Config
from connector.engine import PollResult
from connector.logs import ContextFilter, JsonFormatter, TextFormatter
from tests.integration.oauth.conftest import App, OAuthSync
from tests.servers.scripted_pop3 import Pop3Session, ScriptedPop3Server, StoredMessage

pytestmark = pytest.mark.integration


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


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """What ``run``'s log handler writes at DEBUG, in the text and the JSON format."""
    stream = io.StringIO()
    handlers: list[logging.Handler] = []
    for formatter in (TextFormatter(), JsonFormatter()):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(ContextFilter())
        handlers.append(handler)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    for handler in handlers:
        root.addHandler(handler)
    yield stream
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(level)


def _with_protocol_log(config: Config, directory: Path) -> Config:
    service = config.service.model_copy(update={"protocol_log_dir": directory})
    accounts = [account.model_copy(update={"protocol_log": True}) for account in config.accounts]
    return config.model_copy(update={"service": service, "accounts": accounts})


def _assert_nowhere(
    oauth_sync: OAuthSync,
    app: App,
    user: str,
    logs: Path,
    service_log: io.StringIO,
    results: list[PollResult],
) -> str:
    """Two tokens were issued (the refused one is dropped, the next poll fetches another) and neither, nor
    its XOAUTH2 response, is anywhere; returns the protocol log."""
    tokens = [token.value for token in oauth_sync.token_server.issued() if token.client_id == app.client_id]
    assert len(tokens) == 2
    responses = [
        base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode() for token in tokens
    ]
    trace = "".join(path.read_text() for path in logs.iterdir())
    ledger = Path(oauth_sync.database.removeprefix("sqlite:///"))
    everywhere = {
        "protocol log": trace,
        "service log": service_log.getvalue(),
        "poll results": "\n".join(str(result.error) for result in results),
        "ledger": b"".join(path.read_bytes() for path in ledger.parent.glob(ledger.name + "*")).decode(
            "latin-1"
        ),
    }
    for where, text in everywhere.items():
        for secret in [*tokens, *responses]:
            assert secret not in text, f"a token or XOAUTH2 response is in the {where}"
    return trace


def test_pop3_server_echoing_the_token(
    oauth_sync: OAuthSync, tmp_path: Path, service_log: io.StringIO
) -> None:
    app = oauth_sync.register("hosted-box")
    pop3 = ScriptedPop3Server([StoredMessage("u1", b"Subject: x\r\n\r\nbody\r\n")], username="hosted-box")
    pop3.on("AUTH", _pop3_echoing_auth)
    logs = tmp_path / "protocol"
    with pop3:
        account = {"host": pop3.host, "port": pop3.port, "username": "hosted-box", "auth": "oauth2",
                   "password": None, "oauth": app.table(oauth_sync.token_server)}  # fmt: skip
        config = oauth_sync.config(
            account=account, destination={"password": oauth_sync.users.destination.password}
        )
        config = _with_protocol_log(config, logs)
        results = [oauth_sync.poll(config) for _ in range(2)]
    assert [result.status for result in results] == ["auth_error", "auth_error"]
    assert "-ERR [AUTH] token **** refused; you sent ****" in str(results[1].error)
    trace = _assert_nowhere(oauth_sync, app, "hosted-box", logs, service_log, results)
    assert trace.count("S: -ERR [AUTH] token **** refused; you sent ****") == 2


def test_imap_server_echoing_the_token(
    oauth_sync: OAuthSync, tmp_path: Path, service_log: io.StringIO
) -> None:
    app, destination = oauth_sync.destination_app()
    oauth_sync.seed(1)
    logs = tmp_path / "protocol"
    with EchoingImapServer() as imap:
        config = oauth_sync.config(destination={**destination, "host": "127.0.0.1", "port": imap.port})
        config = _with_protocol_log(config, logs)
        results = [oauth_sync.poll(config) for _ in range(2)]
    assert imap.refusals == 2
    assert [result.status for result in results] == ["auth_error", "auth_error"]
    assert "refused; you sent ****" in str(results[1].error)
    trace = _assert_nowhere(oauth_sync, app, oauth_sync.users.destination.name, logs, service_log, results)
    assert trace.count("refused; you sent ****") == 4  # imaplib logs each reply and then its parse
