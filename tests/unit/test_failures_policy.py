"""The one error axis (connector/policies/failures.py): temporary or permanent decides what happens."""

from __future__ import annotations

import pytest

from connector.errors import (
    ConnectorError,
    DestinationAuthError,
    DestinationConnectError,
    DestinationFullError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTLSError,
    DestinationTooLargeError,
    LedgerError,
    PermanentError,
    SourceAuthError,
    SourceConnectError,
    SourceMessageError,
    SourcePermError,
    SourceShortReplyError,
    SourceTLSError,
    SpoolError,
    TemporaryError,
)
from connector.policies.failures import Backoff, Charge, backoff, charge


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (SourceConnectError("x"), Backoff.RETRY),
        (DestinationConnectError("x"), Backoff.RETRY),
        (DestinationFullError("x"), Backoff.RETRY),
        (DestinationTempError("x"), Backoff.RETRY),
        (SpoolError("x"), Backoff.RETRY),
        (LedgerError("x"), Backoff.RETRY),
        # Declared permanent: waiting longer and longer fixes none of them, a person does.
        (DestinationTLSError("x"), Backoff.PERSON),
        (SourceTLSError("x"), Backoff.PERSON),
        (SourcePermError("x"), Backoff.PERSON),
        (SourceAuthError("x"), Backoff.PERSON),
        (DestinationAuthError("x"), Backoff.PERSON),
    ],
)
def test_the_axis_decides_how_an_account_waits(exc: ConnectorError, expected: Backoff) -> None:
    assert backoff(exc) is expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (SourceMessageError("-ERR to RETR"), Charge.NONE),
        (DestinationConnectError("dropped"), Charge.NONE),
        (DestinationFullError("over quota"), Charge.NONE),
        (SourceShortReplyError("short"), Charge.ATTEMPT),
        (DestinationRejectedError("refused"), Charge.ATTEMPT),
        (DestinationTooLargeError("too large"), Charge.QUARANTINE),
        (RuntimeError("a bug"), Charge.ATTEMPT),
    ],
)
def test_the_axis_decides_what_a_message_is_charged(exc: BaseException, expected: Charge) -> None:
    assert charge(exc) is expected


def test_no_error_class_is_both_temporary_and_permanent() -> None:
    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    both = subclasses(TemporaryError) & subclasses(PermanentError)
    assert not both, both
