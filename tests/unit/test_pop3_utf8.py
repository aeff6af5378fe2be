"""RFC 6856 UTF8 against a server that, like Courier POP3, serves a placeholder for every message with raw
UTF-8 headers until the client sends UTF8 (issue 11.3)."""

from __future__ import annotations

import io
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.pop3 import Pop3Client, connect_pop3
from connector.tls import make_ssl_context
from tests.servers.scripted_pop3 import (
    CourierLikePop3Server,
    ScriptedPop3Server,
    StoredMessage,
    canonical,
    tls_contexts,
    unicode_placeholder,
)

UNICODE = (
    "From: Jörg Müller <joerg@example.com>\r\nSubject: Grüße aus Zürich\r\n"
    "Date: Mon, 01 Jun 2020 10:00:00 +0000\r\nMessage-ID: <grüße@example.com>\r\n\r\nHallo\r\n"
).encode()
ASCII = b"From: a@example.com\r\nSubject: plain\r\nMessage-ID: <plain@example.com>\r\n\r\nbody\r\n"


@pytest.fixture
def courier() -> Iterator[CourierLikePop3Server]:
    with CourierLikePop3Server([StoredMessage("u1", UNICODE), StoredMessage("u2", ASCII)]) as server:
        yield server
    assert server.recorded.errors == []


def _connect(server: ScriptedPop3Server, **options: object) -> Pop3Client:
    settings: dict[str, object] = {"tls": "none", "ssl_context": None, "timeout": 5.0, **options}
    return connect_pop3(server.host, server.port, **settings)  # type: ignore[arg-type]


def _retr_all(client: Pop3Client) -> list[bytes]:
    bodies = []
    for number in range(1, len(client.uidl()) + 1):
        sink = io.BytesIO()
        client.retr(number, sink)
        bodies.append(sink.getvalue())
    return bodies


def test_the_fake_serves_the_placeholder_unless_utf8_was_sent(courier: CourierLikePop3Server) -> None:
    """The scripted server itself, by hand: without UTF8 the original is only an attachment."""
    import poplib

    plain = poplib.POP3(courier.host, courier.port, timeout=5)
    plain.user("alice")
    plain.pass_("secret")
    served = b"\r\n".join(plain.retr(1)[1]) + b"\r\n"
    plain.quit()
    assert served == canonical(unicode_placeholder(UNICODE))
    assert b"Cannot display Unicode content" in served and not served.startswith(b"From: J")


@pytest.mark.parametrize("method", ["user", "apop"])
def test_utf8_is_sent_before_the_credentials_and_the_original_is_served(
    courier: CourierLikePop3Server, method: str
) -> None:
    with _connect(courier) as client:
        client.login("alice", "secret", method=method)  # type: ignore[arg-type]
        assert client.utf8
        assert _retr_all(client) == [canonical(UNICODE), canonical(ASCII)]
    commands = [command.split(" ")[0] for command in courier.recorded.commands]
    # RFC 6856: UTF8 is valid in the AUTHORIZATION state, so it precedes USER/PASS or APOP.
    assert commands[:3] == ["CAPA", "UTF8", "USER" if method == "user" else "APOP"]


def test_utf8_is_not_sent_to_a_server_that_does_not_offer_it() -> None:
    with ScriptedPop3Server([StoredMessage("u1", UNICODE)]) as server, _connect(server) as client:
        client.login("alice", "secret")
        assert not client.utf8
        assert _retr_all(client) == [canonical(UNICODE)]
    assert not any(command.upper().startswith("UTF8") for command in server.recorded.commands)


def test_a_refused_utf8_is_not_fatal(
    courier: CourierLikePop3Server, caplog: pytest.LogCaptureFixture
) -> None:
    courier.fail("UTF8", "-ERR UTF8 disabled by the administrator")
    with _connect(courier) as client:
        client.login("alice", "secret")
        assert not client.utf8
        assert _retr_all(client) == [canonical(unicode_placeholder(UNICODE)), canonical(ASCII)]
    assert "refused it (-ERR UTF8 disabled by the administrator)" in caplog.text


def test_utf8_is_in_the_protocol_trace(
    courier: CourierLikePop3Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="connector.pop3.wire")
    with _connect(courier) as client:
        client.login("alice", "secret")
    trace = [r.getMessage() for r in caplog.records if r.name == "connector.pop3.wire"]
    assert "C: UTF8" in trace and "S: +OK UTF8 enabled" in trace
    assert trace.index("C: UTF8") < trace.index("C: USER alice")


def test_utf8_follows_stls_whose_capabilities_count(tmp_path: Path) -> None:
    server_context, ca_file = tls_contexts(tmp_path)
    client_context: ssl.SSLContext = make_ssl_context(ca_file=ca_file)
    server = CourierLikePop3Server([StoredMessage("u1", UNICODE)], tls_context=server_context, stls=True)
    with server, _connect(server, tls="starttls", ssl_context=client_context) as client:
        client.login("alice", "secret")
        assert _retr_all(client) == [canonical(UNICODE)]
    commands = [command.split(" ")[0] for command in server.recorded.commands]
    assert commands[:5] == ["CAPA", "STLS", "CAPA", "UTF8", "USER"]
