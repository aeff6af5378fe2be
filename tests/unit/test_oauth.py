"""Token caching, the retry-once rule, XOAUTH2 strings and the OAuth configuration: pure logic."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import pytest

from connector.config import parse_config
from connector.errors import ConfigError, OAuthRefusedError
from connector.oauth import (
    CachingTokenProvider,
    EntraCredentials,
    TokenEndpointCredentials,
    TokenProviders,
    describe_sasl_error,
    login_with_token,
    xoauth2_response,
)
from connector.oauth_endpoints import EXCHANGE_ONLINE_SCOPE, check_token_url


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingFetch:
    def __init__(self, lifetime: float = 3600) -> None:
        self.calls = 0
        self.lifetime = lifetime

    def __call__(self) -> tuple[str, float]:
        self.calls += 1
        return f"token-{self.calls}", self.lifetime


def make_provider(
    lifetime: float = 3600, margin: float = 300
) -> tuple[CachingTokenProvider, CountingFetch, FakeClock]:
    fetch, clock = CountingFetch(lifetime), FakeClock()
    return CachingTokenProvider(fetch, description="test", margin=margin, clock=clock), fetch, clock


def test_token_is_cached_until_the_margin_before_expiry() -> None:
    provider, fetch, clock = make_provider(lifetime=3600, margin=300)
    assert provider.get_token() == "token-1"
    clock.now += 3299
    assert provider.cached
    assert provider.get_token() == "token-1"
    clock.now += 1
    assert not provider.cached
    assert provider.get_token() == "token-2"
    assert fetch.calls == 2


def test_short_lived_token_is_refreshed_at_half_its_life() -> None:
    provider, _fetch, clock = make_provider(lifetime=60, margin=300)
    provider.get_token()
    clock.now += 29
    assert provider.get_token() == "token-1"
    clock.now += 1
    assert provider.get_token() == "token-2"


def test_invalidate_drops_only_the_refused_token() -> None:
    provider, _fetch, _clock = make_provider()
    first = provider.get_token()
    provider.invalidate("some-older-token")
    assert provider.get_token() == first
    provider.invalidate(first)
    assert provider.get_token() == "token-2"
    provider.invalidate()
    assert provider.get_token() == "token-3"


def test_concurrent_callers_share_one_fetch() -> None:
    gate = threading.Event()
    calls = []

    def slow_fetch() -> tuple[str, float]:
        calls.append(1)
        gate.wait(5)
        return "shared", 3600.0

    provider = CachingTokenProvider(slow_fetch, description="test")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(provider.get_token())) for _ in range(8)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(5)
    assert results == ["shared"] * 8
    assert len(calls) == 1


def test_repr_never_shows_the_token() -> None:
    provider, _fetch, _clock = make_provider()
    token = provider.get_token()
    assert token not in repr(provider)
    credentials = EntraCredentials(tenant_id="t", client_id="c", client_secret="very-secret")
    assert "very-secret" not in repr(credentials)
    endpoint = TokenEndpointCredentials("https://id.example/token", "c", "s3cr3t", refresh_token="rt-x")
    assert "s3cr3t" not in repr(endpoint) and "rt-x" not in repr(endpoint)


class Refused(Exception):
    pass


def test_refused_cached_token_is_replaced_once() -> None:
    provider, _fetch, _clock = make_provider()
    provider.get_token()  # now cached
    seen: list[str] = []

    def login(token: str) -> str:
        seen.append(token)
        if token == "token-1":
            raise Refused
        return "in"

    assert login_with_token(provider, login, Refused) == "in"
    assert seen == ["token-1", "token-2"]


def test_refused_fresh_token_is_not_retried() -> None:
    provider, _fetch, _clock = make_provider()
    seen: list[str] = []

    def login(token: str) -> None:
        seen.append(token)
        raise Refused

    with pytest.raises(Refused):
        login_with_token(provider, login, Refused)
    assert seen == ["token-1"]
    assert not provider.cached  # the refused token is forgotten


def test_second_refusal_is_raised() -> None:
    provider, _fetch, _clock = make_provider()
    provider.get_token()

    def login(token: str) -> None:
        raise Refused(token)

    with pytest.raises(Refused, match="token-2"):
        login_with_token(provider, login, Refused)


def test_registry_shares_a_provider_per_credentials() -> None:
    providers = TokenProviders()
    one = TokenEndpointCredentials("https://id.example/token", "app", "secret")
    same = TokenEndpointCredentials("https://id.example/token", "app", "secret")
    other = TokenEndpointCredentials("https://id.example/token", "app", "other-secret")
    assert providers.get(one) is providers.get(same)
    assert providers.get(one) is not providers.get(other)


def test_xoauth2_response() -> None:
    assert xoauth2_response("box@example.org", "tok") == b"user=box@example.org\x01auth=Bearer tok\x01\x01"
    with pytest.raises(ValueError):
        xoauth2_response("a\x01b", "tok")


def test_describe_sasl_error() -> None:
    challenge = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"https://mail.example/"}')
    assert describe_sasl_error(challenge) == "status 401, schemes bearer, scope https://mail.example/"
    assert describe_sasl_error(b"not base64!") == "not base64!"
    assert describe_sasl_error(base64.b64encode(b"plain words")) == "plain words"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://login.example/token", True),
        ("http://127.0.0.1:8080/token", True),
        ("http://[::1]/token", True),
        ("http://localhost/token", True),
        ("http://id.example/token", False),
        ("ftp://id.example/token", False),
        ("https:///token", False),
    ],
)
def test_token_url_must_be_https_unless_loopback(url: str, ok: bool) -> None:
    if ok:
        assert check_token_url(url) == url
    else:
        with pytest.raises(ValueError, match="https"):
            check_token_url(url)


# --- configuration --------------------------------------------------------------------------------


def config(
    destination: dict[str, Any] | None = None, account: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "destinations": [
            {"name": "exo", "type": "imap", "host": "outlook.office365.com", **(destination or {})},
        ],
        "accounts": [
            {
                "name": "alice",
                "host": "pop.example",
                "username": "alice@hosted.example",
                "destination": "exo",
                "destination_username": "alice@corp.example",
                **(account or {}),
            }
        ],
    }


ENTRA = {"tenant_id": "contoso.onmicrosoft.com", "client_id": "app-id", "client_secret": "s"}
OAUTH_DESTINATION = {"auth": "oauth2", "oauth": ENTRA}


def parse(data: dict[str, Any]) -> Any:
    return parse_config(data, Path("/etc/pop-connector/config.toml"))


def test_exchange_online_destination() -> None:
    parsed = parse(config(OAUTH_DESTINATION, {"password": "pop-pw"}))
    destination = parsed.destinations[0]
    assert destination.auth == "oauth2"
    credentials = destination.oauth.credentials()
    assert isinstance(credentials, EntraCredentials)
    assert credentials.scope == EXCHANGE_ONLINE_SCOPE
    assert credentials.authority_host == "https://login.microsoftonline.com"


def test_pop3_source_with_a_token_endpoint() -> None:
    oauth = {"token_url": "https://id.example/token", "client_id": "c", "client_secret": "s", "scope": "pop"}
    data = config({"username": "archive", "password": "pw"}, {"auth": "oauth2", "oauth": oauth})
    del data["accounts"][0]["destination_username"]
    account = parse(data).accounts[0]
    assert account.password is None
    assert not account.auth_initial_response
    credentials = account.oauth.credentials()
    assert isinstance(credentials, TokenEndpointCredentials)
    assert credentials.scope == "pop"


@pytest.mark.parametrize(
    ("destination", "account", "expected"),
    [
        ({"auth": "oauth2"}, {"password": "x"}, 'destinations[0]: auth = "oauth2" needs an oauth table'),
        (
            {"auth": "oauth2", "oauth": {"client_id": "c", "client_secret": "s"}},
            {"password": "x"},
            "destinations[0].oauth: set either tenant_id",
        ),
        (
            {"auth": "oauth2", "oauth": {"tenant_id": "t", "client_id": "c"}},
            {"password": "x"},
            "needs either client_secret or certificate_file",
        ),
        (
            {
                "auth": "oauth2",
                "oauth": {"token_url": "http://id.example/t", "client_id": "c", "client_secret": "s"},
            },
            {"password": "x"},
            "destinations[0].oauth.token_url: must be an https:// URL",
        ),
        (
            {"oauth": ENTRA, "username": "u", "password": "p"},
            {"password": "x"},
            'oauth is only used with auth = "oauth2"',
        ),
        (
            {**OAUTH_DESTINATION, "password": "p"},
            {"password": "x"},
            'password is not used with auth = "oauth2"',
        ),
        (
            OAUTH_DESTINATION,
            {"password": "x", "destination_password": "y"},
            "accounts[0].destination_password: destination 'exo' logs in with OAuth",
        ),
        (OAUTH_DESTINATION, {}, "accounts[0]: password: required field is missing"),
        (OAUTH_DESTINATION, {"auth": "oauth2", "password": "x", "oauth": ENTRA}, "password is not used"),
    ],
)
def test_oauth_config_errors(destination: dict[str, Any], account: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(config(destination, account))
    assert expected in str(caught.value)


def test_missing_certificate_file_is_reported_by_the_provider(tmp_path: Path) -> None:
    from connector.oauth import EntraFetcher

    credentials = EntraCredentials(tenant_id="t", client_id="c", certificate_file=tmp_path / "missing.pem")
    with pytest.raises(OAuthRefusedError, match="cannot read certificate_file"):
        EntraFetcher(credentials)._client_credential()
