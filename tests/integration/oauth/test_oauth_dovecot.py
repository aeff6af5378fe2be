"""XOAUTH2 end to end: tokens from the tests' own token server, validated by a real Dovecot (oauth2 passdb
with token introspection), for the IMAP destination and the POP3 source."""

from __future__ import annotations

import base64
import logging

import pytest

from connector.cli.check import run_checks
from tests.integration.oauth.conftest import OAuthSync
from tests.messages import simple
from tests.servers.scripted_pop3 import CloseConnection, Pop3Session, ScriptedPop3Server, StoredMessage

pytestmark = pytest.mark.integration


def test_delivery_into_imap_with_xoauth2(oauth_sync: OAuthSync) -> None:
    app, destination = oauth_sync.destination_app()
    messages = [simple(n) for n in range(3)]
    oauth_sync.dovecot.seed(oauth_sync.users.source.name, messages)
    result = oauth_sync.poll(oauth_sync.config(destination=destination))
    assert (result.status, result.delivered, result.deleted) == ("ok", 3, 3), result.problems
    assert oauth_sync.dovecot.imap_messages(oauth_sync.users.destination.name) == messages
    assert app.requests(oauth_sync.token_server) == 1
    assert "method=XOAUTH2" in oauth_sync.dovecot.log_tail(200)


@pytest.mark.parametrize("initial_response", [False, True], ids=["two-step", "one-line"])
def test_pop3_source_with_xoauth2(oauth_sync: OAuthSync, initial_response: bool) -> None:
    config, source_app, _destination_app = oauth_sync.all_oauth(initial_response=initial_response)
    oauth_sync.seed(1, 2)
    result = oauth_sync.poll(config)
    assert (result.status, result.delivered, result.deleted) == ("ok", 2, 2), result.problems
    assert oauth_sync.dovecot.maildir_count(oauth_sync.users.source.name) == 0
    assert len(oauth_sync.dovecot.imap_messages(oauth_sync.users.destination.name)) == 2
    assert source_app.requests(oauth_sync.token_server) == 1


def test_token_is_refreshed_before_it_expires(oauth_sync: OAuthSync) -> None:
    app, destination = oauth_sync.destination_app()
    config = oauth_sync.config(destination=destination)
    oauth_sync.seed(1)
    assert oauth_sync.poll(config).delivered == 1
    oauth_sync.seed(2)
    oauth_sync.clock.now += 600  # well inside the hour: the cached token is used
    assert oauth_sync.poll(config).delivered == 1
    assert app.requests(oauth_sync.token_server) == 1
    oauth_sync.clock.now += oauth_sync.token_server.lifetime - 600 - 299  # within the 5 minute margin
    oauth_sync.seed(3)
    result = oauth_sync.poll(config)
    assert (result.status, result.delivered) == ("ok", 1)
    assert app.requests(oauth_sync.token_server) == 2
    assert len(oauth_sync.dovecot.imap_messages(oauth_sync.users.destination.name)) == 3


def test_token_that_expired_early_is_replaced_once(oauth_sync: OAuthSync) -> None:
    config, source_app, destination_app = oauth_sync.all_oauth()
    oauth_sync.seed(1)
    assert oauth_sync.poll(config).delivered == 1
    oauth_sync.token_server.expire_all()  # the server forgets them; our cache still thinks they are good
    oauth_sync.seed(2)
    result = oauth_sync.poll(config)
    assert (result.status, result.delivered, result.deleted) == ("ok", 1, 1), result.problems
    assert source_app.requests(oauth_sync.token_server) == 2
    assert destination_app.requests(oauth_sync.token_server) == 2


def test_revoked_source_app_is_an_auth_error_naming_the_account(oauth_sync: OAuthSync) -> None:
    source_app, account = oauth_sync.source_app()
    config = oauth_sync.config(
        account=account, destination={"password": oauth_sync.users.destination.password}
    )
    oauth_sync.seed(1)
    assert oauth_sync.poll(config).delivered == 1
    oauth_sync.token_server.revoke_client(source_app.client_id)
    oauth_sync.seed(2)
    result = oauth_sync.poll(config)
    assert result.status == "auth_error"
    assert result.error is not None
    assert f"account {oauth_sync.users.source.name!r}" in result.error
    assert "invalid_client" in result.error and source_app.client_id in result.error
    assert source_app.secret not in result.error
    assert oauth_sync.dovecot.maildir_count(oauth_sync.users.source.name) == 1


def test_destination_mailbox_not_granted_to_the_app(oauth_sync: OAuthSync) -> None:
    app = oauth_sync.register("someone-else")
    destination = {"auth": "oauth2", "oauth": app.table(oauth_sync.token_server)}
    oauth_sync.seed(1)
    result = oauth_sync.poll(oauth_sync.config(destination=destination))
    assert result.status == "auth_error"
    assert result.delivered == 0
    problem = " ".join(result.problems)
    assert f"AUTHENTICATE XOAUTH2 as {oauth_sync.users.destination.name!r}" in problem
    assert "server said: status 401" in problem
    # A fresh token was refused: no second token request, and the message stays on the POP3 server.
    assert app.requests(oauth_sync.token_server) == 1
    assert oauth_sync.dovecot.maildir_count(oauth_sync.users.source.name) == 1


def test_no_token_or_secret_reaches_the_logs(oauth_sync: OAuthSync, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config, source_app, destination_app = oauth_sync.all_oauth()
    oauth_sync.seed(1)
    assert oauth_sync.poll(config).delivered == 1
    oauth_sync.token_server.expire_all()
    oauth_sync.seed(2)
    assert oauth_sync.poll(config).delivered == 1  # through a refused token and a retry
    apps = (source_app.client_id, destination_app.client_id)
    tokens = [token.value for token in oauth_sync.token_server.issued() if token.client_id in apps]
    assert len(tokens) == 4
    assert "AUTH XOAUTH2" in caplog.text  # the trace was on
    for secret in [*tokens, source_app.secret, destination_app.secret]:
        assert secret not in caplog.text
    for token in tokens:
        for user in (oauth_sync.users.source.name, oauth_sync.users.destination.name):
            encoded = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
            assert encoded[:32] not in caplog.text


def test_accounts_sharing_an_app_share_its_token(oauth_sync: OAuthSync) -> None:
    app, destination = oauth_sync.destination_app()
    dovecot = oauth_sync.dovecot
    second = dovecot.new_user("src")
    try:
        accounts = [
            {
                "name": user.name,
                "host": dovecot.host,
                "port": dovecot.ports.pop3,
                "tls": "none",
                "username": user.name,
                "password": user.password,
                "destination": "exo",
            }
            for user in (oauth_sync.users.source, second)
        ]
        config = oauth_sync.config(destination=destination, accounts=accounts)
        oauth_sync.seed(1)
        dovecot.seed(second.name, [simple(2)])
        assert oauth_sync.poll(config, 0).delivered == 1
        assert oauth_sync.poll(config, 1).delivered == 1
        assert app.requests(oauth_sync.token_server) == 1
        assert len(dovecot.imap_messages(oauth_sync.users.destination.name)) == 2
    finally:
        dovecot.remove_user(second.name)


def test_failing_token_endpoint_is_temporary(oauth_sync: OAuthSync) -> None:
    _app, destination = oauth_sync.destination_app()
    oauth_sync.token_server.fail_token_requests(503, {"error": "temporarily_unavailable"})
    config = oauth_sync.config(destination=destination)
    oauth_sync.seed(1)
    result = oauth_sync.poll(config)
    assert result.status == "error"  # not an auth error: the account backs off and tries again
    assert "HTTP 503" in " ".join(result.problems)
    assert oauth_sync.dovecot.maildir_count(oauth_sync.users.source.name) == 1
    again = oauth_sync.poll(config)
    assert (again.status, again.delivered) == ("ok", 1)


def test_check_logs_in_with_oauth_and_writes_nothing(oauth_sync: OAuthSync) -> None:
    _source_app, account = oauth_sync.source_app()
    _destination_app, destination = oauth_sync.destination_app()
    config = oauth_sync.config(destination=destination, account={**account, "folder": "Imported/Hosted"})
    lines: list[str] = []
    assert run_checks(config, lines.append, oauth_sync.connections)
    text = "\n".join(lines)
    assert "POP3" in text and "OK" in text
    assert "the first delivery will create" in text
    assert oauth_sync.dovecot.folders(oauth_sync.users.destination.name) == ["INBOX"]


def test_pop3_retry_uses_a_new_connection(oauth_sync: OAuthSync) -> None:
    """A server that hangs up after a refused AUTH (the scripted server, checking tokens with the token
    server) still gets the retry with a new token, on a new connection."""
    app = oauth_sync.register("hosted-box")
    token_server = oauth_sync.token_server

    def auth(session: Pop3Session, argument: str) -> None:
        session.send_line("+ ")
        response = base64.b64decode(session.rfile.readline().strip()).decode()
        token = response.split("auth=Bearer ", 1)[1].split("\x01", 1)[0]
        if token_server.introspect({"token": token}).get("active") == "true":
            session.server._authenticate(session, True)
            return
        session.err("Authentication failure: unknown user name or bad password.")
        raise CloseConnection

    pop3 = ScriptedPop3Server([StoredMessage("u1", simple(1))], username="hosted-box")
    pop3.on("AUTH", auth)
    with pop3:
        account = {
            "host": pop3.host,
            "port": pop3.port,
            "username": "hosted-box",
            "auth": "oauth2",
            "password": None,
            "oauth": app.table(token_server),
            "retention": "keep",
        }
        config = oauth_sync.config(
            account=account, destination={"password": oauth_sync.users.destination.password}
        )
        assert oauth_sync.poll(config).delivered == 1
        token_server.expire_all()
        pop3.messages.append(StoredMessage("u2", simple(2)))
        result = oauth_sync.poll(config)
        assert (result.status, result.delivered) == ("ok", 1), result.error
    assert pop3.recorded.connections == 3
    assert app.requests(token_server) == 2
    assert pop3.recorded.errors == []
