"""An OAuth 2.0 authorization server for tests: a real HTTP(S) listener on 127.0.0.1 in a thread.

It issues short-lived bearer tokens to registered clients (client credentials with a secret, in the body or
HTTP Basic; a certificate-signed client assertion as msal sends it; a refresh token), answers RFC 7662
token introspection for Dovecot's ``oauth2`` passdb, and serves an OpenID discovery document so that msal
can be pointed at it. Tests count requests, expire and revoke tokens, and grant mailboxes.

Introspection models Exchange Online's app-only access: a token carries no user; the client is granted a
mailbox (``Add-MailboxPermission`` in Exchange) and introspection names it, so Dovecot accepts the token
for that mailbox only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
TENANT = "test-tenant"
TOKEN_PATH = f"/{TENANT}/oauth2/v2.0/token"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Client:
    """A registered application, granted one ``mailbox`` (introspection names it)."""

    client_id: str
    secret: str | None = None
    certificate_pem: bytes | None = None
    mailbox: str | None = None


@dataclass
class Token:
    value: str
    client_id: str
    scope: str
    expires_at: float
    revoked: bool = False

    def active(self, now: float) -> bool:
        return not self.revoked and now < self.expires_at


@dataclass
class Recorded:
    """What the server was asked: the form of each token request, each introspection."""

    token_requests: list[dict[str, str]] = field(default_factory=list)
    introspections: list[dict[str, str]] = field(default_factory=list)
    discoveries: int = 0


class TokenServer:
    """``with TokenServer() as server:``; ``server.add_client("app", secret="s")``; tokens last ``lifetime``
    seconds. It listens on plain HTTP (``base_url``: the generic provider, Dovecot's introspection) and,
    with ``tls_context``, on HTTPS too (``https_base_url``: msal only talks to https authorities); both
    share the same clients and tokens."""

    def __init__(self, *, lifetime: int = 3600, tls_context: ssl.SSLContext | None = None) -> None:
        self.lifetime = lifetime
        self.tls_context = tls_context
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, Token] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.recorded = Recorded()
        self.fail_next: list[tuple[int, dict[str, Any]]] = []
        # When set, token requests are answered "307 Temporary Redirect" to this URL.
        self.redirect_to: str | None = None
        self._lock = threading.Lock()
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    # --- set-up -----------------------------------------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: bytes | None = None,
        mailbox: str | None = None,
    ) -> Client:
        client = Client(client_id, secret, certificate_pem, mailbox)
        with self._lock:
            self.clients[client_id] = client
        return client

    def issue_refresh_token(self, client_id: str) -> str:
        value = f"rt-{secrets.token_urlsafe(16)}"
        with self._lock:
            self.refresh_tokens[value] = client_id
        return value

    # --- controls -----------------------------------------------------------------------------------------

    @property
    def token_request_count(self) -> int:
        return len(self.recorded.token_requests)

    def issued(self) -> list[Token]:
        with self._lock:
            return list(self.tokens.values())

    def expire_all(self) -> None:
        """Every token issued so far stops being valid, as if its lifetime had run out."""
        with self._lock:
            for token in self.tokens.values():
                token.expires_at = 0.0

    def revoke_client(self, client_id: str) -> None:
        """Revoke the client's tokens and refuse it new ones (the app registration was deleted)."""
        with self._lock:
            for token in self.tokens.values():
                if token.client_id == client_id:
                    token.revoked = True
            self.clients.pop(client_id, None)

    def fail_token_requests(self, status: int, body: dict[str, Any], *, times: int = 1) -> None:
        """Answer the next ``times`` token requests with this status and JSON body."""
        with self._lock:
            self.fail_next.extend([(status, body)] * times)

    # --- addresses ----------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._servers, "server not started"
        return f"http://{HOST}:{self._servers[0][0].server_address[1]}"

    @property
    def https_base_url(self) -> str:
        assert len(self._servers) == 2, "server not started with a tls_context"
        return f"https://{HOST}:{self._servers[1][0].server_address[1]}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}{TOKEN_PATH}"

    @property
    def https_token_url(self) -> str:
        return f"{self.https_base_url}{TOKEN_PATH}"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    @property
    def authority_host(self) -> str:
        """What msal calls the authority host; the authority is ``{authority_host}/{tenant}``."""
        return self.https_base_url

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> TokenServer:
        handler = type("Handler", (_Handler,), {"token_server": self})
        for context in (None, self.tls_context) if self.tls_context else (None,):
            httpd = ThreadingHTTPServer((HOST, 0), handler)
            httpd.daemon_threads = True
            if context is not None:
                httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
            thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append((httpd, thread))
        return self

    def stop(self) -> None:
        for httpd, thread in self._servers:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
        self._servers.clear()

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- behaviour ------------------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        base = f"{self.https_base_url}/{TENANT}"
        return {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": self.https_token_url,
            "jwks_uri": f"{base}/discovery/v2.0/keys",
        }

    def token_response(self, form: dict[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.recorded.token_requests.append(form)
            if self.fail_next:
                return self.fail_next.pop(0)
        client_id, error = self._authenticate_client(form, authorization)
        if error is not None:
            return 401, {"error": "invalid_client", "error_description": error}
        grant = form.get("grant_type")
        if grant == "refresh_token":
            with self._lock:
                owner = self.refresh_tokens.get(form.get("refresh_token", ""))
            if owner != client_id:
                return 400, {"error": "invalid_grant", "error_description": "refresh token not valid"}
        elif grant != "client_credentials":
            return 400, {"error": "unsupported_grant_type", "error_description": f"grant {grant!r}"}
        token = Token(
            value=f"at-{secrets.token_urlsafe(24)}",
            client_id=client_id,
            scope=form.get("scope", ""),
            expires_at=time.time() + self.lifetime,
        )
        with self._lock:
            self.tokens[token.value] = token
        return 200, {"access_token": token.value, "token_type": "Bearer", "expires_in": self.lifetime}

    def _authenticate_client(self, form: dict[str, str], authorization: str | None) -> tuple[str, str | None]:
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        if authorization and authorization.startswith("Basic "):
            decoded = base64.b64decode(authorization[6:]).decode()
            client_id, _, secret = decoded.partition(":")
        with self._lock:
            client = self.clients.get(client_id)
        if client is None:
            return client_id, f"unknown client {client_id!r}"
        if form.get("client_assertion_type") == CLIENT_ASSERTION_TYPE:
            return client_id, self._check_assertion(client, form.get("client_assertion", ""))
        if client.secret is None or secret != client.secret:
            return client_id, "invalid client secret"
        return client_id, None

    def _check_assertion(self, client: Client, assertion: str) -> str | None:
        """Verify the JWT msal signs with the app's certificate key (RFC 7523)."""
        import jwt
        from cryptography import x509

        if client.certificate_pem is None:
            return "no certificate registered"
        public_key = x509.load_pem_x509_certificate(client.certificate_pem).public_key()
        try:
            claims = jwt.decode(
                assertion,
                public_key,  # type: ignore[arg-type]
                algorithms=["PS256", "RS256"],
                audience=[self.https_token_url, self.token_url],
                issuer=client.client_id,
            )
        except jwt.PyJWTError as exc:
            return f"client assertion rejected: {exc}"
        return None if claims.get("sub") == client.client_id else "assertion subject is not the client"

    def introspect(self, form: dict[str, str]) -> dict[str, Any]:
        """RFC 7662. Dovecot checks ``username`` against the login name; it cannot say which mailbox the
        login is for, so the answer names the one mailbox the token's client was granted."""
        with self._lock:
            self.recorded.introspections.append(form)
            token = self.tokens.get(form.get("token", ""))
            client = self.clients.get(token.client_id) if token else None
        if token is None or client is None or not token.active(time.time()):
            return {"active": "false"}
        answer = {"active": "true", "client_id": token.client_id, "scope": token.scope}
        if client.mailbox is not None:
            answer["username"] = client.mailbox
        # Dovecot compares active_value as a string, so "true" rather than JSON true.
        return answer


class _Handler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tokens travel in request bodies only, but keep test output quiet

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        return {key: values[0] for key, values in parse_qs(body, keep_blank_values=True).items()}

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if urlsplit(self.path).path.endswith("/.well-known/openid-configuration"):
            self.token_server.recorded.discoveries += 1
            self._reply(200, self.token_server.discovery())
        else:
            self._reply(404, {"error": "not_found"})

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        form = self._form()
        if parts.path == TOKEN_PATH and self.token_server.redirect_to:
            self.token_server.recorded.token_requests.append(form)
            self.send_response(307)
            self.send_header("Location", self.token_server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == TOKEN_PATH:
            status, payload = self.token_server.token_response(form, self.headers.get("Authorization"))
            self._reply(status, payload)
        elif parts.path == "/introspect":
            self._reply(200, self.token_server.introspect(form))
        else:
            self._reply(404, {"error": "not_found"})


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[TokenServer]:
    with TokenServer(**kwargs) as server:
        yield server
