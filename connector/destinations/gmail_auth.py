"""Who the Gmail destination is to Google: google-auth credentials for one Gmail user, kept per process.

* Google Workspace: ``google.oauth2.service_account.Credentials`` from ``service_account_key`` with
  ``subject=`` the account's mailbox (domain-wide delegation: the service account acts as that user).
* Personal Gmail: ``google.oauth2.credentials.Credentials`` from the token file that
  ``pop-connector authorize`` wrote (``gmail_tokens``); when Google rotates the refresh token, the new one is
  written back at once, so a restart never needs a new consent.

A ``Login`` is shared by every session that imports into the same user with the same key or consent (so
one access token serves every poll until it nears expiry, instead of one token request per poll). Its lock
makes refreshes one at a time: two sessions never both spend a refresh token that Google may rotate.

Secrets: the service account's private key is registered with ``connector.redaction`` when the key is
parsed, the client secret and refresh token when the token file is read, and every access or refresh
token the token endpoint sends as the answer arrives (``_TokenRequest``), before google-auth sees it.
google-auth's own DEBUG request log (which would print a signed JWT assertion) is kept off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google.auth.credentials
import google.auth.transport.requests
import requests
from google.auth import exceptions as google_exceptions
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from connector import redaction
from connector.config import GmailDestination
from connector.destinations.base import clip_server_text
from connector.destinations.gmail_errors import Where, translate_refresh, translate_transport
from connector.destinations.gmail_tokens import (
    GMAIL_SCOPES,
    StoredToken,
    TokenFileError,
    desktop_client,
    find_token_file,
    read_token,
    rotate,
)
from connector.errors import DestinationAuthError, DestinationTempError

log = logging.getLogger("connector.destinations.gmail")

# google-auth logs request bodies at DEBUG (the JWT assertion of a service account included): never.
for _noisy in ("google", "google.auth", "google.oauth2"):
    if logging.getLogger(_noisy).level == logging.NOTSET:
        logging.getLogger(_noisy).setLevel(logging.INFO)

# Full access to the mailbox covers what the destination needs (a consent given for IMAP as well).
FULL_MAIL_SCOPE = "https://mail.google.com/"
# With this scope in a token, Gmail refuses messages.list's q= (the recovery lookup) even beside
# gmail.readonly.
METADATA_SCOPE = "https://www.googleapis.com/auth/gmail.metadata"
_TOKEN_FIELDS = ("access_token", "refresh_token", "id_token")
_REQUEST_FIELDS = ("assertion", "refresh_token", "client_secret", "code", "code_verifier")


def verify_setting(destination: GmailDestination) -> bool | str:
    """requests' ``verify`` for the API and the token endpoint: the CA file when set, off only when
    ``tls_verify = false``."""
    if not destination.tls_verify:
        return False
    return str(destination.ca_file) if destination.ca_file is not None else True


class _TokenRequest(google.auth.transport.requests.Request):  # type: ignore[misc]
    """google-auth's transport for token requests, registering each token in the answer with redaction
    before google-auth reads it (a later error text or log line that quotes it finds it cut out).

    ``verify`` goes with every request: requests lets $REQUESTS_CA_BUNDLE override a session's own
    ``verify``, which would drop the destination's ``ca_file``."""

    def __init__(self, session: requests.Session, verify: bool | str) -> None:
        super().__init__(session)
        self._verify = verify

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> Any:
        kwargs["verify"] = self._verify
        register_token_request(body)
        response = super().__call__(url, method=method, body=body, headers=headers, timeout=timeout, **kwargs)
        register_token_answer(response.data)
        return response


def register_token_request(body: bytes | str | None) -> None:
    """Register the credentials a token request sends (the signed JWT assertion of a service account is
    one, for as long as it lasts; the refresh token and client secret are known already)."""
    if not body:
        return
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    form = urllib.parse.parse_qs(text)
    redaction.register(*(value for name in _REQUEST_FIELDS for value in form.get(name, [])))


def register_token_answer(data: bytes | str | None) -> None:
    """Register the tokens of a token endpoint's JSON answer (anything else is ignored)."""
    if not data:
        return
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(parsed, Mapping):
        redaction.register(*(parsed.get(name) for name in _TOKEN_FIELDS if isinstance(parsed.get(name), str)))


@dataclass
class Login:
    """The credentials of one Gmail user. ``address``: the user as known before asking Google (the
    Workspace subject, or the address the consent was given for)."""

    credentials: google.auth.credentials.Credentials
    address: str
    auth_hint: str
    verify: bool | str
    token_path: Path | None = None
    stored: StoredToken | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _session: requests.Session | None = None

    def token_request(self, timeout: float) -> google.auth.transport.requests.Request:
        """The transport google-auth refreshes through (one keep-alive session per login)."""
        if self._session is None:
            self._session = requests.Session()
        request = _TokenRequest(self._session, self.verify)
        return _WithTimeout(request, timeout)

    def fresh(self, where: Where, timeout: float) -> None:
        """Make sure the credentials hold a valid access token (a token request when not)."""
        with self.lock:
            if not self.credentials.valid:
                self._refresh(where, timeout)

    def refused(self, where: Where, timeout: float, used: str | None) -> None:
        """The API refused the access token ``used`` (401): get a new one, unless another session already
        has since."""
        with self.lock:
            if self.credentials.token == used or not self.credentials.valid:
                self._refresh(where, timeout)

    def _refresh(self, where: Where, timeout: float) -> None:
        try:
            self.credentials.refresh(self.token_request(timeout))
        except google_exceptions.RefreshError as exc:
            raise translate_refresh(exc, where, auth_hint=self.auth_hint) from exc
        except google_exceptions.TransportError as exc:
            raise translate_transport(exc, where, "token request") from exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # an answer google-auth cannot read
            detail = clip_server_text(f"{type(exc).__name__}: {exc}")
            raise DestinationTempError(
                where.say(f"no access token: the token endpoint's answer is unusable ({detail})")
            ) from exc
        redaction.register(self.credentials.token)
        self._keep_rotated_refresh_token()

    def _keep_rotated_refresh_token(self) -> None:
        if self.stored is None or self.token_path is None:
            return
        refresh_token = getattr(self.credentials, "refresh_token", None)
        redaction.register(refresh_token)
        try:
            self.stored = rotate(self.token_path, self.stored, refresh_token)
        except TokenFileError as exc:
            # The new token works in this process; only a restart would need a new consent.
            log.error("Gmail: could not keep the rotated refresh token for %s: %s", self.address, exc)


@dataclass
class _WithTimeout:
    """A token transport with the session's timeout (google-auth's default is two minutes)."""

    request: google.auth.transport.requests.Request
    timeout: float

    def __call__(
        self, url: str, method: str = "GET", body: Any = None, headers: Any = None, **kwargs: Any
    ) -> Any:
        kwargs.setdefault("timeout", self.timeout)
        return self.request(url, method=method, body=body, headers=headers, **kwargs)


def authorize_hint(destination: GmailDestination, address: str | None) -> str:
    """What a person does when the destination's sign-in fails."""
    if destination.workspace:
        scopes = ",".join(GMAIL_SCOPES)
        return (
            "check the service account's domain-wide delegation in the Google Admin console (Security > "
            f"API controls > Domain-wide delegation: its client ID with the scopes {scopes}) and that the "
            "mailbox is a user of the domain"
        )
    user = f" --user {address}" if address else ""
    return f"run `pop-connector authorize {destination.name}{user}` to give the consent again"


class Logins:
    """The process's ``Login`` per Gmail user and key or consent (so polls share access tokens)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[object, ...], Login] = {}

    def get(self, destination: GmailDestination, mailbox: str | None, where: Where) -> Login:
        if destination.workspace:
            return self._workspace(destination, mailbox, where)
        return self._personal(destination, mailbox, where)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _workspace(self, destination: GmailDestination, mailbox: str | None, where: Where) -> Login:
        assert destination.service_account_key is not None  # workspace
        if mailbox is None:  # config validation requires it; a catch-all names each recipient
            raise DestinationAuthError(
                where.say("a Google Workspace destination needs the account's mailbox")
            )
        key_text = destination.service_account_key.get_secret_value()
        verify = verify_setting(destination)
        key = ("workspace", hashlib.sha256(key_text.encode()).hexdigest(), mailbox.lower(), verify)
        with self._lock:
            login = self._entries.get(key)
            if login is None:
                credentials = service_account_credentials(key_text, mailbox, where, destination)
                hint = authorize_hint(destination, mailbox)
                login = self._entries[key] = Login(credentials, mailbox, hint, verify)
            return login

    def _personal(self, destination: GmailDestination, mailbox: str | None, where: Where) -> Login:
        hint = authorize_hint(destination, mailbox)
        try:
            path = find_token_file(destination.tokens(), mailbox)
            stored = read_token(path)
        except TokenFileError as exc:
            raise DestinationAuthError(where.say(f"no usable consent: {exc}; {hint}")) from exc
        hint = authorize_hint(destination, mailbox or stored.address)
        _check_consent(destination, stored, path, where, hint)
        verify = verify_setting(destination)
        key = ("personal", str(path.absolute()), verify)
        with self._lock:
            login = self._entries.get(key)
            # The file changed under us (a new consent): start again from it. Our own rotations are
            # already in ``login.stored``.
            if login is None or login.stored != stored:
                credentials = user_credentials.Credentials(
                    token=None,
                    refresh_token=stored.refresh_token,
                    token_uri=stored.token_uri,
                    client_id=stored.client_id,
                    client_secret=stored.client_secret,
                    scopes=list(stored.scopes),
                )
                login = Login(credentials, stored.address, hint, verify, token_path=path, stored=stored)
                self._entries[key] = login
            return login


def _check_consent(
    destination: GmailDestination, stored: StoredToken, path: Path, where: Where, hint: str
) -> None:
    """Refuse a consent that cannot work, with what to do, before Google is asked."""
    assert destination.client_secrets is not None  # personal
    try:
        client = desktop_client(destination.client_secrets.get_secret_value())
    except TokenFileError as exc:
        raise DestinationAuthError(where.say(f"client_secrets: {exc}")) from exc
    if client.client_id != stored.client_id:
        raise DestinationAuthError(
            where.say(
                f"the consent in {path} was given to OAuth client {stored.client_id!r}, but client_secrets "
                f"is client {client.client_id!r}; {hint}"
            )
        )
    scopes = set(stored.scopes)
    if METADATA_SCOPE in scopes:
        raise DestinationAuthError(
            where.say(
                f"the consent in {path} includes gmail.metadata, with which Gmail refuses the search that "
                f"recovery needs; {hint}"
            )
        )
    missing = [scope for scope in GMAIL_SCOPES if scope not in scopes]
    if missing and FULL_MAIL_SCOPE not in scopes:
        raise DestinationAuthError(
            where.say(f"the consent in {path} lacks the scopes {', '.join(missing)}; {hint}")
        )


def service_account_credentials(
    key_text: str, subject: str, where: Where, destination: GmailDestination
) -> service_account.Credentials:
    """Credentials of the service account in ``key_text`` acting as ``subject``; the private key is
    registered with redaction first."""
    try:
        info = json.loads(key_text)
    except ValueError as exc:
        raise DestinationAuthError(
            where.say("service_account_key is not JSON (download the key again)")
        ) from exc
    if not isinstance(info, dict):
        raise DestinationAuthError(where.say("service_account_key is not a service account's JSON key"))
    private_key = info.get("private_key")
    if isinstance(private_key, str):
        redaction.register(private_key, *_key_lines(private_key))
    if info.get("type") != "service_account":
        raise DestinationAuthError(
            where.say('service_account_key is not a service account\'s JSON key ("type": "service_account")')
        )
    try:
        return service_account.Credentials.from_service_account_info(
            info, scopes=list(GMAIL_SCOPES), subject=subject
        )
    except (ValueError, KeyError, TypeError, google_exceptions.GoogleAuthError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise DestinationAuthError(
            where.say(
                f"service_account_key cannot be used ({detail}); {authorize_hint(destination, subject)}"
            )
        ) from exc


def _key_lines(private_key: str) -> list[str]:
    """The base64 lines of a PEM key: a log line may quote one line of it rather than all."""
    return [
        line for line in private_key.splitlines() if line and not line.startswith("-----") and len(line) >= 16
    ]


LOGINS = Logins()
