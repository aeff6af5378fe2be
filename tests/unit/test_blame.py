"""Whose fault a destination failure is (connector/policies/blame.py): pure decisions."""

from __future__ import annotations

import pytest

from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationError,
    DestinationFullError,
    DestinationTempError,
    DestinationTLSError,
)
from connector.policies.blame import Blame, DropWitness, Verdict, blame

DROP = DestinationConnectError("APPEND: connection reset by peer")


@pytest.mark.parametrize("routed", [False, True])
def test_nothing_is_blamed_on_a_message_or_mailbox_when_no_session_could_be_opened(routed: bool) -> None:
    for exc in (DROP, DestinationFullError("full"), DestinationAuthError("no"), DestinationTLSError("x")):
        assert blame(exc, in_session=False, delivering_one=True, routed=routed) is Blame.DESTINATION


@pytest.mark.parametrize("routed", [False, True])
def test_a_drop_while_one_message_is_delivered_is_suspicious_of_the_message(routed: bool) -> None:
    assert blame(DROP, in_session=True, delivering_one=True, routed=routed) is Blame.MESSAGE
    # A batch cannot be pinned on one message: its messages go one at a time at the next poll.
    assert blame(DROP, in_session=True, delivering_one=False, routed=False) is Blame.DESTINATION


@pytest.mark.parametrize("exc", [DestinationFullError("over quota"), DestinationTempError("busy"), DROP])
def test_a_catch_all_recipient_that_cannot_take_mail_is_that_recipients_trouble(
    exc: DestinationError,
) -> None:
    assert blame(exc, in_session=True, delivering_one=False, routed=True) is Blame.RECIPIENT


def test_the_account_s_own_full_destination_stops_the_poll() -> None:
    for exc in (DestinationFullError("over quota"), DestinationTempError("busy"), DestinationAuthError("x")):
        assert blame(exc, in_session=True, delivering_one=True, routed=False) is Blame.DESTINATION


def test_a_drop_is_charged_once_the_destination_takes_another_message() -> None:
    witness = DropWitness()
    assert witness.dropped(None, "a", "reset") is Verdict.WAIT
    assert witness.took(None) == [("a", "reset")]
    assert witness.took(None) == []
    # It took mail before: the next drop is charged at once.
    assert witness.dropped(None, "b", "reset") is Verdict.COUNT
    assert witness.took(None) == []


def test_two_drops_with_no_delivery_in_between_are_the_destination_s() -> None:
    witness = DropWitness()
    assert witness.dropped(None, "a", "reset") is Verdict.WAIT
    assert witness.dropped(None, "b", "reset") is Verdict.DOWN
    assert witness.took(None) == []  # neither is charged
    assert witness.dropped(None, "c", "reset") is Verdict.COUNT
    assert witness.dropped(None, "d", "reset") is Verdict.DOWN


def test_each_recipient_mailbox_is_its_own_witness() -> None:
    witness = DropWitness()
    assert witness.dropped("carol", "a", "reset") is Verdict.WAIT
    assert witness.took("alice") == []
    assert witness.dropped("alice", "b", "reset") is Verdict.COUNT
    assert witness.dropped("carol", "c", "reset") is Verdict.DOWN
