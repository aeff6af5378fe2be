"""Gmail over IMAP: an IMAP destination whose ``oauth`` table names a Desktop app client
(``client_secrets``) logs in with XOAUTH2 using the consent ``pop-connector authorize`` kept for the
account's address. The tests' token server plays Google's token endpoint (the refresh-token grant) and a
real Dovecot checks each token through its introspection, as imap.gmail.com checks Google's tokens."""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from connector.cli import authorize
from connector.destinations.gmail_tokens import GMAIL_SCOPES, StoredToken, read_token, token_file, write_token
from connector.oauth import GMAIL_IMAP_SCOPE
from tests.integration.oauth.conftest import App, OAuthSync, TokenPeer
from tests.integration.test_authorize import Browser
from tests.servers.token_server import TokenServer

pytestmark = pytest.mark.integration


def client_secrets(app: App, oauth_sync: OAuthSync) -> str:
    """The JSON Google's console downloads for a Desktop app client, pointing at the tests' server."""
    server = oauth_sync.token_server
    return json.dumps(
        {
            "installed": {
                "client_id": app.client_id,
                "client_secret": app.secret,
                "auth_uri": f"{server.base_url}/o/oauth2/auth",
                "token_uri": server.token_url,
                "redirect_uris": ["http://localhost"],
            }
        }
    )


def consent(
    oauth_sync: OAuthSync, tmp_path: Path, *, scopes: tuple[str, ...] = (GMAIL_IMAP_SCOPE,)
) -> tuple[App, dict[str, Any], Path]:
    """A client granted the destination mailbox, the consent its user gave (as ``authorize`` keeps it) and
    the destination settings that use it."""
    user = oauth_sync.users.destination.name
    app = oauth_sync.register(user)
    refresh = oauth_sync.token_server.issue_refresh_token(app.client_id)
    tokens = tmp_path / "tokens"
    path = token_file(tokens, user)
    write_token(
        path,
        StoredToken(
            address=user,
            client_id=app.client_id,
            client_secret=app.secret,
            refresh_token=refresh,
            token_uri=oauth_sync.token_server.token_url,
            scopes=scopes,
        ),
    )
    oauth = {"client_secrets": client_secrets(app, oauth_sync), "token_dir": str(tokens)}
    return app, {"auth": "oauth2", "oauth": oauth}, path


def test_delivery_into_gmail_over_imap_with_the_stored_consent(
    oauth_sync: OAuthSync, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app, destination, path = consent(oauth_sync, tmp_path)
    oauth_sync.seed(1, 2)
    result = oauth_sync.poll(oauth_sync.config(destination=destination))
    assert (result.status, result.delivered, result.deleted) == ("ok", 2, 2), result.problems
    assert len(oauth_sync.dovecot.imap_messages(oauth_sync.users.destination.name)) == 2
    assert "method=XOAUTH2" in oauth_sync.dovecot.log_tail(200)
    stored = read_token(path)
    [request] = [
        form
        for form in oauth_sync.token_server.recorded.token_requests
        if form.get("client_id") == app.client_id
    ]
    assert request["grant_type"] == "refresh_token"
    assert request["refresh_token"] == stored.refresh_token
    # The token is cached like any other: a second poll within the hour asks for none.
    oauth_sync.seed(3)
    assert oauth_sync.poll(oauth_sync.config(destination=destination)).delivered == 1
    assert app.requests(oauth_sync.token_server) == 1
    tokens = [token.value for token in oauth_sync.token_server.issued() if token.client_id == app.client_id]
    for secret in [*tokens, stored.refresh_token, app.secret]:
        assert secret not in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_no_consent_yet_names_the_authorize_command(oauth_sync: OAuthSync, tmp_path: Path) -> None:
    _app, destination, path = consent(oauth_sync, tmp_path)
    path.unlink()
    oauth_sync.seed(1)
    result = oauth_sync.poll(oauth_sync.config(destination=destination))
    assert result.status == "auth_error"
    assert result.delivered == 0
    assert f"pop-connector authorize exo --user {oauth_sync.users.destination.name}" in (result.error or "")
    assert oauth_sync.dovecot.maildir_count(oauth_sync.users.source.name) == 1


def test_a_withdrawn_consent_is_an_auth_error_naming_the_authorize_command(
    oauth_sync: OAuthSync, tmp_path: Path
) -> None:
    app, destination, path = consent(oauth_sync, tmp_path)
    # The user removed the app's access: Google answers invalid_grant to the refresh token.
    write_token(path, read_token(path).with_refresh_token("1//withdrawn-refresh-token-of-the-test"))
    oauth_sync.seed(1)
    result = oauth_sync.poll(oauth_sync.config(destination=destination))
    assert result.status == "auth_error"
    error = result.error or ""
    assert "invalid_grant" in error and "revoked or has expired" in error
    assert f"pop-connector authorize exo --user {oauth_sync.users.destination.name}" in error
    assert "withdrawn-refresh-token" not in error and app.secret not in error


def test_a_consent_without_the_imap_scope_is_refused_before_any_request(
    oauth_sync: OAuthSync, tmp_path: Path
) -> None:
    # E.g. token_dir pointed at the consents of a Gmail API destination: they do not reach IMAP.
    app, destination, _path = consent(oauth_sync, tmp_path, scopes=GMAIL_SCOPES)
    oauth_sync.seed(1)
    result = oauth_sync.poll(oauth_sync.config(destination=destination))
    assert result.status == "auth_error"
    assert "does not cover IMAP" in (result.error or "")
    assert app.requests(oauth_sync.token_server) == 0


# --- authorize, then deliver ------------------------------------------------------------------------------


def _unsigned_jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'kid': 'test'})}.{part(claims)}.c2lnbmF0dXJl"


def _with_openid_tokens(server: TokenServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Google answers an authorization code granted ``openid email`` with an OpenID token naming the
    user; the tests' token server does not, so this adds one."""
    plain = server.token_response

    def answer(form: dict[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        status, payload = plain(form, authorization)
        granted = str(payload.get("scope", "")).split()
        if status == 200 and form.get("grant_type") == "authorization_code" and "openid" in granted:
            token = server.lookup(payload["access_token"])
            assert token is not None and token.user is not None
            claims = {"iss": "https://accounts.google.com", "aud": form["client_id"], "email": token.user}
            payload = {**payload, "id_token": _unsigned_jwt({**claims, "email_verified": True})}
        return status, payload

    monkeypatch.setattr(server, "token_response", answer)


def test_authorize_then_deliver_over_imap_with_a_rotating_refresh_token(
    oauth_sync: OAuthSync, token_peer: TokenPeer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, user = token_peer.server, oauth_sync.users.destination.name
    _with_openid_tokens(server, monkeypatch)
    monkeypatch.setattr(server, "rotate_refresh_tokens", True)
    client = server.add_desktop_client()
    client.mailbox = user  # what Dovecot's introspection names for this client's tokens
    oauth = {
        "client_secrets": json.dumps(server.client_secrets(client)),
        "token_dir": str(tmp_path / "tokens"),
        "ca_file": str(token_peer.ca_file),
    }
    config = oauth_sync.config(destination={"auth": "oauth2", "oauth": oauth})

    # The person consents in the (scripted) browser; the command listens for the redirect.
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.setattr("webbrowser.open", Browser(token_peer.ca_file).open)
    out = io.StringIO()
    args = argparse.Namespace(destination="exo", user=user, no_browser=False, timeout=30.0, config=None)
    assert authorize.run(args, config, out) == 0
    asked = server.recorded.authorizations[-1]
    assert asked["scope"].split() == [GMAIL_IMAP_SCOPE, "openid", "email"]
    path = token_file(tmp_path / "tokens", user)
    consented = read_token(path)
    assert GMAIL_IMAP_SCOPE in consented.scopes and consented.address == user

    # The service signs in with it; Google rotates the refresh token, and the file keeps the new one.
    oauth_sync.seed(1)
    result = oauth_sync.poll(config)
    assert (result.status, result.delivered, result.deleted) == ("ok", 1, 1), result.problems
    rotated = read_token(path)
    assert rotated.refresh_token != consented.refresh_token
    assert server.refresh_tokens_of(user) == [rotated.refresh_token]  # the old one no longer works
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # An hour later (a new access token is needed), the rotated refresh token is the one that works.
    oauth_sync.clock.now += server.lifetime
    oauth_sync.seed(2)
    result = oauth_sync.poll(config)
    assert (result.status, result.delivered) == ("ok", 1), result.problems
    assert len(oauth_sync.dovecot.imap_messages(user)) == 2
    assert read_token(path).refresh_token != rotated.refresh_token
    for secret in (consented.refresh_token, rotated.refresh_token, client.secret or ""):
        assert secret not in out.getvalue()
