"""How the EWS destination reaches an endpoint: exchangelib Configurations shared per endpoint and login,
TLS settings per endpoint, OAuth 2.0 client credentials, and a retry policy that leaves throttling to the
session (which waits as the server asks, and counts it).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import urllib.parse
from typing import Any, ClassVar

import requests
from exchangelib import Configuration, Credentials, Version
from exchangelib import errors as ews_errors
from exchangelib.credentials import OAuth2Credentials
from exchangelib.protocol import FailFast, Protocol
from exchangelib.transport import BASIC, NTLM, OAUTH2
from exchangelib.version import EXCHANGE_2013, EXCHANGE_2013_SP1, EXCHANGE_2016, EXCHANGE_2019
from pydantic import SecretStr

from connector.config import EwsDestination

# exchangelib's DEBUG trace carries every request's headers (Authorization: Basic ... included) and whole
# messages; keep it out of the logs whatever level the service runs at.
for _noisy in ("exchangelib", "requests_oauthlib", "oauthlib"):
    if logging.getLogger(_noisy).level == logging.NOTSET:
        logging.getLogger(_noisy).setLevel(logging.INFO)


_VERSIONS = {
    "Exchange2013": EXCHANGE_2013,
    "Exchange2013_SP1": EXCHANGE_2013_SP1,
    "Exchange2016": EXCHANGE_2016,
    "Exchange2019": EXCHANGE_2019,
}
_AUTH_TYPES = {"ntlm": NTLM, "basic": BASIC, "oauth2": OAUTH2}


# --- TLS per endpoint -----------------------------------------------------------------------------------


class _TlsAdapter(requests.adapters.HTTPAdapter):
    """exchangelib builds its HTTP sessions itself; this adapter applies each endpoint's TLS settings.

    ``verify_for`` maps an origin (``https://host:port``) to requests' ``verify`` (True, False or a CA
    file). Origins not listed keep requests' default: verified against the system's CAs.
    """

    verify_for: ClassVar[dict[str, bool | str]] = {}

    def _verify(self, url: str, verify: Any) -> Any:
        return self.verify_for.get(_origin(url), verify)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, self._verify(url, verify), cert)

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> Any:
        return super().get_connection_with_tls_context(
            request, self._verify(request.url, verify), proxies=proxies, cert=cert
        )


Protocol.HTTP_ADAPTER_CLS = _TlsAdapter


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class _Throttled(FailFast):  # type: ignore[misc]
    """Fail fast (a 401 is a login failure, not throttling), but keep a 503's Retry-After for our loop."""

    def raise_response_errors(self, response: Any) -> None:
        try:
            super().raise_response_errors(response)
        except ews_errors.ErrorInternalServerTransientError as exc:
            retry_after = _retry_after(response)
            if retry_after is not None:
                raise ews_errors.ErrorServerBusy(exc.args[0], back_off=retry_after) from exc
            raise


def _retry_after(response: Any) -> float | None:
    try:
        value = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


# --- one endpoint's configuration, shared by the accounts that use the same login ------------------------


def secret_of(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _cache_key(login: EwsDestination) -> tuple[object, ...]:
    """Endpoint + login identity; the secret only as a digest, so a changed password is a new entry."""
    secret = secret_of(login.password) or secret_of(login.client_secret) or ""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    who = login.username or f"{login.client_id}@{login.tenant_id or login.token_url}"
    return (login.service_endpoint, login.auth, who, digest, login.version, login.tls_verify, login.ca_file)


def describe(login: EwsDestination) -> str:
    return f"EWS {login.service_endpoint or '(autodiscover)'}"


class _ClientCredentials(OAuth2Credentials):  # type: ignore[misc]
    """OAuth 2.0 client credentials with an optional token URL and scope (ADFS, or a test's endpoint)."""

    def __init__(self, *, token_url: str | None, scope: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._token_url = token_url
        self._scope = scope

    @property
    def token_url(self) -> str:
        return self._token_url or str(super().token_url)

    @property
    def scope(self) -> list[str]:
        return [self._scope] if self._scope else list(super().scope)


class _ConfigurationCache:
    """exchangelib Configurations by endpoint and login: accounts sharing a login share one Protocol, i.e.
    one pool of at most ``max_connections`` HTTP connections (exchangelib caches Protocols by endpoint and
    credentials object, so the credentials object must be the same one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[object, ...], Configuration] = {}

    def get(self, login: EwsDestination) -> Configuration:
        """The Configuration for ``login``: an EWS destination, with the account's own login if it has one."""
        key = _cache_key(login)
        with self._lock:
            config = self._entries.get(key)
            if config is None:
                config = self._entries[key] = _configuration(login)
            return config

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CONFIGURATIONS = _ConfigurationCache()


def _configuration(login: EwsDestination) -> Configuration:
    verify: bool | str = (str(login.ca_file) if login.ca_file else True) if login.tls_verify else False
    for url in (login.service_endpoint, login.token_url):
        if url:
            _TlsAdapter.verify_for[_origin(url)] = verify
    credentials: Any
    if login.auth == "oauth2":
        credentials = _ClientCredentials(
            client_id=login.client_id,
            client_secret=secret_of(login.client_secret),
            tenant_id=login.tenant_id,
            token_url=login.token_url,
            scope=login.scope,
        )
    else:
        credentials = Credentials(login.username, secret_of(login.password))
    version = Version(build=_VERSIONS[login.version]) if login.version else None
    return Configuration(
        credentials=credentials,
        service_endpoint=login.service_endpoint,
        auth_type=_AUTH_TYPES[login.auth],
        version=version,
        retry_policy=_Throttled(),
        max_connections=login.max_connections,
    )
