"""Google's error answers, google-auth's and requests' exceptions -> the project's error types
(connector/destinations/gmail_errors.py), and what each means for the account and the message."""

from __future__ import annotations

import json
import ssl

import pytest
import requests
from google.auth import exceptions as google_exceptions

from connector.destinations.gmail_errors import (
    GmailSetupError,
    Where,
    parse_answer,
    translate_answer,
    translate_refresh,
    translate_transport,
)
from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTLSError,
    DestinationTooLargeError,
)
from connector.policies.failures import Backoff, Charge, backoff, charge

WHERE = Where("gmail", "alice", "alice@example.com")
HINT = "run `pop-connector authorize gmail --user alice@example.com` to give the consent again"


def google_error(code: int, reason: str, message: str = "Some text.", status: str = "") -> bytes:
    """The JSON body Google's APIs answer with."""
    body = {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "usageLimits", "reason": reason}],
            "status": status,
        }
    }
    return json.dumps(body).encode()


def translate(code: int, reason: str, *, importing: bool = True, retry_after: str | None = None) -> Exception:
    headers = {"Retry-After": retry_after} if retry_after else {}
    answer = parse_answer(code, google_error(code, reason, "User-rate limit exceeded."), headers)
    return translate_answer(answer, WHERE, "import", importing=importing, auth_hint=HINT)


def test_parse_answer_reads_googles_reason_and_message() -> None:
    answer = parse_answer(403, google_error(403, "userRateLimitExceeded", "User-rate limit exceeded."))
    assert (answer.status, answer.reason, answer.message) == (
        403,
        "userRateLimitExceeded",
        "User-rate limit exceeded.",
    )


def test_parse_answer_falls_back_to_the_status_and_details_and_to_plain_text() -> None:
    details = {
        "error": {"code": 429, "message": "m", "details": [{"@type": "x", "reason": "RATE_LIMIT_EXCEEDED"}]}
    }
    assert parse_answer(429, json.dumps(details)).reason == "RATE_LIMIT_EXCEEDED"
    status_only = {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}
    assert parse_answer(400, json.dumps(status_only)).reason == "INVALID_ARGUMENT"
    oauth = {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
    assert parse_answer(400, json.dumps(oauth)).reason == "invalid_grant"
    plain = parse_answer(502, b"<html>Bad Gateway\n" + b"x" * 5000)
    assert plain.reason is None and plain.message.startswith("<html>Bad Gateway") and len(plain.message) < 500


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (429, "rateLimitExceeded"),
        (403, "rateLimitExceeded"),
        (403, "userRateLimitExceeded"),
        (403, "dailyLimitExceeded"),
        (500, "backendError"),
        (503, "backendError"),
        (502, ""),
        (504, ""),
        (408, ""),
    ],
)
def test_rate_limits_and_server_trouble_back_off_without_charging_the_message(code: int, reason: str) -> None:
    error = translate(code, reason, retry_after="7")
    assert isinstance(error, DestinationTempError)
    assert charge(error) is Charge.NONE and backoff(error) is Backoff.RETRY
    assert "Retry-After: 7" in error.message
    assert "alice@example.com" in error.message and "'gmail'" in error.message and "'alice'" in error.message
    if reason:
        assert reason in error.message


@pytest.mark.parametrize(
    ("code", "reason"), [(401, "authError"), (403, "insufficientPermissions"), (403, "forbidden")]
)
def test_refused_access_is_an_authentication_failure_naming_the_command(code: int, reason: str) -> None:
    error = translate(code, reason)
    assert isinstance(error, DestinationAuthError)
    assert "pop-connector authorize gmail --user alice@example.com" in error.message
    assert reason in error.message


def test_a_refused_message_costs_an_attempt_and_a_too_large_one_is_quarantined() -> None:
    rejected = translate(400, "invalidArgument")
    assert isinstance(rejected, DestinationRejectedError) and charge(rejected) is Charge.ATTEMPT
    too_large = translate(413, "uploadTooLarge")
    assert isinstance(too_large, DestinationTooLargeError) and charge(too_large) is Charge.QUARANTINE


@pytest.mark.parametrize(
    ("code", "reason", "importing"),
    [
        (400, "invalidArgument", False),
        (400, "failedPrecondition", True),
        (404, "notFound", True),
        (409, "conflict", False),
    ],
)
def test_what_is_not_the_messages_fault_stops_the_poll_without_charging_it(
    code: int, reason: str, importing: bool
) -> None:
    error = translate(code, reason, importing=importing)
    assert isinstance(error, GmailSetupError)
    assert not isinstance(error, DestinationRejectedError)  # the engine would charge the message
    assert backoff(error) is Backoff.PERSON


def refresh_error(code: str, description: str, *, retryable: bool = False) -> google_exceptions.RefreshError:
    data = {"error": code, "error_description": description}
    return google_exceptions.RefreshError(f"{code}: {description}", data, retryable=retryable)


@pytest.mark.parametrize("code", ["invalid_grant", "unauthorized_client", "invalid_client", "access_denied"])
def test_a_refused_grant_is_an_authentication_failure_with_the_hint(code: str) -> None:
    error = translate_refresh(
        refresh_error(code, "Token has been expired or revoked."), WHERE, auth_hint=HINT
    )
    assert isinstance(error, DestinationAuthError)
    assert code in error.message and "expired or revoked" in error.message
    assert "pop-connector authorize gmail --user alice@example.com" in error.message


def test_a_busy_token_endpoint_is_temporary() -> None:
    error = translate_refresh(
        refresh_error("server_error", "try later", retryable=True), WHERE, auth_hint=HINT
    )
    assert isinstance(error, DestinationTempError)
    plain = google_exceptions.RefreshError("No access token in response.", {"x": 1}, retryable=False)
    assert isinstance(translate_refresh(plain, WHERE, auth_hint=HINT), DestinationAuthError)


def test_network_failures() -> None:
    refused = requests.ConnectionError("HTTPSConnectionPool: Max retries exceeded")
    refused.__context__ = ConnectionRefusedError(111, "Connection refused")
    error = translate_transport(refused, WHERE, "import")
    assert isinstance(error, DestinationConnectError) and "Connection refused" in error.message

    timeout = requests.ReadTimeout("read timed out")
    assert isinstance(translate_transport(timeout, WHERE, "import"), DestinationTempError)

    cert = requests.exceptions.SSLError("bad handshake")
    cert.__context__ = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    assert isinstance(translate_transport(cert, WHERE, "import"), DestinationTLSError)

    wrapped = google_exceptions.TransportError(refused)
    wrapped.__cause__ = refused
    assert isinstance(translate_transport(wrapped, WHERE, "token request"), DestinationConnectError)
