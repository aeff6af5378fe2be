"""How exchangelib's errors become the project's own (a pure function), and folder paths."""

from __future__ import annotations

import pytest
import requests
from exchangelib import errors as ews_errors
from oauthlib.oauth2 import InvalidClientError

from connector.destinations.ews import folder_levels
from connector.destinations.ews_errors import Where, translate
from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationError,
    DestinationFullError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTLSError,
)

WHERE = Where("EWS https://mail.corp.example/EWS/Exchange.asmx", "alice@corp.example", "Inbox/Hosted")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ews_errors.UnauthorizedError("Invalid credentials"), DestinationAuthError),
        (InvalidClientError("invalid_client"), DestinationAuthError),
        (ews_errors.ErrorNonExistentMailbox("no mailbox"), DestinationRejectedError),
        (ews_errors.ErrorAccessDenied("Access is denied"), DestinationRejectedError),
        (ews_errors.ErrorImpersonateUserDenied("no role"), DestinationRejectedError),
        (ews_errors.ErrorMessageSizeExceeded("too big"), DestinationRejectedError),
        (ews_errors.ErrorMimeContentConversionFailed("bad MIME"), DestinationRejectedError),
        (ews_errors.ErrorInvalidPropertySet("anything else Exchange says"), DestinationRejectedError),
        (ews_errors.ErrorQuotaExceeded("full"), DestinationFullError),
        (ews_errors.ErrorServerBusy("busy", back_off=5), DestinationTempError),
        (ews_errors.ErrorInternalServerTransientError("503"), DestinationTempError),
        (ews_errors.ErrorMailboxStoreUnavailable("store down"), DestinationTempError),
        (ews_errors.ErrorMailboxMoveInProgress("moving"), DestinationTempError),
        (ews_errors.MalformedResponseError("Unknown failure in response. Code: 502"), DestinationTempError),
        (ews_errors.ErrorTimeoutExpired("Reraised from ReadTimeout"), DestinationConnectError),
        (
            ews_errors.TransportError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
            DestinationTLSError,
        ),
        (ews_errors.TransportError("connection refused"), DestinationConnectError),
        (requests.ConnectionError("refused"), DestinationConnectError),
        (ews_errors.EWSError("something new"), DestinationTempError),
    ],
)
def test_translation(error: Exception, kind: type[DestinationError]) -> None:
    translated = translate(error, WHERE, "CreateItem")
    assert type(translated) is kind
    assert translated.message.startswith(
        f"{WHERE.endpoint}, mailbox 'alice@corp.example', folder 'Inbox/Hosted'"
    )
    assert "CreateItem" in translated.message


def test_secrets_are_blanked_and_text_clipped() -> None:
    translated = translate(
        ews_errors.SOAPError("echo hunter2 " + "x" * 1000), WHERE, "GetFolder", ("hunter2",)
    )
    assert "hunter2" not in translated.message and "***" in translated.message
    assert len(translated.message) < 600


@pytest.mark.parametrize(
    ("folder", "levels"),
    [
        ("Inbox", []),
        ("INBOX", []),
        ("Inbox/Hosted", ["Hosted"]),
        ("/Inbox//Hosted/2025/", ["Hosted", "2025"]),
    ],
)
def test_folder_levels(folder: str, levels: list[str]) -> None:
    assert folder_levels(folder) == levels
