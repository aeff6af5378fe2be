"""An OAuth 2.0 authorization server for tests: a real HTTP(S) listener on 127.0.0.1 in a thread.

It issues short-lived bearer tokens to registered clients (client credentials with a secret, in the body or
HTTP Basic; a certificate-signed client assertion as msal sends it; a refresh token), answers RFC 7662
token introspection for Dovecot's ``oauth2`` passdb, and serves an OpenID discovery document so that msal
can be pointed at it. Tests count requests, expire and revoke tokens, and grant mailboxes.

It also plays Google's authorization server (``oauth2.googleapis.com`` and ``accounts.google.com``) for
the Gmail destination, whose tokens tests/servers/gmail.py checks:

* the JWT-bearer grant (RFC 7523) of a service account with domain-wide delegation: ``add_service_account``
  registers one (its key file as Google hands it out, ``ServiceAccount.key``), the delegation says which
  scopes it may ask for and which users it may act as (``sub``);
* the authorization-code grant with PKCE of a "Desktop app" client (``add_desktop_client``,
  ``client_secrets``): ``/o/oauth2/auth`` consents at once for the user signed in to the "browser"
  (``sign_in``, or the ``login_hint``) by a 302 to the loopback ``redirect_uri``; the test follows that
  redirect itself. The code (checked against the S256 challenge) buys an access token and a refresh token;
  refresh tokens can rotate and be revoked (``invalid_grant``, as Google answers a withdrawn consent).

Tokens issued for a user carry it (``Token.user``): the Gmail server reads it to resolve ``me``.

Introspection models Exchange Online's app-only access: a token carries no user; the client is granted a
mailbox (``Add-MailboxPermission`` in Exchange) and introspection names it, so Dovecot accepts the token
for that mailbox only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

HOST = "127.0.0.1"
TENANT = "test-tenant"
TOKEN_PATH = f"/{TENANT}/oauth2/v2.0/token"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Google's endpoints, at the same paths as on oauth2.googleapis.com and accounts.google.com.
GOOGLE_TOKEN_PATH = "/token"
GOOGLE_AUTH_PATHS = ("/o/oauth2/auth", "/o/oauth2/v2/auth")
GOOGLE_REVOKE_PATH = "/revoke"
GOOGLE_USERINFO_PATH = "/oauth2/v3/userinfo"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The audiences Google's token endpoint accepts in an assertion besides its own URL: google-auth always
# signs for the first, whatever the key file's token_uri says.
GOOGLE_AUDIENCES = (
    "https://oauth2.googleapis.com/token",
    "https://www.googleapis.com/oauth2/v4/token",
    "https://accounts.google.com/o/oauth2/token",
)
# Google's access tokens live an hour; a grant assertion may span at most that.
GOOGLE_MAX_ASSERTION_LIFETIME = 3600
CODE_LIFETIME = 600
REVOKED = "Token has been expired or revoked."


@dataclass
class Client:
    """A registered application, granted one ``mailbox`` (introspection names it). ``desktop``: an OAuth
    client of type "Desktop app" (the authorization-code flow with a loopback redirect)."""

    client_id: str
    secret: str | None = None
    certificate_pem: bytes | None = None
    mailbox: str | None = None
    desktop: bool = False


@dataclass
class Token:
    """An access token. ``user``: whom it acts for (the delegated ``sub``, or who consented); None for an
    app-only token."""

    value: str
    client_id: str
    scope: str
    expires_at: float
    revoked: bool = False
    user: str | None = None

    def active(self, now: float) -> bool:
        return not self.revoked and now < self.expires_at

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split())


@dataclass
class RefreshGrant:
    """What a refresh token stands for. ``user``/``scope``: the consent it came from (None: app-only)."""

    client_id: str
    user: str | None = None
    scope: str = ""
    revoked: bool = False


@dataclass
class ServiceAccount:
    """A Google service account with domain-wide delegation. ``key`` is its JSON key file as Google's
    console hands it out (private key included); the server keeps the public half to check assertions.
    ``scopes``: what the Admin console delegated; ``users``: who it may act as (None: anyone)."""

    client_email: str
    client_id: str
    private_key_id: str
    public_key_pem: bytes
    key: dict[str, str]
    scopes: frozenset[str]
    users: frozenset[str] | None

    def write_key(self, path: Path) -> Path:
        path.write_text(json.dumps(self.key, indent=2))
        path.chmod(0o600)
        return path


@dataclass
class AuthorizationCode:
    client_id: str
    redirect_uri: str
    user: str
    scope: str
    challenge: str | None
    challenge_method: str
    expires_at: float
    offline: bool
    used: bool = False


@dataclass
class Browser:
    """Who is signed in to the "browser" the consent page opens in, and what they do there: ``grant``
    (None: every scope asked for; else the boxes left ticked), ``deny`` (press Cancel)."""

    user: str | None = None
    grant: frozenset[str] | None = None
    deny: bool = False


@dataclass
class Recorded:
    """What the server was asked: the form of each token request, each introspection, the query of each
    visit to the consent page."""

    token_requests: list[dict[str, str]] = field(default_factory=list)
    introspections: list[dict[str, str]] = field(default_factory=list)
    discoveries: int = 0
    authorizations: list[dict[str, str]] = field(default_factory=list)


class TokenServer:
    """``with TokenServer() as server:``; ``server.add_client("app", secret="s")``; tokens last ``lifetime``
    seconds. It listens on plain HTTP (``base_url``: the generic provider, Dovecot's introspection) and,
    with ``tls_context``, on HTTPS too (``https_base_url``: msal only talks to https authorities); both
    share the same clients and tokens."""

    def __init__(
        self,
        *,
        lifetime: int = 3600,
        tls_context: ssl.SSLContext | None = None,
        rotate_refresh_tokens: bool = False,
    ) -> None:
        self.lifetime = lifetime
        self.tls_context = tls_context
        # Each refresh answers a new refresh token and retires the old one (Google may do so).
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, Token] = {}
        self.refresh_tokens: dict[str, RefreshGrant] = {}
        self.service_accounts: dict[str, ServiceAccount] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.browser = Browser()
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

    def issue_refresh_token(self, client_id: str, *, user: str | None = None, scope: str = "") -> str:
        value = f"rt-{secrets.token_urlsafe(16)}"
        with self._lock:
            self.refresh_tokens[value] = RefreshGrant(client_id, user, scope)
        return value

    def issue_token(self, user: str | None, scopes: Iterable[str], *, client_id: str = "test") -> str:
        """An access token for ``user`` with ``scopes``, as if some grant had bought it (for tests that
        are about the API, not about signing in)."""
        return self._new_token(client_id, " ".join(scopes), user).value

    def add_service_account(
        self,
        name: str = "connector",
        *,
        scopes: Iterable[str],
        users: Iterable[str] | None = None,
        project_id: str = "pop-connector-test",
    ) -> ServiceAccount:
        """A service account with a fresh RSA key, its client id delegated ``scopes`` for ``users`` (None:
        every user of the domain) as a Workspace admin does in the Admin console. Its key file's
        ``token_uri`` is this server's token endpoint (HTTPS when the server has TLS)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        client_email = f"{name}@{project_id}.iam.gserviceaccount.com"
        client_id = str(10**20 + secrets.randbelow(9 * 10**20))  # Google's are 21 digits
        private_key_id = secrets.token_hex(20)
        key_file = {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": private_key_id,
            "private_key": private_pem,
            "client_email": client_email,
            "client_id": client_id,
            "auth_uri": self.auth_url,
            "token_uri": self.google_token_url,
            "auth_provider_x509_cert_url": f"{self._google_base}/oauth2/v1/certs",
            "client_x509_cert_url": f"{self._google_base}/robot/v1/metadata/x509/{client_email}",
            "universe_domain": "googleapis.com",
        }
        account = ServiceAccount(
            client_email,
            client_id,
            private_key_id,
            public_pem,
            key_file,
            frozenset(scopes),
            None if users is None else frozenset(user.lower() for user in users),
        )
        with self._lock:
            self.service_accounts[client_email] = account
        return account

    def add_desktop_client(self, client_id: str | None = None, secret: str | None = None) -> Client:
        """An OAuth client of type "Desktop app" (Google gives those a secret, which is not secret)."""
        client_id = (
            client_id
            or f"{secrets.randbelow(10**12):012d}-{secrets.token_hex(16)}.apps.googleusercontent.com"
        )
        client = Client(client_id, secret or f"GOCSPX-{secrets.token_urlsafe(21)}", desktop=True)
        with self._lock:
            self.clients[client_id] = client
        return client

    def client_secrets(self, client: Client, *, project_id: str = "pop-connector-test") -> dict[str, Any]:
        """The client_secret JSON Google's console downloads for a Desktop app client."""
        return {
            "installed": {
                "client_id": client.client_id,
                "project_id": project_id,
                "auth_uri": self.auth_url,
                "token_uri": self.google_token_url,
                "auth_provider_x509_cert_url": f"{self._google_base}/oauth2/v1/certs",
                "client_secret": client.secret,
                "redirect_uris": ["http://localhost"],
            }
        }

    def write_client_secrets(self, client: Client, path: Path) -> Path:
        path.write_text(json.dumps(self.client_secrets(client)))
        return path

    def sign_in(self, user: str | None, *, grant: Iterable[str] | None = None, deny: bool = False) -> None:
        """Who the consent page sees signed in, and what they answer (see ``Browser``)."""
        with self._lock:
            self.browser = Browser(user, None if grant is None else frozenset(grant), deny)

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

    def lookup(self, value: str) -> Token | None:
        """The access token with this value (active or not), for resource servers such as the Gmail one."""
        with self._lock:
            return self.tokens.get(value)

    def revoke_refresh_token(self, value: str) -> None:
        """The user withdrew the consent (or it lapsed): the refresh token answers ``invalid_grant``."""
        with self._lock:
            self.refresh_tokens[value].revoked = True

    def revoke_consent(self, user: str, client_id: str | None = None) -> None:
        """The user removed the app's access in their Google account: every refresh and access token of
        theirs (for ``client_id``, or for every client) stops working."""
        with self._lock:
            for grant in self.refresh_tokens.values():
                if grant.user == user and client_id in (None, grant.client_id):
                    grant.revoked = True
            for token in self.tokens.values():
                if token.user == user and client_id in (None, token.client_id):
                    token.revoked = True

    def refresh_tokens_of(self, user: str) -> list[str]:
        """The refresh tokens issued for ``user`` that still work."""
        with self._lock:
            return [
                value
                for value, grant in self.refresh_tokens.items()
                if grant.user == user and not grant.revoked
            ]

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
    def _google_base(self) -> str:
        return self.https_base_url if self.tls_context is not None else self.base_url

    @property
    def google_token_url(self) -> str:
        """Google's token endpoint here (HTTPS when the server has TLS): key files' ``token_uri``."""
        return f"{self._google_base}{GOOGLE_TOKEN_PATH}"

    @property
    def auth_url(self) -> str:
        """Google's consent page here: client_secrets' ``auth_uri``."""
        return f"{self._google_base}{GOOGLE_AUTH_PATHS[0]}"

    @property
    def revoke_url(self) -> str:
        return f"{self._google_base}{GOOGLE_REVOKE_PATH}"

    @property
    def userinfo_url(self) -> str:
        return f"{self._google_base}{GOOGLE_USERINFO_PATH}"

    def _token_urls(self) -> set[str]:
        bases = [self.base_url] + ([self.https_base_url] if self.tls_context is not None else [])
        return {f"{base}{path}" for base in bases for path in (TOKEN_PATH, GOOGLE_TOKEN_PATH)}

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
        grant = form.get("grant_type")
        if grant == JWT_BEARER:
            # The signed assertion is the client's authentication: no client id or secret comes with it.
            return self._jwt_bearer(form.get("assertion", ""))
        client_id, error = self._authenticate_client(form, authorization)
        if error is not None:
            return 401, {"error": "invalid_client", "error_description": error}
        if grant == "authorization_code":
            return self._authorization_code(client_id, form)
        user: str | None = None
        scope = form.get("scope", "")
        answer: dict[str, Any] = {}
        if grant == "refresh_token":
            with self._lock:
                refresh = self.refresh_tokens.get(form.get("refresh_token", ""))
                if refresh is None or refresh.client_id != client_id or refresh.revoked:
                    return 400, {"error": "invalid_grant", "error_description": REVOKED}
                if refresh.user is not None:
                    user, scope = refresh.user, refresh.scope
                    answer["scope"] = scope
                    if self.rotate_refresh_tokens:
                        refresh.revoked = True
                        answer["refresh_token"] = self._new_refresh_token(client_id, user, scope)
        elif grant != "client_credentials":
            return 400, {"error": "unsupported_grant_type", "error_description": f"grant {grant!r}"}
        token = self._new_token(client_id, scope, user)
        return 200, {
            "access_token": token.value,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            **answer,
        }

    def _new_token(self, client_id: str, scope: str, user: str | None) -> Token:
        # Google's access tokens start "ya29."; the prefix lets a test spot one in a log.
        prefix = "ya29." if user is not None else "at-"
        token = Token(
            f"{prefix}{secrets.token_urlsafe(24)}", client_id, scope, time.time() + self.lifetime, user=user
        )
        with self._lock:
            self.tokens[token.value] = token
        return token

    def _new_refresh_token(self, client_id: str, user: str, scope: str) -> str:
        value = f"1//{secrets.token_urlsafe(32)}"  # the shape of Google's refresh tokens
        self.refresh_tokens[value] = RefreshGrant(client_id, user, scope)
        return value

    def _jwt_bearer(self, assertion: str) -> tuple[int, dict[str, Any]]:
        """RFC 7523 as Google's token endpoint does it for a service account: the assertion is signed with
        the account's key (``kid`` = its ``private_key_id``), ``iss`` the account, ``aud`` the token URL,
        ``scope`` the scopes, ``sub`` the user it acts as (domain-wide delegation)."""
        import jwt

        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        with self._lock:
            account = self.service_accounts.get(str(unverified.get("iss", "")))
        if account is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid grant: account not found"}
        if header.get("kid") not in (None, account.private_key_id) or header.get("alg") != "RS256":
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        try:
            claims = jwt.decode(
                assertion,
                account.public_key_pem,
                algorithms=["RS256"],
                audience=sorted(self._token_urls() | set(GOOGLE_AUDIENCES)),
                issuer=account.client_email,
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.InvalidSignatureError:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        except jwt.PyJWTError as exc:
            return 400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"}
        if int(claims["exp"]) - int(claims["iat"]) > GOOGLE_MAX_ASSERTION_LIFETIME:
            description = (
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
            )
            return 400, {"error": "invalid_grant", "error_description": description}
        scopes = str(claims.get("scope", "")).split()
        if not scopes:
            return 400, {"error": "invalid_scope", "error_description": "Empty or missing scope not allowed."}
        subject = claims.get("sub")
        if subject is None:
            user = account.client_email  # the service account itself: it has no Gmail mailbox
        else:
            user = str(subject)
            if account.users is not None and user.lower() not in account.users:
                return 400, {"error": "invalid_grant", "error_description": "Invalid email or User ID"}
            if not set(scopes) <= account.scopes:
                description = (
                    "Client is unauthorized to retrieve access tokens using this method, or client not "
                    "authorized for any of the scopes requested."
                )
                return 401, {"error": "unauthorized_client", "error_description": description}
        token = self._new_token(account.client_id, " ".join(scopes), user)
        return 200, {"access_token": token.value, "token_type": "Bearer", "expires_in": self.lifetime}

    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """The consent page: (302, where it redirects) when it goes back to the app, else (400, the error
        Google shows the person). It consents at once for whoever is signed in (``sign_in``) or the
        ``login_hint``."""
        with self._lock:
            self.recorded.authorizations.append(query)
            client = self.clients.get(query.get("client_id", ""))
            browser = self.browser
        if client is None or not client.desktop:
            return 400, "Error 401: invalid_client. The OAuth client was not found."
        redirect_uri = query.get("redirect_uri", "")
        if not _loopback(redirect_uri):
            return 400, "Error 400: redirect_uri_mismatch"
        state = {"state": query["state"]} if "state" in query else {}
        requested = query.get("scope", "").split()
        if query.get("response_type") != "code" or not requested:
            return 302, _with_query(redirect_uri, {"error": "invalid_request", **state})
        method = query.get("code_challenge_method", "plain")
        if "code_challenge" in query and method not in ("S256", "plain"):
            return 302, _with_query(redirect_uri, {"error": "invalid_request", **state})
        user = query.get("login_hint") or browser.user
        if browser.deny or user is None:
            return 302, _with_query(redirect_uri, {"error": "access_denied", **state})
        granted = [scope for scope in requested if browser.grant is None or scope in browser.grant]
        code = f"4/0A{secrets.token_urlsafe(40)}"
        with self._lock:
            self.codes[code] = AuthorizationCode(
                client.client_id,
                redirect_uri,
                user,
                " ".join(granted),
                query.get("code_challenge"),
                method,
                time.time() + CODE_LIFETIME,
                offline=query.get("access_type") == "offline",
            )
        return 302, _with_query(redirect_uri, {**state, "code": code, "scope": " ".join(granted)})

    def _authorization_code(self, client_id: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            code = self.codes.get(form.get("code", ""))
            if code is None or code.used or code.client_id != client_id or time.time() > code.expires_at:
                return 400, {"error": "invalid_grant", "error_description": "Malformed auth code."}
            code.used = True  # one exchange per code, even a failed one, as Google does
        if form.get("redirect_uri") != code.redirect_uri:
            return 400, {"error": "redirect_uri_mismatch", "error_description": "Bad Request"}
        if code.challenge is not None:
            verifier = form.get("code_verifier")
            if not verifier:
                return 400, {"error": "invalid_grant", "error_description": "Missing code verifier."}
            if _challenge(verifier, code.challenge_method) != code.challenge:
                return 400, {"error": "invalid_grant", "error_description": "Invalid code verifier."}
        token = self._new_token(client_id, code.scope, code.user)
        answer: dict[str, Any] = {
            "access_token": token.value,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "scope": code.scope,
        }
        if code.offline:
            with self._lock:
                answer["refresh_token"] = self._new_refresh_token(client_id, code.user, code.scope)
        return 200, answer

    def revoke(self, value: str) -> bool:
        """Google's /revoke: an access or refresh token (a refresh token takes its access tokens along)."""
        with self._lock:
            if value in self.tokens:
                self.tokens[value].revoked = True
                return True
            grant = self.refresh_tokens.get(value)
            if grant is None:
                return False
            grant.revoked = True
            for token in self.tokens.values():
                if token.user == grant.user and token.client_id == grant.client_id:
                    token.revoked = True
            return True

    def userinfo(self, authorization: str | None) -> tuple[int, dict[str, Any]]:
        value = (authorization or "").removeprefix("Bearer ").strip()
        token = self.lookup(value)
        if token is None or not token.active(time.time()) or token.user is None:
            return 401, {"error": "invalid_request", "error_description": "Invalid Credentials"}
        if not {"email", "https://www.googleapis.com/auth/userinfo.email"} & token.scopes:
            return 401, {"error": "insufficient_scope", "error_description": "email scope not granted"}
        return 200, {
            "sub": hashlib.sha256(token.user.encode()).hexdigest()[:21],
            "email": token.user,
            "email_verified": True,
        }

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
    # Answers go out at once: with Nagle's algorithm and the client's delayed ACK each one waited ~40 ms.
    disable_nagle_algorithm = True
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
        elif parts.path in GOOGLE_AUTH_PATHS:
            query = {key: values[0] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
            status, where = self.token_server.authorize(query)
            if status == 302:
                self.send_response(302)
                self.send_header("Location", where)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                page = where.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
        elif parts.path == GOOGLE_USERINFO_PATH:
            self._reply(*self.token_server.userinfo(self.headers.get("Authorization")))
        else:
            self._reply(404, {"error": "not_found"})

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        form = self._form()
        token_paths = (TOKEN_PATH, GOOGLE_TOKEN_PATH)
        if parts.path in token_paths and self.token_server.redirect_to:
            self.token_server.recorded.token_requests.append(form)
            self.send_response(307)
            self.send_header("Location", self.token_server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path in token_paths:
            status, payload = self.token_server.token_response(form, self.headers.get("Authorization"))
            self._reply(status, payload)
        elif parts.path == "/introspect":
            self._reply(200, self.token_server.introspect(form))
        elif parts.path == GOOGLE_REVOKE_PATH:
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            value = form.get("token") or query.get("token", "")
            if self.token_server.revoke(value):
                self._reply(200, {})
            else:
                self._reply(400, {"error": "invalid_token", "error_description": "Token expired or revoked"})
        else:
            self._reply(404, {"error": "not_found"})


def _loopback(uri: str) -> bool:
    """Google lets a Desktop app redirect to any port of the loopback interface, over plain HTTP."""
    parts = urlsplit(uri)
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")


def _with_query(uri: str, params: dict[str, str]) -> str:
    return f"{uri}{'&' if '?' in uri else '?'}{urlencode(params)}"


def _challenge(verifier: str, method: str) -> str:
    if method == "plain":
        return verifier
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), for tests that play the app."""
    verifier = secrets.token_urlsafe(48)
    return verifier, _challenge(verifier, "S256")


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[TokenServer]:
    with TokenServer(**kwargs) as server:
        yield server
