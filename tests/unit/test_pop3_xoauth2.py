"""AUTH XOAUTH2 in the POP3 client against the scripted server, playing the forms Dovecot does not show:
Microsoft 365's two-step-only exchange, an error challenge, and the wire trace."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator

import pytest

from connector.errors import SourceAuthError
from connector.pop3 import connect_pop3
from tests.servers.scripted_pop3 import Pop3Session, ScriptedPop3Server, StoredMessage

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.test-token-value"
USER = "archive@contoso.example"
EXPECTED = f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode()
ERROR_JSON = b'{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/"}'
CAPABILITIES = ["UIDL", "USER", "SASL XOAUTH2", "RESP-CODES", "AUTH-RESP-CODE"]


class Microsoft365Auth:
    """AUTH the way outlook.office365.com answers it: the token only after a "+" (an initial response on
    the AUTH line is refused), "-ERR Authentication failure" for a bad token."""

    def __init__(self) -> None:
        self.responses: list[bytes] = []

    def __call__(self, session: Pop3Session, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        if mechanism.upper() != "XOAUTH2" or initial:
            session.err("Protocol error. Connection is closed. 10")
            return
        session.send_line("+ ")
        response = session.rfile.readline().rstrip(b"\r\n")
        self.responses.append(response)
        accepted = base64.b64decode(response) == EXPECTED
        if accepted:
            session.server._authenticate(session, True)
        else:
            session.err("Authentication failure: unknown user name or bad password.")


class ChallengingAuth:
    """AUTH the way Dovecot and Gmail refuse a token: a base64 JSON challenge, then -ERR after the client's
    empty response. Both forms are accepted."""

    def __init__(self) -> None:
        self.responses: list[bytes] = []

    def __call__(self, session: Pop3Session, argument: str) -> None:
        _mechanism, _, initial = argument.partition(" ")
        if not initial:
            session.send_line("+ ")
            initial = session.rfile.readline().rstrip(b"\r\n").decode()
        self.responses.append(initial.encode())
        if base64.b64decode(initial) == EXPECTED:
            session.server._authenticate(session, True)
            return
        session.send_line(b"+ " + base64.b64encode(ERROR_JSON))
        self.responses.append(session.rfile.readline())
        session.err("[AUTH] Authentication failed.")


@pytest.fixture
def server() -> Iterator[ScriptedPop3Server]:
    with ScriptedPop3Server(
        [StoredMessage("u1", b"Subject: x\r\n\r\nbody\r\n")], capabilities=CAPABILITIES
    ) as srv:
        yield srv
    assert srv.recorded.errors == []


def connect(server: ScriptedPop3Server):  # type: ignore[no-untyped-def]
    return connect_pop3(server.host, server.port, tls="none", ssl_context=None, timeout=5.0)


def test_two_step_form_as_microsoft_365_needs(server: ScriptedPop3Server) -> None:
    auth = Microsoft365Auth()
    server.on("AUTH", auth)
    with connect(server) as client:
        client.authenticate_xoauth2(USER, TOKEN)
        assert client.stat()[0] == 1
    assert server.recorded.commands[1] == "AUTH XOAUTH2"
    assert auth.responses == [base64.b64encode(EXPECTED)]


def test_one_line_form_puts_the_response_on_the_auth_line(server: ScriptedPop3Server) -> None:
    auth = ChallengingAuth()
    server.on("AUTH", auth)
    with connect(server) as client:
        client.authenticate_xoauth2(USER, TOKEN, initial_response=True)
        assert client.stat()[0] == 1
    assert server.recorded.commands[1] == "AUTH XOAUTH2 " + base64.b64encode(EXPECTED).decode()


def test_microsoft_365_refusal(server: ScriptedPop3Server) -> None:
    server.on("AUTH", Microsoft365Auth())
    with connect(server) as client, pytest.raises(SourceAuthError) as caught:
        client.authenticate_xoauth2(USER, "expired-token")
    assert "Authentication failure: unknown user name or bad password" in str(caught.value)
    assert "expired-token" not in str(caught.value)


@pytest.mark.parametrize("initial_response", [False, True])
def test_error_challenge_is_answered_and_decoded(server: ScriptedPop3Server, initial_response: bool) -> None:
    auth = ChallengingAuth()
    server.on("AUTH", auth)
    with connect(server) as client:
        with pytest.raises(SourceAuthError) as caught:
            client.authenticate_xoauth2(USER, "revoked-token", initial_response=initial_response)
        # The session is still in step: the empty SASL response was sent, the -ERR read.
        assert client.usable
    message = str(caught.value)
    assert "AUTH failed: -ERR [AUTH] Authentication failed." in message
    assert "server said: status 401, schemes bearer, scope https://outlook.office.com/" in message
    assert "revoked-token" not in message
    assert auth.responses[-1] == b"\r\n"


def test_wire_trace_hides_the_token(server: ScriptedPop3Server, caplog: pytest.LogCaptureFixture) -> None:
    server.on("AUTH", ChallengingAuth())
    encoded = base64.b64encode(EXPECTED).decode()
    caplog.set_level(logging.DEBUG, logger="connector.pop3.wire")
    for initial_response in (False, True):
        with connect(server) as client:
            client.authenticate_xoauth2(USER, TOKEN, initial_response=initial_response)
    trace = caplog.text
    assert "C: AUTH XOAUTH2\n" in trace or "C: AUTH XOAUTH2 " in trace
    assert "C: AUTH XOAUTH2 ****" in trace
    assert TOKEN not in trace and encoded not in trace
    assert encoded[:40] not in trace


def test_control_characters_in_the_user_are_refused(server: ScriptedPop3Server) -> None:
    with connect(server) as client, pytest.raises(SourceAuthError, match="control character"):
        client.authenticate_xoauth2("a\x01b", TOKEN)


class EchoingAuth:
    """A careless server that repeats the token and the whole base64 response in its refusal (12.8)."""

    def __call__(self, session: Pop3Session, argument: str) -> None:
        _mechanism, _, initial = argument.partition(" ")
        if not initial:
            session.send_line("+ ")
            initial = session.rfile.readline().rstrip(b"\r\n").decode()
        token = base64.b64decode(initial).split(b"Bearer ", 1)[1].split(b"\x01", 1)[0].decode()
        session.err(f"[AUTH] token {token} refused; you sent {initial}")


@pytest.mark.parametrize("initial_response", [False, True], ids=["two-step", "one-line"])
def test_a_refusal_echoing_the_token_is_redacted_in_the_trace_and_the_error(
    server: ScriptedPop3Server, caplog: pytest.LogCaptureFixture, initial_response: bool
) -> None:
    server.on("AUTH", EchoingAuth())
    encoded = base64.b64encode(EXPECTED).decode()
    caplog.set_level(logging.DEBUG, logger="connector.pop3.wire")
    with connect(server) as client, pytest.raises(SourceAuthError) as caught:
        client.authenticate_xoauth2(USER, TOKEN, initial_response=initial_response)
    assert "S: -ERR [AUTH] token **** refused; you sent ****" in caplog.text
    assert "AUTH failed: -ERR [AUTH] token **** refused; you sent ****" in str(caught.value)
    for text in (caplog.text, str(caught.value)):
        assert TOKEN not in text and encoded not in text
