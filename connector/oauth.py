"""OAuth 2.0 access tokens for XOAUTH2 logins (IMAP destinations, POP3 sources).

Three ways to get a token, behind one small interface (``TokenProvider``: ``get_token()``, ``invalidate()``):

* ``EntraCredentials``: Microsoft Entra ID app-only (client credentials) through msal, with a client secret
  or a certificate; the scope defaults to Exchange Online's ``https://outlook.office365.com/.default``.
* ``TokenEndpointCredentials``: any RFC 6749 token endpoint (client credentials, or a refresh token for
  providers that only grant user tokens), so that other providers work and the tests can run their own.
* ``GoogleConsentCredentials``: a Gmail user's own consent, given with ``pop-connector authorize`` and kept
  in a token file (``connector.destinations.gmail_tokens``), refreshed through google-auth (Gmail over
  IMAP); a refresh token Google rotates is written back to the file.

Tokens are cached and fetched again a margin before they expire; ``TokenProviders`` hands out one provider
per distinct set of credentials, so accounts sharing an app share its token. Tokens and secrets never
appear in logs, reprs or exception messages: each token obtained (and each rotated refresh token, and each
XOAUTH2 response built from a token) is registered with ``connector.redaction`` before it is used, so that
a server echoing it finds it cut out of every log line, protocol log and POP3 error text.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from connector import redaction
from connector.errors import OAuthError, OAuthRefusedError, OAuthUnavailableError
from connector.oauth_endpoints import ENTRA_AUTHORITY_HOST, EXCHANGE_ONLINE_SCOPE, check_token_url

if TYPE_CHECKING:
    from connector.destinations.gmail_tokens import StoredToken

log = logging.getLogger("connector.oauth")

DEFAULT_REFRESH_MARGIN = 300.0
DEFAULT_TIMEOUT = 30.0
_MAX_RESPONSE = 1024 * 1024
_MAX_TEXT = 300
# OAuth error codes (RFC 6749 §5.2, plus Entra's) that mean "the credentials or the request are wrong":
# asking again at the normal rate will not help.
_REFUSAL_CODES = frozenset(
    {
        "invalid_client",
        "invalid_grant",
        "invalid_request",
        "invalid_scope",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_resource",
        "access_denied",
    }
)

_T = TypeVar("_T")


# --- credentials -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntraCredentials:
    """An app registration in Microsoft Entra ID: a client secret, or a certificate (PEM with its private
    key, or PKCS#12 ``.pfx``/``.p12``) with an optional SHA-1 thumbprint."""

    tenant_id: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    certificate_file: Path | None = None
    certificate_thumbprint: str | None = None
    certificate_password: str | None = field(default=None, repr=False)
    scope: str = EXCHANGE_ONLINE_SCOPE
    authority_host: str = ENTRA_AUTHORITY_HOST
    ca_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def description(self) -> str:
        return f"Microsoft Entra tenant {self.tenant_id!r}, app {self.client_id!r}"


@dataclass(frozen=True)
class TokenEndpointCredentials:
    """A plain OAuth 2.0 token endpoint: client credentials, or ``refresh_token`` when one is given."""

    token_url: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    scope: str | None = None
    refresh_token: str | None = field(default=None, repr=False)
    client_auth: Literal["body", "basic"] = "body"
    ca_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def description(self) -> str:
        return f"token endpoint {self.token_url}, client {self.client_id!r}"


# The scope Gmail's IMAP (and POP3) server wants from an XOAUTH2 token: full mail access, nothing narrower.
GMAIL_IMAP_SCOPE = "https://mail.google.com/"


@dataclass(frozen=True)
class GoogleConsentCredentials:
    """The consent ``address`` gave with ``pop-connector authorize DESTINATION``: the refresh token kept in
    ``token_dir`` (one file per address, ``connector.destinations.gmail_tokens``)."""

    destination: str
    address: str
    token_dir: Path
    ca_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def description(self) -> str:
        return f"Google consent of {self.address} (destination {self.destination!r})"

    @property
    def authorize_command(self) -> str:
        return f"pop-connector authorize {self.destination} --user {self.address}"


Credentials = EntraCredentials | TokenEndpointCredentials | GoogleConsentCredentials


# --- providers ---------------------------------------------------------------------------------------


class TokenProvider(Protocol):
    """Where a login gets its bearer token. ``invalidate(token)`` drops that token (or any, with None)
    from the cache after a server refused it, so the next ``get_token`` asks the endpoint again."""

    description: str

    @property
    def cached(self) -> bool: ...

    def get_token(self) -> str: ...

    def invalidate(self, token: str | None = None) -> None: ...


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)
    refresh_at: float


# What a fetcher returns: the token and its lifetime in seconds.
Fetch = Callable[[], tuple[str, float]]


class CachingTokenProvider:
    """Caches what ``fetch`` returns until ``margin`` seconds before it expires (at most half its life
    early, so that short-lived tokens are still reused). Thread-safe: one fetch at a time."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        description: str,
        margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self.description = description
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._token: _Token | None = None

    def __repr__(self) -> str:
        return f"<CachingTokenProvider {self.description}>"

    @property
    def cached(self) -> bool:
        """True when ``get_token`` would answer from the cache."""
        token = self._token
        return token is not None and self._clock() < token.refresh_at

    def get_token(self) -> str:
        with self._lock:
            token = self._token
            if token is not None and self._clock() < token.refresh_at:
                return token.value
            started = self._clock()
            value, lifetime = self._fetch()
            redaction.register(value)
            early = min(self._margin, lifetime / 2)
            self._token = _Token(value, started + lifetime - early)
            log.debug("%s: new access token, valid for %d s", self.description, int(lifetime))
            return value

    def invalidate(self, token: str | None = None) -> None:
        with self._lock:
            # Another thread may already have replaced a refused token; keep the new one.
            if self._token is not None and (token is None or self._token.value == token):
                self._token = None


class TokenProviders:
    """One provider per distinct credentials, created on first use and shared afterwards."""

    def __init__(
        self, *, margin: float = DEFAULT_REFRESH_MARGIN, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._providers: dict[Credentials, TokenProvider] = {}

    def get(self, credentials: Credentials) -> TokenProvider:
        with self._lock:
            provider = self._providers.get(credentials)
            if provider is None:
                fetch: Fetch
                if isinstance(credentials, EntraCredentials):
                    fetch = EntraFetcher(credentials)
                elif isinstance(credentials, GoogleConsentCredentials):
                    fetch = GoogleConsentFetcher(credentials)
                else:
                    fetch = TokenEndpointFetcher(credentials)
                provider = CachingTokenProvider(
                    fetch, description=credentials.description, margin=self._margin, clock=self._clock
                )
                self._providers[credentials] = provider
            return provider


DEFAULT_PROVIDERS = TokenProviders()


def login_with_token(
    provider: TokenProvider,
    login: Callable[[str], _T],
    refused: type[BaseException] | tuple[type[BaseException], ...],
) -> _T:
    """``login(token)``; when the server refuses a token that came from the cache (revoked, or expired
    early), forget it and try once more with a new one."""
    was_cached = provider.cached
    token = provider.get_token()
    try:
        return login(token)
    except refused:
        provider.invalidate(token)
        if not was_cached:
            raise
        log.info("%s: the server refused the cached token; trying once with a new one", provider.description)
    return login(provider.get_token())


# --- SASL XOAUTH2 ------------------------------------------------------------------------------------


def xoauth2_response(user: str, token: str) -> bytes:
    """The XOAUTH2 client response (before base64): ``user=U^Aauth=Bearer T^A^A``."""
    if any(bad in user for bad in ("\x01", "\r", "\n")):
        raise ValueError("the XOAUTH2 user name contains a control character")
    response = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    # Its base64 form is what goes on the wire, and what a careless server repeats in its refusal.
    redaction.register(token, base64.b64encode(response).decode("ascii"))
    return response


def describe_sasl_error(challenge: bytes) -> str:
    """The server's XOAUTH2 error challenge (base64 JSON such as ``{"status":"401","schemes":"bearer"}``)
    as readable text; undecodable input is shown clipped."""
    raw = challenge.strip()
    try:
        decoded = base64.b64decode(raw, validate=True)
    except binascii.Error:
        return _clip(raw.decode("ascii", "replace"))
    return describe_sasl_json(decoded)


def describe_sasl_json(decoded: bytes) -> str:
    """An already decoded XOAUTH2 error challenge as ``status 401, schemes bearer, scope ...``."""
    try:
        data = json.loads(decoded)
    except ValueError:
        data = None
    if not isinstance(data, Mapping):
        return _clip(decoded.decode("utf-8", "replace"))
    return _clip(", ".join(f"{key} {value}" for key, value in data.items()))


# --- fetchers -----------------------------------------------------------------------------------------


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def _redact(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "****")
    return text


def _error_from_answer(where: str, status: int | None, answer: Mapping[str, Any]) -> OAuthError:
    """The OAuth error JSON (``error``, ``error_description``) as a refusal or a temporary failure."""
    code = str(answer.get("error") or "")
    description = str(answer.get("error_description") or "").splitlines()[0:1]
    detail = f"{code}: {description[0]}" if description else code or "no error code"
    prefix = f"HTTP {status}, " if status else ""
    if code in _REFUSAL_CODES:
        return OAuthRefusedError(f"{where} refused the request: {prefix}{_clip(detail)}")
    return OAuthUnavailableError(f"{where} failed: {prefix}{_clip(detail)}")


def _lifetime(where: str, answer: Mapping[str, Any]) -> tuple[str, float]:
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise OAuthUnavailableError(f"{where}: the answer has no access_token")
    try:
        lifetime = float(answer.get("expires_in", 3600))
    except (TypeError, ValueError):
        raise OAuthUnavailableError(f"{where}: expires_in is not a number") from None
    return token, max(lifetime, 0.0)


class TokenEndpointFetcher:
    """POSTs the grant to a token endpoint with the standard library (TLS verified)."""

    def __init__(self, credentials: TokenEndpointCredentials) -> None:
        self._credentials = credentials
        self._refresh_token = credentials.refresh_token
        self._where = f"token endpoint {credentials.token_url}"

    def _request(self) -> tuple[bytes, dict[str, str]]:
        """The form to POST and its headers."""
        creds = self._credentials
        form: dict[str, str] = {}
        if self._refresh_token:
            form.update(grant_type="refresh_token", refresh_token=self._refresh_token)
        else:
            form["grant_type"] = "client_credentials"
        if creds.scope:
            form["scope"] = creds.scope
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if creds.client_auth == "basic":
            # RFC 6749 §2.3.1: both parts are form-encoded before they are joined.
            pair = f"{urllib.parse.quote(creds.client_id)}:{urllib.parse.quote(creds.client_secret or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = creds.client_id
            if creds.client_secret:
                form["client_secret"] = creds.client_secret
        return urllib.parse.urlencode(form).encode(), headers

    def __call__(self) -> tuple[str, float]:
        # urllib.request loads here, at the first token fetched (connector/oauth_http.py).
        from connector import oauth_http

        creds = self._credentials
        body, headers = self._request()
        try:
            status, raw = oauth_http.post(
                creds.token_url,
                body,
                headers,
                ca_file=creds.ca_file,
                timeout=creds.timeout,
                limit=_MAX_RESPONSE,
            )
        except OSError as exc:  # urllib's URLError included
            reason = getattr(exc, "reason", exc)
            text = _redact(str(reason), creds.client_secret, self._refresh_token)
            raise OAuthUnavailableError(f"{self._where}: cannot connect: {text}") from None
        answer = self._parse(status, raw)
        if status != 200 or "error" in answer:
            error = _error_from_answer(self._where, status, answer)
            error.message = _redact(error.message, creds.client_secret, self._refresh_token)
            if status >= 500 or status == 429:
                raise OAuthUnavailableError(error.message)
            raise error
        token, lifetime = _lifetime(self._where, answer)
        rotated = answer.get("refresh_token")
        if self._refresh_token and isinstance(rotated, str) and rotated:
            # Providers that rotate refresh tokens invalidate the old one as they hand out the new one.
            redaction.register(rotated)
            self._refresh_token = rotated
        return token, lifetime

    def _parse(self, status: int, raw: bytes) -> Mapping[str, Any]:
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if isinstance(answer, Mapping):
            return answer
        if status >= 400:
            return {"error": f"HTTP {status}", "error_description": raw[:200].decode("utf-8", "replace")}
        raise OAuthUnavailableError(f"{self._where}: the answer (HTTP {status}) is not a JSON object")


class EntraFetcher:
    """Client credentials from Microsoft Entra ID through msal. msal's own cache is emptied before each
    request, so that ``CachingTokenProvider`` alone decides when a new token is needed."""

    def __init__(self, credentials: EntraCredentials) -> None:
        self._credentials = credentials
        self._app: Any = None
        self._where = credentials.description

    def _client_credential(self) -> str | dict[str, Any]:
        creds = self._credentials
        if creds.certificate_file is None:
            return creds.client_secret or ""
        path = creds.certificate_file
        if path.suffix.lower() in (".pfx", ".p12"):
            if not path.is_file():
                raise OAuthRefusedError(f"{self._where}: certificate_file {path} does not exist")
            credential: dict[str, Any] = {"private_key_pfx_path": str(path)}
        else:
            credential = _pem_credential(path, self._where, creds.certificate_thumbprint)
        if creds.certificate_password:
            credential["passphrase"] = creds.certificate_password
        return credential

    def _application(self) -> Any:
        if self._app is not None:
            return self._app
        import msal
        import requests

        creds = self._credentials
        session = requests.Session()
        if creds.ca_file is not None:
            # Per request: requests lets REQUESTS_CA_BUNDLE in the environment win over session.verify.
            session.request = functools.partial(session.request, verify=str(creds.ca_file))  # type: ignore[method-assign]
        authority = f"{creds.authority_host.rstrip('/')}/{creds.tenant_id}"
        try:
            self._app = msal.ConfidentialClientApplication(
                creds.client_id,
                client_credential=self._client_credential(),
                authority=authority,
                http_client=session,
                timeout=creds.timeout,
                token_cache=msal.TokenCache(),
                # The authority is given in full (it may be a national cloud): no look-up of known hosts.
                instance_discovery=False,
            )
        except requests.RequestException as exc:
            raise OAuthUnavailableError(f"{self._where}: cannot reach {authority}: {_cause(exc)}") from None
        except ValueError as exc:
            text = _redact(str(exc), creds.client_secret, creds.certificate_password)
            raise OAuthRefusedError(f"{self._where}: {_clip(text)}") from None
        return self._app

    def __call__(self) -> tuple[str, float]:
        import requests

        app = self._application()
        cache = app.token_cache
        for entry in cache.search(cache.CredentialType.ACCESS_TOKEN):
            cache.remove_at(entry)
        try:
            answer = app.acquire_token_for_client(scopes=[self._credentials.scope])
        except requests.RequestException as exc:
            raise OAuthUnavailableError(f"{self._where}: token request failed: {_cause(exc)}") from None
        except ValueError as exc:
            raise OAuthUnavailableError(f"{self._where}: token request failed: {_clip(str(exc))}") from None
        if "access_token" not in answer:
            raise _error_from_answer(self._where, None, answer)
        return _lifetime(self._where, answer)


class GoogleConsentFetcher:
    """Access tokens from the refresh token ``authorize`` stored, through google-auth. The token file is
    read for each new token, so a consent given again is used without a restart; a refresh token Google
    rotates is written back to it, so a restart never needs a new consent."""

    def __init__(self, credentials: GoogleConsentCredentials) -> None:
        self._credentials = credentials
        self._where = credentials.description

    def _stored(self) -> tuple[Path, StoredToken]:
        # Loaded at the first token of a consent: a poll of an account that has none does not need it.
        from connector.destinations import gmail_tokens

        creds = self._credentials
        try:
            path = gmail_tokens.token_file(creds.token_dir, creds.address)
            stored = gmail_tokens.read_token(path)
        except gmail_tokens.TokenFileError as exc:
            raise OAuthRefusedError(
                f"{self._where}: {exc}; give the consent with: {creds.authorize_command}"
            ) from None
        if GMAIL_IMAP_SCOPE not in stored.scopes:
            raise OAuthRefusedError(
                f"{self._where}: the consent in {path} does not cover IMAP ({GMAIL_IMAP_SCOPE}); give it "
                f"again with: {creds.authorize_command}"
            )
        try:
            check_token_url(stored.token_uri)
        except ValueError as exc:
            raise OAuthRefusedError(f"{self._where}: token_uri in {path} {exc}") from None
        return path, stored

    def __call__(self) -> tuple[str, float]:
        import google.auth.exceptions
        import google.oauth2.credentials

        from connector.destinations import gmail_tokens

        path, stored = self._stored()
        user = google.oauth2.credentials.Credentials(
            None,
            refresh_token=stored.refresh_token,
            token_uri=stored.token_uri,
            client_id=stored.client_id,
            client_secret=stored.client_secret,
        )
        try:
            user.refresh(_google_request(self._credentials.ca_file, self._credentials.timeout))
        except google.auth.exceptions.RefreshError as exc:
            raise self._refused(exc) from None
        except google.auth.exceptions.TransportError as exc:
            raise OAuthUnavailableError(
                f"{self._where}: cannot reach {stored.token_uri}: {_cause(exc)}"
            ) from None
        token = user.token
        if not isinstance(token, str) or not token:
            raise OAuthUnavailableError(f"{self._where}: the answer has no access_token")
        redaction.register(token, user.refresh_token)
        try:
            gmail_tokens.rotate(path, stored, user.refresh_token)
        except gmail_tokens.TokenFileError as exc:
            # The old refresh token may already be void: say so loudly, but use the access token we have.
            log.error("%s: cannot keep the rotated refresh token: %s", self._where, exc)
        lifetime = 3600.0
        if user.expiry is not None:
            now = datetime.now(UTC).replace(tzinfo=None)  # google-auth's expiry is naive UTC
            lifetime = max((user.expiry - now).total_seconds(), 0.0)
        return token, lifetime

    def _refused(self, exc: Exception) -> OAuthError:
        """google-auth's RefreshError: ``args`` are the text and the token endpoint's JSON answer."""
        answer = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], Mapping) else {}
        code = str(answer.get("error") or "")
        text = _clip(str(exc.args[0]) if exc.args else type(exc).__name__)
        if getattr(exc, "retryable", False):
            return OAuthUnavailableError(f"{self._where}: the token endpoint failed: {text}")
        if code == "invalid_grant":
            return OAuthRefusedError(
                f"{self._where}: the consent was revoked or has expired ({text}); give it again with: "
                f"{self._credentials.authorize_command}"
            )
        return OAuthRefusedError(f"{self._where}: the token endpoint refused the refresh token: {text}")


def _google_request(ca_file: Path | None, timeout: float) -> Any:
    """google-auth's transport with our timeout and CA file on every request (per request: requests lets
    REQUESTS_CA_BUNDLE in the environment win over a session's ``verify``)."""
    import google.auth.transport.requests
    import requests

    session = requests.Session()
    session.request = functools.partial(  # type: ignore[method-assign]
        session.request, verify=str(ca_file) if ca_file else True, allow_redirects=False
    )
    request = google.auth.transport.requests.Request(session)
    return functools.partial(request, timeout=timeout)


def _cause(exc: BaseException) -> str:
    # requests nests the real reason (refused, timed out, certificate) a few levels down.
    inner: BaseException = exc
    while inner.__context__ is not None and len(str(inner)) > _MAX_TEXT:
        inner = inner.__context__
    return _clip(str(inner) or type(inner).__name__)


_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?\r?\n-----END \1-----", re.DOTALL)


def _pem_credential(path: Path, where: str, thumbprint: str | None) -> dict[str, Any]:
    """msal's credential from a PEM file: the private key, and the certificate unless the (SHA-1)
    thumbprint is given; from the certificate msal computes a SHA-256 thumbprint itself."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OAuthRefusedError(f"{where}: cannot read certificate_file {path}: {detail}") from None
    blocks = {match.group(1): match.group(0) for match in _PEM_BLOCK.finditer(text)}
    key = next((block for name, block in blocks.items() if name.endswith("PRIVATE KEY")), None)
    certificate = blocks.get("CERTIFICATE")
    if key is None or (certificate is None and not thumbprint):
        raise OAuthRefusedError(
            f"{where}: certificate_file {path} must hold the private key and the certificate (PEM), "
            "or the private key with certificate_thumbprint set"
        )
    if thumbprint:
        return {"private_key": key, "thumbprint": thumbprint.replace(":", "").upper()}
    return {"private_key": key, "public_certificate": certificate}
