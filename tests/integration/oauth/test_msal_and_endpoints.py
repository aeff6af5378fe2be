"""The token providers themselves: msal pointed at the tests' HTTPS token server (OpenID discovery, client
secret, certificate with and without thumbprint) and the generic endpoint's grant variants."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from connector.errors import OAuthRefusedError, OAuthUnavailableError
from connector.oauth import (
    EntraCredentials,
    EntraFetcher,
    TokenEndpointCredentials,
    TokenEndpointFetcher,
)
from tests.integration.oauth.conftest import App, OAuthSync, TokenPeer
from tests.servers.token_server import TENANT

pytestmark = pytest.mark.integration

Register = Callable[[str], App]


def make_certificate(directory: Path) -> tuple[Path, bytes, str]:
    """(PEM file with key and certificate, the certificate PEM, its SHA-1 thumbprint), made with the
    openssl commands docs/exchange-online.md gives administrators."""
    key, cer = directory / "app.key", directory / "app.cer"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", "2", "-nodes",
         "-subj", "/CN=POP Connector", "-keyout", str(key), "-out", str(cer)],
        check=True, capture_output=True,
    )  # fmt: skip
    certificate_pem = cer.read_bytes()
    path = directory / "app.pem"
    path.write_bytes(key.read_bytes() + certificate_pem)
    thumbprint = x509.load_pem_x509_certificate(certificate_pem).fingerprint(hashes.SHA1())
    return path, certificate_pem, thumbprint.hex()


def entra(peer: TokenPeer, client_id: str, **extra: object) -> EntraCredentials:
    return EntraCredentials(
        tenant_id=TENANT,
        client_id=client_id,
        authority_host=peer.server.authority_host,
        ca_file=peer.ca_file,
        **extra,
    )  # type: ignore[arg-type]


def test_msal_with_a_client_secret(token_peer: TokenPeer, register_app: Register) -> None:
    app = register_app("box")
    discoveries = token_peer.server.recorded.discoveries
    token, lifetime = EntraFetcher(entra(token_peer, app.client_id, client_secret=app.secret))()
    assert token in {t.value for t in token_peer.server.issued()}
    assert lifetime == token_peer.server.lifetime
    assert token_peer.server.recorded.discoveries == discoveries + 1
    request = token_peer.server.recorded.token_requests[-1]
    assert request["grant_type"] == "client_credentials"
    assert request["scope"] == "https://outlook.office365.com/.default"


@pytest.mark.parametrize("with_thumbprint", [False, True], ids=["sha256-from-certificate", "sha1-thumbprint"])
def test_msal_with_a_certificate(token_peer: TokenPeer, tmp_path: Path, with_thumbprint: bool) -> None:
    path, certificate_pem, thumbprint = make_certificate(tmp_path)
    token_peer.server.add_client("cert-app", certificate_pem=certificate_pem)
    extra = {"certificate_thumbprint": thumbprint} if with_thumbprint else {}
    fetch = EntraFetcher(entra(token_peer, "cert-app", certificate_file=path, **extra))
    token, _lifetime = fetch()
    assert token.startswith("at-")
    assert "client_assertion" in token_peer.server.recorded.token_requests[-1]
    assert "client_secret" not in token_peer.server.recorded.token_requests[-1]


def test_msal_wrong_secret_is_refused(token_peer: TokenPeer, register_app: Register) -> None:
    app = register_app("box")
    with pytest.raises(OAuthRefusedError, match="invalid_client") as caught:
        EntraFetcher(entra(token_peer, app.client_id, client_secret="wrong-secret"))()
    assert "wrong-secret" not in str(caught.value)


def test_msal_untrusted_authority_certificate(token_peer: TokenPeer, register_app: Register) -> None:
    app = register_app("box")
    credentials = EntraCredentials(
        tenant_id=TENANT,
        client_id=app.client_id,
        client_secret=app.secret,
        authority_host=token_peer.server.authority_host,
    )
    with pytest.raises(OAuthUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        EntraFetcher(credentials)()


def test_delivery_with_an_msal_token(oauth_sync: OAuthSync) -> None:
    app = oauth_sync.register(oauth_sync.users.destination.name)
    oauth = {
        "tenant_id": TENANT,
        "client_id": app.client_id,
        "client_secret": app.secret,
        "authority_host": oauth_sync.token_server.authority_host,
        "ca_file": str(oauth_sync.peer.ca_file),
    }
    oauth_sync.seed(1)
    result = oauth_sync.poll(oauth_sync.config(destination={"auth": "oauth2", "oauth": oauth}))
    assert (result.status, result.delivered) == ("ok", 1), result.problems
    assert app.requests(oauth_sync.token_server) == 1


# --- the generic token endpoint -----------------------------------------------------------------------


def test_client_secret_in_basic_authorization(token_peer: TokenPeer, register_app: Register) -> None:
    app = register_app("box")
    credentials = TokenEndpointCredentials(
        token_peer.server.token_url, app.client_id, app.secret, scope="mail", client_auth="basic"
    )
    token, _lifetime = TokenEndpointFetcher(credentials)()
    assert token.startswith("at-")
    request = token_peer.server.recorded.token_requests[-1]
    assert "client_secret" not in request and request["scope"] == "mail"


def test_token_endpoint_over_https_with_a_private_ca(token_peer: TokenPeer, register_app: Register) -> None:
    app = register_app("box")
    credentials = TokenEndpointCredentials(
        token_peer.server.https_token_url, app.client_id, app.secret, ca_file=token_peer.ca_file
    )
    assert TokenEndpointFetcher(credentials)()[0].startswith("at-")
    untrusted = TokenEndpointCredentials(token_peer.server.https_token_url, app.client_id, app.secret)
    with pytest.raises(OAuthUnavailableError, match="certificate"):
        TokenEndpointFetcher(untrusted)()


def test_refresh_token_grant(token_peer: TokenPeer, register_app: Register) -> None:
    app = register_app("box")
    refresh_token = token_peer.server.issue_refresh_token(app.client_id)
    credentials = TokenEndpointCredentials(
        token_peer.server.token_url, app.client_id, app.secret, refresh_token=refresh_token
    )
    TokenEndpointFetcher(credentials)()
    request = token_peer.server.recorded.token_requests[-1]
    assert (request["grant_type"], request["refresh_token"]) == ("refresh_token", refresh_token)
    bad = TokenEndpointCredentials(
        token_peer.server.token_url, app.client_id, app.secret, refresh_token="rt-x"
    )
    with pytest.raises(OAuthRefusedError, match="invalid_grant") as caught:
        TokenEndpointFetcher(bad)()
    assert "rt-x" not in str(caught.value)


def test_wrong_secret_is_refused_without_echoing_it(token_peer: TokenPeer, register_app: Register) -> None:
    app = register_app("box")
    credentials = TokenEndpointCredentials(token_peer.server.token_url, app.client_id, "not-the-secret")
    with pytest.raises(OAuthRefusedError, match="HTTP 401, invalid_client") as caught:
        TokenEndpointFetcher(credentials)()
    assert "not-the-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, {"error": "server_error"}), (429, {"error": "slow_down"}), (200, {"token_type": "Bearer"})],
)
def test_endpoint_failures_are_temporary(
    token_peer: TokenPeer, register_app: Register, status: int, body: dict[str, object]
) -> None:
    app = register_app("box")
    token_peer.server.fail_token_requests(status, body)
    credentials = TokenEndpointCredentials(token_peer.server.token_url, app.client_id, app.secret)
    with pytest.raises(OAuthUnavailableError):
        TokenEndpointFetcher(credentials)()


def test_nothing_listening(register_app: Register) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    credentials = TokenEndpointCredentials(f"http://127.0.0.1:{port}/token", "c", "s", timeout=5)
    with pytest.raises(OAuthUnavailableError, match="cannot connect"):
        TokenEndpointFetcher(credentials)()


def test_redirects_are_not_followed(token_peer: TokenPeer, register_app: Register) -> None:
    app = register_app("box")
    before = token_peer.server.token_request_count
    token_peer.server.redirect_to = f"{token_peer.server.token_url}?again=1"
    try:
        credentials = TokenEndpointCredentials(
            token_peer.server.token_url, app.client_id, app.secret, client_auth="basic"
        )
        with pytest.raises(OAuthUnavailableError, match="HTTP 307"):
            TokenEndpointFetcher(credentials)()
    finally:
        token_peer.server.redirect_to = None
    assert token_peer.server.token_request_count == before + 1
