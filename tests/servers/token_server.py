"""An OAuth 2.0 authorization server for tests: a real HTTP(S) listener on 127.0.0.1 in a thread.

It issues short-lived bearer tokens to registered clients (client credentials with a secret, in the body or
HTTP Basic; a certificate-signed client assertion as msal sends it; a refresh token), answers RFC 7662
token introspection for Dovecot's ``oauth2`` passdb, and serves an OpenID discovery document so that msal
can be pointed at it. Tests count requests, expire and revoke tokens, and grant mailboxes.

Introspection models Exchange Online's app-only access: a token carries no user, so Dovecot passes the
login name in the introspection URL (``?user=%u``) and the server answers ``active`` only when the token's
client was granted that mailbox (``Add-MailboxPermission`` in Exchange).
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
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Client:
    """A registered application. ``mailboxes`` None means it may open any mailbox."""

    client_id: str
    secret: str | None = None
    certificate_pem: bytes | None = None
    mailboxes: set[str] | None = None


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
    seconds. With ``tls_context`` it speaks HTTPS (msal only talks to https authorities)."""

    def __init__(self, *, lifetime: int = 3600, tls_context: ssl.SSLContext | None = None) -> None:
        self.lifetime = lifetime
        self.tls_context = tls_context
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, Token] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.recorded = Recorded()
        self.fail_next: list[tuple[int, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- set-up -----------------------------------------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: bytes | None = None,
        mailboxes: set[str] | None = None,
    ) -> Client:
        client = Client(client_id, secret, certificate_pem, mailboxes)
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
        assert self._httpd is not None, "server not started"
        scheme = "https" if self.tls_context else "http"
        return f"{scheme}://{HOST}:{self._httpd.server_address[1]}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/{TENANT}/oauth2/v2.0/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    @property
    def authority_host(self) -> str:
        """What msal calls the authority host; the authority is ``{authority_host}/{tenant}``."""
        return self.base_url

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> TokenServer:
        handler = type("Handler", (_Handler,), {"token_server": self})
        httpd = ThreadingHTTPServer((HOST, 0), handler)
        httpd.daemon_threads = True
        if self.tls_context is not None:
            httpd.socket = self.tls_context.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- behaviour ------------------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        base = f"{self.base_url}/{TENANT}"
        return {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": self.token_url,
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

    def _authenticate_client(
        self, form: dict[str, str], authorization: str | None
    ) -> tuple[str, str | None]:
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
                audience=self.token_url,
                issuer=client.client_id,
            )
        except jwt.PyJWTError as exc:
            return f"client assertion rejected: {exc}"
        return None if claims.get("sub") == client.client_id else "assertion subject is not the client"

    def introspect(self, form: dict[str, str], query: dict[str, str]) -> dict[str, Any]:
        user = query.get("user", "")
        with self._lock:
            self.recorded.introspections.append({**form, **query})
            token = self.tokens.get(form.get("token", ""))
            client = self.clients.get(token.client_id) if token else None
        if token is None or client is None or not token.active(time.time()):
            return {"active": "false"}
        if user:
            if client.mailboxes is not None and user not in client.mailboxes:
                return {"active": "false"}
        elif client.mailboxes is not None and len(client.mailboxes) == 1:
            # Dovecot does not say which mailbox the login is for: a client granted one mailbox names it.
            user = next(iter(client.mailboxes))
        # Dovecot compares active_value as a string, so "true" rather than JSON true.
        return {"active": "true", "username": user, "client_id": token.client_id, "scope": token.scope}


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
        parts = urlsplit(self.path)
        if parts.path.endswith("/.well-known/openid-configuration"):
            self.token_server.recorded.discoveries += 1
            self._reply(200, self.token_server.discovery())
        elif parts.path == "/tokeninfo":
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            form = {"token": query.pop("access_token", "")}
            self._reply(200, self.token_server.introspect(form, query))
        elif parts.path == "/introspect":
            # Dovecot's introspection_mode = auth: the token comes as a bearer Authorization header.
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            authorization = self.headers.get("Authorization") or ""
            form = {"token": authorization.removeprefix("Bearer ").strip()}
            self._reply(200, self.token_server.introspect(form, query))
        else:
            self._reply(404, {"error": "not_found"})

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        form = self._form()
        if parts.path == urlsplit(self.token_server.token_url).path:
            status, payload = self.token_server.token_response(form, self.headers.get("Authorization"))
            self._reply(status, payload)
        elif parts.path == "/introspect":
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            self._reply(200, self.token_server.introspect(form, query))
        else:
            self._reply(404, {"error": "not_found"})


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[TokenServer]:
    with TokenServer(**kwargs) as server:
        yield server
