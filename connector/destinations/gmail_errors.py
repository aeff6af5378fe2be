"""Google's answers and google-auth's and requests' exceptions -> the project's ``DestinationError`` types
(pure: no network; the session raises what this returns, ``from`` the original).

The one axis of ``connector/errors.py`` decides what follows, so the mapping is about who must act:

* the API is busy or rations us (429; 403 ``rateLimitExceeded``/``userRateLimitExceeded``/quota; 5xx; 408;
  a timeout; a token endpoint that is busy): ``DestinationTempError``: the account backs off, no message
  is charged an attempt. Retry-After, when Google sends it, is kept in the text.
* the consent or delegation does not hold (401 after a fresh token; ``invalid_grant``, ``unauthorized_client``
  ... from the token endpoint; 403 for a missing scope or a disabled API): ``DestinationAuthError``, whose
  text says what to do (``pop-connector authorize NAME --user ADDRESS``, or the Admin console's
  domain-wide delegation);
* this message is refused (400 on the import): ``DestinationRejectedError``, one attempt; 413:
  ``DestinationTooLargeError``, quarantined at once;
* Gmail refuses what the configuration asks (a label name, a user without Gmail, any other 4xx outside an
  import): ``GmailSetupError``, permanent but the destination's: the poll stops and no message pays for it;
* the network: ``DestinationTLSError`` (a certificate that does not verify), ``DestinationConnectError``.

Every text names the destination, account and mailbox and carries Google's error reason, clipped
(``clip_server_text``); never a token: the texts go through ``connector.redaction`` as every
``ConnectorError`` message does, and the token endpoint's answers are registered as they arrive.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import requests
from google.auth import exceptions as google_exceptions

from connector.destinations.base import clip_server_text
from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTLSError,
    DestinationTooLargeError,
    PermanentError,
)


class GmailSetupError(DestinationError, PermanentError):
    """Gmail refuses what the configuration asks of it (a label it will not create, a user without
    Gmail, a request it calls invalid outside an import): a person must change something, and no message
    is to blame (the poll stops without charging one; the account waits ``auth_failure_backoff``)."""


# 403 reasons that ration rather than refuse (Gmail's usage limits): wait and try again.
RATE_LIMIT_REASONS = frozenset(
    {
        "rateLimitExceeded",
        "userRateLimitExceeded",
        "dailyLimitExceeded",
        "quotaExceeded",
        "concurrentLimitExceeded",
        "RATE_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
    }
)
# Token endpoint answers (RFC 6749 section 5.2) that mean the consent or delegation does not hold.
REFUSAL_CODES = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "access_denied",
        "invalid_scope",
        "invalid_request",
        "unsupported_grant_type",
    }
)
_TEMPORARY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Where:
    """Who is speaking to whom, for every message: destination, account and the Gmail user."""

    destination: str
    account: str
    mailbox: str

    def say(self, detail: str) -> str:
        where = f"Gmail destination {self.destination!r}, account {self.account!r}, mailbox {self.mailbox}"
        return f"{where}: {detail}"


@dataclass(frozen=True)
class Answer:
    """What an error answer of the Gmail API says: status, Google's reason, its message, Retry-After."""

    status: int
    reason: str | None
    message: str
    retry_after: str | None = None

    def describe(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        text = f"HTTP {self.status}{reason}"
        if self.message:
            text += f": {self.message}"
        return clip_server_text(text)


def parse_answer(status: int, body: bytes | str, headers: Mapping[str, str] | None = None) -> Answer:
    """Read Google's JSON error body (``{"error": {"code", "message", "status", "errors": [{"reason"}],
    "details": [{"reason"}]}}``; the token endpoint's ``{"error", "error_description"}``); anything else is
    kept as clipped text."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    retry_after = None
    if headers is not None:
        retry_after = next((value for key, value in headers.items() if key.lower() == "retry-after"), None)
    try:
        data = json.loads(text)
    except ValueError:
        return Answer(status, None, clip_server_text(text), retry_after)
    reason, message = _reason_and_message(data)
    if message is None:
        message = clip_server_text(text)
    return Answer(status, reason, clip_server_text(message), retry_after)


def _reason_and_message(data: object) -> tuple[str | None, str | None]:
    if not isinstance(data, Mapping):
        return None, None
    error = data.get("error")
    if isinstance(error, str):  # an OAuth token endpoint's answer
        description = data.get("error_description")
        return error, description if isinstance(description, str) else ""
    if not isinstance(error, Mapping):
        return None, None
    message = error.get("message")
    reason: str | None = None
    for item in _items(error.get("errors")) + _items(error.get("details")):
        value = item.get("reason")
        if isinstance(value, str) and value:
            reason = value
            break
    status = error.get("status")
    if reason is None and isinstance(status, str):
        reason = status
    return reason, message if isinstance(message, str) else None


def _items(value: object) -> list[Mapping[str, object]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def translate_answer(
    answer: Answer, where: Where, action: str, *, importing: bool, auth_hint: str
) -> DestinationError:
    """An error answer of the Gmail API -> the project's type. ``importing``: the request carried the
    message (only then can a 400 be the message's fault)."""
    said = answer.describe()
    if answer.status == 429 or answer.status in _TEMPORARY_STATUS or answer.status >= 500:
        return DestinationTempError(where.say(f"{action}: {_busy(answer)}"))
    if answer.status == 403 and answer.reason in RATE_LIMIT_REASONS:
        return DestinationTempError(where.say(f"{action}: {_busy(answer)}"))
    if answer.status == 401:
        return DestinationAuthError(where.say(f"{action}: access refused ({said}); {auth_hint}"))
    if answer.status == 403:
        return DestinationAuthError(where.say(f"{action}: not allowed ({said}); {auth_hint}"))
    if answer.status == 413:
        return DestinationTooLargeError(where.say(f"{action}: Gmail refuses a message this large ({said})"))
    if importing and answer.status == 400 and answer.reason != "failedPrecondition":
        return DestinationRejectedError(where.say(f"{action}: Gmail refused the message ({said})"))
    return GmailSetupError(where.say(f"{action}: {said}"))


def _busy(answer: Answer) -> str:
    wait = f"; Retry-After: {answer.retry_after}" if answer.retry_after else ""
    return f"Gmail asks to slow down or is unavailable ({answer.describe()}{wait}); the account backs off"


def translate_refresh(
    exc: google_exceptions.RefreshError, where: Where, *, auth_hint: str
) -> DestinationError:
    """A token request the token endpoint answered with an error."""
    code, description = _refresh_details(exc)
    said = clip_server_text(f"{code}: {description}" if code else description)
    if getattr(exc, "retryable", False) or (code is not None and code not in REFUSAL_CODES):
        return DestinationTempError(
            where.say(f"no access token, the token endpoint failed ({said}); the account backs off")
        )
    return DestinationAuthError(where.say(f"no access token: {said}; {auth_hint}"))


def _refresh_details(exc: google_exceptions.RefreshError) -> tuple[str | None, str]:
    data = exc.args[1] if len(exc.args) > 1 else None
    if isinstance(data, Mapping) and isinstance(data.get("error"), str):
        description = data.get("error_description")
        return data["error"], description if isinstance(description, str) else ""
    return None, str(exc.args[0]) if exc.args else type(exc).__name__


def translate_transport(exc: BaseException, where: Where, action: str) -> DestinationError:
    """A request that got no answer: TLS, refused or dropped connection, timeout (requests' exceptions, or
    google-auth's ``TransportError`` wrapping one during a token request)."""
    detail = clip_server_text(_innermost_text(exc))
    if is_cert_failure(exc):
        return DestinationTLSError(where.say(f"{action}: certificate not trusted: {detail}"))
    if _caused_by(exc, requests.Timeout):
        return DestinationTempError(
            where.say(f"{action}: no answer in time ({detail}); the account backs off")
        )
    return DestinationConnectError(where.say(f"{action}: no connection ({detail})"))


def is_cert_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _innermost_text(exc: BaseException) -> str:
    """The text of the deepest cause that says something (urllib3's wrappers repeat the URL around it)."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(texts) < 8:
        texts.append(f"{type(seen).__name__}: {seen}" if str(seen) else type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return texts[-1] if texts else type(exc).__name__
