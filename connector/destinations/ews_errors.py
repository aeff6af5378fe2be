"""exchangelib's, requests' and oauthlib's errors -> the project's ``DestinationError`` types (pure)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import requests
from exchangelib import errors as ews_errors
from oauthlib.oauth2 import OAuth2Error

from connector.destinations.base import clip_server_text
from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationError,
    DestinationFullError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTLSError,
)

_REJECTED = (
    ews_errors.ErrorNonExistentMailbox,
    ews_errors.ErrorAccessDenied,
    ews_errors.ErrorImpersonateUserDenied,
    ews_errors.ErrorImpersonationDenied,
    ews_errors.ErrorMessageSizeExceeded,
    ews_errors.ErrorMimeContentConversionFailed,
    ews_errors.ErrorCorruptData,
    ews_errors.ErrorItemCorrupt,
)
_TEMPORARY = (
    ews_errors.ErrorServerBusy,
    ews_errors.ErrorInternalServerTransientError,
    ews_errors.ErrorInternalServerError,
    ews_errors.ErrorMailboxStoreUnavailable,
    ews_errors.ErrorMailboxMoveInProgress,
    ews_errors.ErrorTooManyObjectsOpened,
    ews_errors.ErrorExceededConnectionCount,
    ews_errors.ErrorConnectionFailed,
    ews_errors.CASError,
    ews_errors.MalformedResponseError,
    ews_errors.SOAPError,
)


# What Exchange answers when the folder of a CreateItem no longer exists.
FOLDER_GONE = (ews_errors.ErrorFolderNotFound, ews_errors.ErrorItemNotFound)
# What the driver stack raises; anything else is a bug and goes to the engine's unexpected-error path.
DRIVER_ERRORS = (ews_errors.EWSError, requests.RequestException, OAuth2Error, OSError)


@dataclass(frozen=True)
class Where:
    endpoint: str
    mailbox: str
    folder: str

    def say(self, detail: str) -> str:
        return f"{self.endpoint}, mailbox {self.mailbox!r}, folder {self.folder!r}: {detail}"


def _is_cert_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def translate(exc: Exception, where: Where, action: str, secrets: tuple[str, ...] = ()) -> DestinationError:
    """One exchangelib/requests/oauthlib error -> the project's error type, with a message for people."""
    name = type(exc).__name__
    text = str(exc) or name
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    detail = clip_server_text(f"{name}: {text}" if name not in text else text)
    message = where.say(f"{action}: {detail}")
    if isinstance(exc, ews_errors.UnauthorizedError | OAuth2Error):
        return DestinationAuthError(where.say(f"{action}: login refused: {detail}"))
    if isinstance(exc, ews_errors.ErrorQuotaExceeded):
        return DestinationFullError(message)
    if isinstance(exc, _REJECTED):
        return DestinationRejectedError(message)
    if isinstance(exc, ews_errors.ErrorTimeoutExpired):
        return DestinationConnectError(
            where.say(f"{action}: no answer (timeout or connection lost): {detail}")
        )
    if _is_cert_failure(exc):
        return DestinationTLSError(where.say(f"{action}: certificate not trusted: {detail}"))
    if isinstance(exc, _TEMPORARY):
        return DestinationTempError(message)
    if isinstance(exc, ews_errors.ResponseMessageError):
        # Anything else Exchange says about this request it will say again: count it against the message.
        return DestinationRejectedError(message)
    if isinstance(exc, ews_errors.TransportError | requests.RequestException | OSError):
        return DestinationConnectError(message)
    return DestinationTempError(message)
