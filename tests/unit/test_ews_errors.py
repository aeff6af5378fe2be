"""How exchangelib's errors become the project's own (a pure function), and folder paths."""

from __future__ import annotations

import pytest
import requests
from exchangelib import errors as ews_errors
from oauthlib.oauth2 import InvalidClientError

from connector.destinations.base import look_up
from connector.destinations.ews import EwsSession, folder_levels
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
from connector.message import MessageSpool

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


class _FolderYieldingAnError:
    """exchangelib's QuerySet passes failed response messages on as exception instances among the items."""

    def filter(self, **criteria: str) -> _FolderYieldingAnError:
        return self

    def only(self, *fields: str) -> list[object]:
        return [ews_errors.ErrorInvalidRestriction("The restriction cannot be evaluated.")]


def test_a_finditem_error_among_the_results_is_raised_not_read_as_not_found() -> None:
    session = EwsSession(object(), where=WHERE, mark_seen=False, max_message_size=1 << 20)
    session._folder = _FolderYieldingAnError()
    spool = MessageSpool("U1", "<fallback@x>")
    spool.write(b"Message-ID: <m@x>\r\n\r\nbody\r\n")
    with spool.finish() as message:
        with pytest.raises(DestinationRejectedError, match="ErrorInvalidRestriction"):
            session.find(message)
        with pytest.raises(DestinationTempError, match="not delivered again now"):
            look_up(session, message)
