"""``pop-connector authorize``: the pure parts of the consent flow (the request, the answer's checks, the
pasted address, which destinations take a consent) and the configuration of Gmail over IMAP. The flow end
to end, against the tests' token server, is in tests/integration/test_authorize.py."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from connector import redaction
from connector.cli.authorize import (
    ConsentTarget,
    LoopbackReceiver,
    _address_in_id_token,
    authorization_request,
    browser_at_hand,
    code_from_redirect,
    consent_target,
    parse_pasted,
    run,
)
from connector.config import Config, ImapDestination, parse_config
from connector.destinations.gmail_tokens import GMAIL_SCOPES, DesktopClient
from connector.errors import ConfigError
from connector.oauth import GMAIL_IMAP_SCOPE, GoogleConsentCredentials

CLIENT_SECRETS = json.dumps(
    {
        "installed": {
            "client_id": "1234-abc.apps.googleusercontent.com",
            "client_secret": "GOCSPX-unit-test-client-secret",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token",
            "redirect_uris": ["http://localhost"],
        }
    }
)
SERVICE_ACCOUNT_KEY = json.dumps(
    {
        "type": "service_account",
        "client_email": "connector@project.iam.gserviceaccount.com",
        "client_id": "112233445566778899001",
        "private_key": "-----BEGIN PRIVATE KEY-----\nunit-test-key\n-----END PRIVATE KEY-----\n",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
)


def parse(destinations: list[dict[str, Any]], accounts: list[dict[str, Any]] | None = None) -> Config:
    return parse_config(
        {"destinations": destinations, "accounts": accounts or []}, Path("/etc/pop-connector/config.toml")
    )


def gmail_imap(**oauth: Any) -> dict[str, Any]:
    return {
        "name": "gmail",
        "type": "imap",
        "host": "imap.gmail.com",
        "auth": "oauth2",
        "oauth": {"client_secrets": CLIENT_SECRETS, **oauth},
    }


def account(**extra: Any) -> dict[str, Any]:
    return {
        "name": "alice",
        "host": "pop.hosted.example",
        "username": "alice@hosted.example",
        "password": "pop-password",
        "destination": "gmail",
        "destination_username": "alice@gmail.com",
        **extra,
    }


# --- configuration: Gmail over IMAP ------------------------------------------------------------------------


def test_gmail_over_imap_uses_the_consent_of_the_accounts_address(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    config = parse([gmail_imap()], [account()])
    destination = config.destinations[0]
    assert isinstance(destination, ImapDestination)
    assert destination.google_tokens() == tmp_path / "state" / "gmail" / "gmail"
    credentials = destination.oauth_credentials("alice@gmail.com")
    assert credentials == GoogleConsentCredentials(
        destination="gmail", address="alice@gmail.com", token_dir=tmp_path / "state" / "gmail" / "gmail"
    )
    assert credentials.authorize_command == "pop-connector authorize gmail --user alice@gmail.com"


def test_token_dir_relative_to_the_state_directory_or_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    relative = parse([gmail_imap(token_dir="consents")]).destinations[0]
    absolute = parse([gmail_imap(token_dir=str(tmp_path / "elsewhere"))]).destinations[0]
    assert isinstance(relative, ImapDestination) and isinstance(absolute, ImapDestination)
    assert relative.google_tokens() == tmp_path / "state" / "consents"
    assert absolute.google_tokens() == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("destination", "accounts", "expected"),
    [
        (gmail_imap(client_id="c"), [], "client_id: not used with client_secrets"),
        (gmail_imap(refresh_token="r", scope="s"), [], "refresh_token, scope: not used with client_secrets"),
        (
            {
                **gmail_imap(),
                "oauth": {"client_secrets": CLIENT_SECRETS, "token_url": "https://id.example/t"},
            },
            [],
            "set either tenant_id",
        ),
        (
            {**gmail_imap(), "oauth": {"token_url": "https://id.example/t", "client_secret": "s"}},
            [],
            "client_id: required field is missing",
        ),
        (
            {**gmail_imap(), "oauth": {**gmail_imap()["oauth"], "token_dir": "x", "client_secrets": None}},
            [],
            "set either tenant_id",
        ),
        (
            {
                **gmail_imap(),
                "oauth": {
                    "token_url": "https://id.example/t",
                    "client_id": "c",
                    "client_secret": "s",
                    "token_dir": "x",
                },
            },
            [],
            "token_dir is only used with client_secrets",
        ),
        (
            {"name": "gmail", "type": "imap", "host": "imap.example", "username": "u", "password": "p"},
            [account(auth="oauth2", password=None, oauth={"client_secrets": CLIENT_SECRETS})],
            "is for IMAP destinations (imap.gmail.com), not for POP3 sources",
        ),
    ],
)
def test_gmail_over_imap_config_errors(
    destination: dict[str, Any], accounts: list[dict[str, Any]], expected: str
) -> None:
    def without_none(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None}
        return value

    with pytest.raises(ConfigError) as caught:
        parse([without_none(destination)], [without_none(a) for a in accounts])
    assert expected in str(caught.value)


# --- which destinations take a consent ---------------------------------------------------------------------


def test_consent_target_of_a_gmail_destination(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    config = parse([{"name": "mail", "type": "gmail", "client_secrets": CLIENT_SECRETS}])
    target = consent_target(config, "mail")
    assert isinstance(target, ConsentTarget)
    assert target.scopes == GMAIL_SCOPES == target.required
    assert target.profile_url == "https://gmail.googleapis.com/gmail/v1/users/me/profile"
    assert target.token_dir == tmp_path / "gmail" / "mail"
    assert target.client.client_id == "1234-abc.apps.googleusercontent.com"
    # The client secret inside the JSON is a secret of its own, not only the JSON as a whole.
    assert redaction.redact("GOCSPX-unit-test-client-secret") == redaction.REDACTED


def test_consent_target_of_gmail_over_imap_asks_for_imap_and_the_address() -> None:
    target = consent_target(parse([gmail_imap()]), "gmail")
    assert isinstance(target, ConsentTarget)
    assert target.scopes == (GMAIL_IMAP_SCOPE, "openid", "email")
    assert target.required == (GMAIL_IMAP_SCOPE,)
    assert target.profile_url is None


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        (
            {"name": "gmail", "type": "imap", "host": "imap.example", "username": "u", "password": "p"},
            "destination 'gmail' (type = \"imap\") takes no consent",
        ),
        (
            {
                "name": "gmail",
                "type": "ews",
                "service_endpoint": "https://ex.example/EWS/Exchange.asmx",
                "username": "u",
                "password": "p",
            },
            "destination 'gmail' (type = \"ews\") takes no consent",
        ),
        (
            {"name": "gmail", "type": "gmail", "client_secrets": '{"web": 1}'},
            "client_secrets is not the JSON of an OAuth client",
        ),
        (
            {
                "name": "gmail",
                "type": "gmail",
                "client_secrets": CLIENT_SECRETS.replace(
                    "https://oauth2.googleapis.com", "http://id.example"
                ),
            },
            "http://id.example/token: must be an https:// URL",
        ),
    ],
)
def test_destinations_that_take_no_consent(destination: dict[str, Any], expected: str) -> None:
    config = parse([destination])
    with pytest.raises(ConfigError) as caught:
        consent_target(config, "gmail")
    assert expected in str(caught.value)
    with pytest.raises(ConfigError, match=r"no destination named 'other' .* \(gmail\)"):
        consent_target(config, "other")


def test_workspace_destination_prints_the_delegation_steps() -> None:
    config = parse([{"name": "workspace", "type": "gmail", "service_account_key": SERVICE_ACCOUNT_KEY}])
    out = io.StringIO()
    args = argparse.Namespace(destination="workspace", user=None, no_browser=False, timeout=1.0, config=None)
    assert run(args, config, out) == 0
    text = out.getvalue()
    assert "no consent to give here" in text
    assert "connector@project.iam.gserviceaccount.com" in text
    assert "112233445566778899001" in text
    assert ",".join(GMAIL_SCOPES) in text
    assert "unit-test-key" not in text and "PRIVATE KEY" not in text


# --- the request and its answer ---------------------------------------------------------------------------


def target() -> ConsentTarget:
    client = DesktopClient(
        "cid", "csecret", "https://accounts.example/o/oauth2/auth", "https://tok.example/t"
    )
    return ConsentTarget("gmail", client, GMAIL_SCOPES, GMAIL_SCOPES, Path("/t"), True, None)


def test_authorization_request_asks_for_a_refresh_token_with_pkce() -> None:
    request = authorization_request(target(), "http://127.0.0.1:4711/", "alice@gmail.com")
    parts = urllib.parse.urlsplit(request.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://accounts.example/o/oauth2/auth"
    query = dict(urllib.parse.parse_qsl(parts.query))
    expected_challenge = base64.urlsafe_b64encode(hashlib.sha256(request.verifier.encode()).digest())
    assert query == {
        "client_id": "cid",
        "redirect_uri": "http://127.0.0.1:4711/",
        "response_type": "code",
        "scope": " ".join(GMAIL_SCOPES),
        "state": request.state,
        "code_challenge": expected_challenge.rstrip(b"=").decode(),
        "code_challenge_method": "S256",
        "access_type": "offline",
        "prompt": "consent",
        "login_hint": "alice@gmail.com",
    }
    assert 43 <= len(request.verifier) <= 128
    assert request.verifier not in request.url
    again = authorization_request(target(), "http://127.0.0.1:4711/", None)
    assert again.state != request.state and again.verifier != request.verifier
    assert "login_hint" not in again.url


def test_the_answer_must_carry_our_state() -> None:
    request = authorization_request(target(), "http://127.0.0.1:4711/", None)
    assert code_from_redirect(request, {"state": request.state, "code": "4/0A-unit-code"}) == "4/0A-unit-code"
    assert redaction.redact("x 4/0A-unit-code y") == "x **** y"
    with pytest.raises(ConfigError, match="state does not match"):
        code_from_redirect(request, {"state": "forged", "code": "4/0A-other"})
    with pytest.raises(ConfigError, match="state does not match"):
        code_from_redirect(request, {"code": "4/0A-other"})
    with pytest.raises(ConfigError, match="refused on Google's page"):
        code_from_redirect(request, {"state": request.state, "error": "access_denied"})
    with pytest.raises(ConfigError, match="no authorization code"):
        code_from_redirect(request, {"state": request.state})


@pytest.mark.parametrize(
    "pasted",
    [
        "http://127.0.0.1:4711/?state=S&code=4/0A-c&scope=x y",
        "  http://127.0.0.1:4711/?state=S&code=4%2F0A-c\n",
        "state=S&code=4/0A-c",
        "?state=S&code=4/0A-c",
        "/?state=S&code=4/0A-c",
    ],
)
def test_the_pasted_address(pasted: str) -> None:
    answer = parse_pasted(pasted)
    assert (answer["state"], answer["code"]) == ("S", "4/0A-c")


@pytest.mark.parametrize("pasted", ["", "\n", "http://127.0.0.1:4711/", "4/0A-just-the-code"])
def test_not_the_address_the_browser_ended_on(pasted: str) -> None:
    with pytest.raises(ConfigError, match="nothing stored"):
        parse_pasted(pasted)


def _jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.signature"


def test_the_address_in_the_openid_token() -> None:
    assert (
        _address_in_id_token(_jwt({"email": "alice@gmail.com", "email_verified": True})) == "alice@gmail.com"
    )
    with pytest.raises(ConfigError, match="has not verified"):
        _address_in_id_token(_jwt({"email": "alice@gmail.com", "email_verified": False}))
    for token in (None, "", "not-a-jwt", _jwt({"sub": "123"}), "a.!!!.c"):
        with pytest.raises(ConfigError, match="did not say which address consented"):
            _address_in_id_token(token)


def test_the_loopback_receiver_takes_the_redirect_and_ignores_the_rest() -> None:
    import urllib.request

    receiver = LoopbackReceiver().start()
    try:
        assert receiver.redirect_uri.startswith("http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(receiver.redirect_uri + "favicon.ico", timeout=10)
        with urllib.request.urlopen(receiver.redirect_uri + "?state=S&code=C", timeout=10) as page:
            assert b"close this tab" in page.read()
        assert receiver.wait(10) == {"state": "S", "code": "C"}
        with pytest.raises(ConfigError, match="no answer from the browser within 0 seconds"):
            receiver.wait(0.01)
    finally:
        receiver.close()


def test_a_silent_connection_does_not_keep_the_redirect_out() -> None:
    import socket
    import urllib.request

    receiver = LoopbackReceiver(idle_timeout=0.2).start()
    try:
        port = int(receiver.redirect_uri.rsplit(":", 1)[1].strip("/"))
        silent = socket.create_connection(("127.0.0.1", port))  # connects, says nothing
        try:
            with urllib.request.urlopen(receiver.redirect_uri + "?state=S&code=C", timeout=30) as page:
                assert page.status == 200
        finally:
            silent.close()
        assert receiver.wait(30) == {"state": "S", "code": "C"}
    finally:
        receiver.close()


def test_a_browser_is_at_hand_in_a_desktop_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not browser_at_hand()
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert browser_at_hand()
    monkeypatch.delenv("WAYLAND_DISPLAY")
    monkeypatch.setenv("DISPLAY", ":0")
    assert browser_at_hand()
    monkeypatch.delenv("DISPLAY")
    monkeypatch.setattr("sys.platform", "darwin")
    assert browser_at_hand()
