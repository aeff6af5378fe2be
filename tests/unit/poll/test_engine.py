"""Each branch of a poll, through the public API only: ``SyncEngine(...).poll(account)`` with in-memory fakes
behind ``Connections`` (fakes.py), asserting what README.md ("How delivery stays exactly-once"),
docs/policies.md and docs/reliability.md promise: the returned ``PollResult``, the committed ledger, what the
POP3 server and the destination were sent and what they hold afterwards, and the events observers get."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest

from connector.errors import (
    DestinationRejectedError,
    DestinationTooLargeError,
    SourceAuthError,
    SourceLoginDelayError,
)
from connector.ledger.records import KnownMessage, MessageState, RecipientState
from connector.ops.logs import ContextFilter
from connector.poll.events import (
    Deleted,
    Delivered,
    Failed,
    Fetched,
    Finished,
    Planned,
    PollEvent,
    Quarantined,
    Recovered,
    Started,
)
from connector.poll.result import PollResult
from tests.messages import simple
from tests.unit.poll.conftest import Rig, RigFactory
from tests.unit.poll.fakes import FakeMessage, RecordingObserver, SimulatedCrash, Stored

DELIVERED, DELETED, PENDING, FAILED = (
    MessageState.DELIVERED,
    MessageState.DELETED,
    MessageState.PENDING,
    MessageState.FAILED,
)
KEEP = {"retention": {"mode": "keep"}}


# --- helpers ------------------------------------------------------------------------------------------------


def snapshots(rig: Rig, *prefixes: str) -> tuple[dict[str, dict[str, KnownMessage]], Callable[[str], None]]:
    """A hook for ``on_command``/``before`` that keeps the committed ledger rows as they are when each
    command or call starting with one of ``prefixes`` goes out, by its line."""
    seen: dict[str, dict[str, KnownMessage]] = {}

    def hook(line: str) -> None:
        if line.startswith(prefixes):
            seen[line] = rig.rows()

    return seen, hook


def commands_of_last_session(rig: Rig) -> list[str]:
    return rig.maildrop.sessions[-1].commands


def in_order(log: list[str], *entries: str) -> bool:
    """Each of ``entries`` is in ``log``, in this order."""
    positions = [log.index(entry) for entry in entries]
    return positions == sorted(positions)


def refused(uidl: str) -> DestinationRejectedError:
    return DestinationRejectedError(f"APPEND refused: NO [CANNOT] message {uidl} has content we refuse")


def original(stored: Stored) -> bytes:
    """A delivered message without the ``X-Pop-Connector-Id`` line the connector puts first."""
    stamp, _, rest = stored.data.partition(b"\r\n")
    assert stamp.startswith(b"X-Pop-Connector-Id: ")
    return rest


def to_recipients(n: int, to: str) -> bytes:
    return simple(n).replace(b"To: alice@example.net", b"To: " + to.encode())


# Lifecycle events as the engine emits them today; the lead adds Fetched, Delivered, ... between them.
LIFECYCLE = (Started, Planned, Finished)


def lifecycle(observer: RecordingObserver) -> list[PollEvent]:
    return observer.of(*LIFECYCLE)


def assert_lifecycle(
    observer: RecordingObserver, result: PollResult, *, messages: int, size: int, to_delete: int
) -> None:
    """One poll's Started, Planned and Finished, in this order, with these counts (other events may come
    between them)."""
    started, planned, finished = lifecycle(observer)
    assert started == Started("alice")
    assert planned == Planned("alice", messages, size, to_delete)
    assert isinstance(finished, Finished)
    assert finished.account == "alice" and finished.result is result and finished.planned == messages


# --- delivery, retention ------------------------------------------------------------------------------------


def test_a_new_message_is_delivered_once_and_deleted_only_after_its_delivery_is_committed_and_quit(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(1)
    at_delivery, rig.destination.before = snapshots(rig, "deliver")
    at_pop, rig.maildrop.on_command = snapshots(rig, "DELE", "QUIT")

    result = rig.poll()

    assert (result.status, result.delivered, result.deleted, result.failed) == ("ok", 1, 1, 0)
    [stored] = rig.destination.stored
    assert stored.uidl == "uid-1" and stored.data.startswith(b"X-Pop-Connector-Id: ")
    assert original(stored) == simple(1)  # what the server sent, after the stamp line
    # Recorded pending (committed) before the destination had it; delivered before the DELE; deleted only
    # once QUIT was answered.
    assert at_delivery["deliver uid-1"]["uid-1"].state is PENDING
    assert at_pop["DELE 1"]["uid-1"].state is DELIVERED
    assert at_pop["QUIT"]["uid-1"].state is DELIVERED
    assert rig.row("uid-1").state is DELETED
    assert rig.row("uid-1").sha256 == stored.sha256
    commands = rig.maildrop.commands
    assert in_order(commands, "RETR 1", "DELE 1", "QUIT") and commands[-1] == "QUIT"
    assert rig.maildrop.messages == []

    again = rig.poll()
    assert (again.status, again.delivered, again.deleted) == ("ok", 0, 0)
    assert rig.destination.uidls == ["uid-1"]


def test_retention_keep_delivers_once_and_never_deletes(make_rig: RigFactory) -> None:
    rig = make_rig(2, account=KEEP)

    first, second = rig.poll(), rig.poll()

    assert (first.delivered, first.deleted) == (2, 0)
    assert (second.delivered, second.deleted) == (0, 0)
    assert not any(command.startswith(("DELE", "RETR")) for command in commands_of_last_session(rig))
    assert not any(command.startswith("DELE") for command in rig.maildrop.commands)
    assert rig.destination.uidls == ["uid-1", "uid-2"]
    assert rig.states() == {"uid-1": DELIVERED, "uid-2": DELIVERED}
    assert rig.maildrop.uidls == ["uid-1", "uid-2"]


def test_retention_days_deletes_once_due_after_checking_the_message_is_the_delivered_one(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(2, account={"retention": {"mode": "days", "days": 2}})
    rig.poll()
    rig.clock.advance(timedelta(days=1))
    not_yet = rig.poll()
    assert not_yet.deleted == 0 and rig.maildrop.uidls == ["uid-1", "uid-2"]
    rig.observer.clear()

    rig.clock.advance(timedelta(days=1, minutes=1))
    due = rig.poll()

    assert (due.status, due.delivered, due.deleted) == ("ok", 0, 2)
    commands = commands_of_last_session(rig)
    assert in_order(commands, "TOP 1 0", "DELE 1", "QUIT") and in_order(commands, "TOP 2 0", "DELE 2")
    assert not any(command.startswith("RETR") for command in commands)
    assert rig.states() == {"uid-1": DELETED, "uid-2": DELETED}
    assert rig.maildrop.messages == [] and rig.destination.uidls == ["uid-1", "uid-2"]
    assert_lifecycle(rig.observer, due, messages=0, size=0, to_delete=2)


# --- crash recovery: a pending row --------------------------------------------------------------------------


def test_a_pending_row_found_in_the_destination_is_recorded_not_delivered_again(make_rig: RigFactory) -> None:
    rig = make_rig(1)
    rig.destination.lose_answer = {"uid-1"}  # stored, then the connection drops before the answer

    first = rig.poll()

    assert first.status == "error" and first.delivered == 0
    assert rig.destination.uidls == ["uid-1"]
    assert rig.row("uid-1").state is PENDING
    assert not any(command.startswith("DELE") for command in rig.maildrop.commands)
    assert rig.maildrop.uidls == ["uid-1"]

    calls_before = len(rig.destination.calls)
    second = rig.poll()

    assert (second.status, second.delivered, second.recovered, second.deleted) == ("ok", 0, 1, 1)
    assert [c for c in rig.destination.calls[calls_before:] if c not in ("open", "close")] == ["find uid-1"]
    assert rig.destination.uidls == ["uid-1"]
    assert rig.row("uid-1").state is DELETED
    assert rig.maildrop.messages == []


def test_a_pending_row_not_found_in_the_destination_is_delivered_once(make_rig: RigFactory) -> None:
    rig = make_rig(1)
    rig.destination.drop = {"uid-1"}  # the connection drops during the APPEND: nothing stored
    first = rig.poll()
    assert first.status == "error" and rig.destination.uidls == []
    assert rig.row("uid-1").state is PENDING
    assert rig.maildrop.uidls == ["uid-1"]

    rig.destination.drop.clear()
    calls_before = len(rig.destination.calls)
    second = rig.poll()

    assert (second.status, second.delivered, second.recovered) == ("ok", 1, 0)
    assert in_order(rig.destination.calls[calls_before:], "find uid-1", "deliver uid-1")
    assert rig.destination.uidls == ["uid-1"]
    assert rig.row("uid-1").state is DELETED


def test_interrupted_attempts_used_up_quarantine_the_message_and_leave_it_on_the_server(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(1, account={"retry": {"max_attempts": 2}})
    rig.destination.crash = {"uid-1"}  # the process dies in the middle of each delivery
    for attempt in (1, 2):
        with pytest.raises(SimulatedCrash):
            rig.poll()
        assert rig.row("uid-1").state is PENDING and rig.row("uid-1").attempts == attempt

    calls_before = len(rig.destination.calls)
    result = rig.poll()

    assert (result.delivered, result.quarantined) == (0, 1)
    assert [c for c in rig.destination.calls[calls_before:] if c.startswith(("find", "deliver"))] == [
        "find uid-1"
    ]
    assert rig.row("uid-1").state is FAILED
    [quarantined] = rig.ledger.quarantine.messages("alice")
    assert quarantined.uidl == "uid-1" and "gave up after 2 attempts" in (quarantined.last_error or "")
    assert not any(command.startswith("DELE") for command in rig.maildrop.commands)
    assert rig.maildrop.uidls == ["uid-1"] and rig.destination.uidls == []

    rig.destination.crash.clear()
    later = rig.poll()  # quarantined: not tried again
    assert later.delivered == 0 and not any(c.startswith("RETR") for c in commands_of_last_session(rig))


# --- the destination refuses one message --------------------------------------------------------------------


def test_a_refused_message_counts_an_attempt_and_the_next_is_delivered(make_rig: RigFactory) -> None:
    rig = make_rig(2, account={"retry": {"max_attempts": 2}})
    rig.destination.refuse = {"uid-1": refused("uid-1")}

    first = rig.poll()

    assert (first.status, first.delivered, first.failed, first.quarantined) == ("ok", 1, 1, 0)
    assert rig.row("uid-1").state is PENDING and rig.row("uid-1").attempts == 1
    assert rig.destination.uidls == ["uid-2"]
    assert rig.row("uid-2").state is DELETED
    commands = rig.maildrop.commands
    assert "DELE 2" in commands and "DELE 1" not in commands

    second = rig.poll()  # the last attempt: quarantined, left on the server

    assert (second.delivered, second.quarantined) == (0, 1)
    assert rig.row("uid-1").state is FAILED and rig.row("uid-1").attempts == 2
    assert rig.maildrop.uidls == ["uid-1"] and rig.destination.uidls == ["uid-2"]
    rig.poll()
    assert not any(c.startswith(("RETR", "DELE")) for c in commands_of_last_session(rig))


def test_a_message_too_large_for_the_destination_is_quarantined_at_once(make_rig: RigFactory) -> None:
    rig = make_rig(2)
    rig.destination.refuse = {"uid-1": DestinationTooLargeError("message uid-1 is larger than 35 MB")}

    result = rig.poll()

    assert (result.status, result.delivered, result.quarantined) == ("ok", 1, 1)
    assert rig.row("uid-1").state is FAILED and rig.row("uid-1").attempts == 1
    assert rig.maildrop.uidls == ["uid-1"] and rig.destination.uidls == ["uid-2"]
    rig.poll()
    assert not any(c.startswith(("RETR", "DELE")) for c in commands_of_last_session(rig))


# --- the destination cannot take mail -----------------------------------------------------------------------


# The wait before the next poll (docs/policies.md, "Retry, back-off and suspension"): a temporary failure
# waits retry.initial_backoff (1 minute, +-20%), a certificate that does not verify the flat
# auth_failure_backoff (1 hour).
TEMPORARY = (timedelta(seconds=48), timedelta(seconds=72))
PERMANENT = (timedelta(hours=1), timedelta(hours=1))


@pytest.mark.parametrize(
    ("fault", "wait"), [("full", TEMPORARY), ("down", TEMPORARY), ("tls_error", PERMANENT)]
)
def test_a_destination_that_cannot_take_mail_stops_the_poll_without_counting_an_attempt(
    make_rig: RigFactory, fault: str, wait: tuple[timedelta, timedelta]
) -> None:
    rig = make_rig(2)
    setattr(rig.destination, fault, True)

    result = rig.poll()

    assert (result.status, result.delivered, result.deleted) == ("error", 0, 0)
    assert result.error
    # One message tried, no more: the second is not even recorded.
    assert rig.destination.deliveries == ([] if fault != "full" else ["deliver uid-1"])
    assert set(rig.rows()) == {"uid-1"}
    assert rig.row("uid-1").state is PENDING and rig.row("uid-1").attempts == 0
    # The result agrees with the ledger: no attempt counted, so no failed message; it was not delivered.
    assert (result.failed, result.not_delivered) == (0, 1)
    commands = rig.maildrop.commands
    assert not any(command.startswith("DELE") for command in commands) and commands[-1] == "QUIT"
    assert rig.maildrop.uidls == ["uid-1", "uid-2"] and rig.destination.stored == []
    status = rig.status()
    assert status.last_result == "error" and status.consecutive_failures == 1 and status.last_failed == 0
    shortest, longest = wait
    assert result.next_poll_at is not None
    assert rig.clock.now + shortest <= result.next_poll_at <= rig.clock.now + longest

    setattr(rig.destination, fault, False)
    healed = rig.poll()

    assert (healed.status, healed.delivered, healed.deleted) == ("ok", 2, 2)
    assert rig.destination.uidls == ["uid-1", "uid-2"]
    assert rig.states() == {"uid-1": DELETED, "uid-2": DELETED}


def test_a_drop_charged_to_the_message_is_a_failed_message_in_the_result_as_in_the_ledger(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(2, account=KEEP)
    rig.destination.drop = {"uid-1"}  # the connection drops on uid-1; uid-2 goes in (policies/blame.py)

    result = rig.poll()

    assert rig.row("uid-1").attempts == 1 and rig.destination.uidls == ["uid-2"]
    assert (result.delivered, result.failed, result.not_delivered) == (1, 1, 0)


def test_a_destination_that_fills_up_mid_poll_still_gets_the_deletions_already_earned(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(3)

    def fill_up(call: str) -> None:
        if call == "deliver uid-2":
            rig.destination.full = True

    rig.destination.before = fill_up

    result = rig.poll()

    assert (result.status, result.delivered, result.deleted) == ("error", 1, 1)
    assert rig.destination.deliveries == ["deliver uid-1", "deliver uid-2"]
    assert in_order(rig.maildrop.commands, "DELE 1", "QUIT")
    assert not any(command in ("DELE 2", "DELE 3") for command in rig.maildrop.commands)
    assert rig.states() == {"uid-1": DELETED, "uid-2": PENDING}
    assert rig.row("uid-2").attempts == 0
    assert rig.maildrop.uidls == ["uid-2", "uid-3"]


def test_a_connection_dropped_during_one_delivery_lets_the_poll_go_on_and_charges_the_message(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(2)
    rig.destination.drop = {"uid-1"}

    result = rig.poll()

    assert (result.status, result.delivered) == ("error", 1)
    assert rig.destination.uidls == ["uid-2"]
    assert rig.destination.calls == ["open", "deliver uid-1", "close", "open", "deliver uid-2", "close"]
    # The destination took another message in the same poll: the drop counts as uid-1's attempt.
    row = rig.row("uid-1")
    assert row.state is PENDING and row.attempts == 1
    assert rig.row("uid-2").state is DELETED and rig.maildrop.uidls == ["uid-1"]


# --- several messages in one command ------------------------------------------------------------------------


def wait_for_every_fetch(rig: Rig) -> Callable[[str], None]:
    """A ``before`` hook: the destination's login (opened while the first message is fetched) waits until
    the fetch thread has read every message, so that they are all ready for the first batch (what is ready
    is otherwise up to the threads' timing)."""

    def hook(call: str) -> None:
        if call == "open":
            assert rig.maildrop.sessions[-1].fetched_all.wait(5)

    return hook


def test_a_batch_is_delivered_in_one_command_each_message_recorded_pending_first(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(3, batch=3)
    wait = wait_for_every_fetch(rig)
    at_batch, keep = snapshots(rig, "deliver_many")

    def hook(call: str) -> None:
        wait(call)
        keep(call)

    rig.destination.before = hook

    result = rig.poll()

    assert (result.status, result.delivered, result.deleted) == ("ok", 3, 3)
    # All together: the session was opened (and its batch size known) while they were fetched.
    assert rig.destination.deliveries == ["deliver_many uid-1 uid-2 uid-3"]
    rows = at_batch["deliver_many uid-1 uid-2 uid-3"]
    assert all(rows[uidl].state is PENDING for uidl in ("uid-1", "uid-2", "uid-3"))
    assert rig.destination.uidls == ["uid-1", "uid-2", "uid-3"]
    assert rig.states() == {"uid-1": DELETED, "uid-2": DELETED, "uid-3": DELETED}


def test_a_refused_batch_goes_again_one_message_at_a_time(make_rig: RigFactory) -> None:
    rig = make_rig(3, batch=3)
    rig.destination.before = wait_for_every_fetch(rig)
    rig.destination.refuse = {"uid-3": refused("uid-3")}

    result = rig.poll()

    assert (result.status, result.delivered, result.failed) == ("ok", 2, 1)
    assert rig.destination.deliveries == [
        "deliver_many uid-1 uid-2 uid-3",
        "deliver uid-1",
        "deliver uid-2",
        "deliver uid-3",
    ]
    assert rig.destination.uidls == ["uid-1", "uid-2"]
    assert rig.row("uid-3").state is PENDING and rig.row("uid-3").attempts == 1
    assert rig.states()["uid-2"] is DELETED and rig.maildrop.uidls == ["uid-3"]


# --- catch-all ----------------------------------------------------------------------------------------------


def _catch_all_to_bob_and_carol(make_rig: RigFactory) -> Rig:
    """A catch-all account whose one message is for bob and carol, each a mailbox of its own."""
    routing = {
        "rules": [
            {"match": "bob@example.net", "mailbox": "bob"},
            {"match": "carol@example.net", "mailbox": "carol"},
        ]
    }
    return make_rig(
        [FakeMessage("uid-1", to_recipients(1, "bob@example.net, carol@example.net"))],
        account={"routing": routing},
        destination={"master_username": "master", "master_password": "pw-master-91d2"},
        recipients=["bob", "carol"],
    )


def test_a_catch_all_message_goes_into_each_recipients_mailbox_once(make_rig: RigFactory) -> None:
    rig = _catch_all_to_bob_and_carol(make_rig)

    result = rig.poll()

    assert (result.status, result.deleted) == ("ok", 1)
    assert rig.recipients["bob"].uidls == ["uid-1"] and rig.recipients["carol"].uidls == ["uid-1"]
    assert rig.destination.calls == []  # the account's own destination is not used
    account_id = rig.account_id()
    assert account_id is not None
    assert rig.ledger.recipients.states(account_id, "uid-1") == {
        "bob": RecipientState.DELIVERED,
        "carol": RecipientState.DELIVERED,
    }
    assert rig.row("uid-1").state is DELETED and rig.maildrop.messages == []

    rig.poll()
    assert rig.recipients["bob"].uidls == ["uid-1"] and rig.recipients["carol"].uidls == ["uid-1"]


def test_a_catch_all_message_short_of_one_recipient_stays_in_the_backlog(make_rig: RigFactory) -> None:
    """The backlog counts messages, not recipients: one delivery to bob must not hide that the message
    still waits for carol (the backlog gauge would read 0 for a catch-all account that is stuck)."""
    rig = _catch_all_to_bob_and_carol(make_rig)
    rig.recipients["carol"].refuse["uid-1"] = DestinationRejectedError("carol's mailbox refuses it")

    result = rig.poll()

    assert rig.recipients["bob"].uidls == ["uid-1"] and rig.recipients["carol"].uidls == []
    assert result.delivered == 1 and result.messages_done == 0
    (finished,) = rig.observer.of(Finished)
    assert finished.planned == 1 and finished.backlog == 1


# --- what the POP3 server sends -----------------------------------------------------------------------------


def test_a_message_the_server_refuses_to_send_is_skipped_and_left(make_rig: RigFactory) -> None:
    rig = make_rig(2)
    rig.maildrop.refuse_retr = {"uid-1"}

    result = rig.poll()

    assert (result.status, result.delivered, result.skipped) == ("ok", 1, 1)
    assert any("uid-1" in problem for problem in result.problems)
    assert "uid-1" not in rig.rows() and rig.destination.uidls == ["uid-2"]
    assert rig.maildrop.uidls == ["uid-1"]

    rig.maildrop.refuse_retr.clear()
    later = rig.poll()
    assert later.delivered == 1 and rig.destination.uidls == ["uid-2", "uid-1"]


def test_a_short_retr_is_not_delivered_and_counts_an_attempt(make_rig: RigFactory) -> None:
    rig = make_rig(2, account={"retry": {"max_attempts": 2}})
    rig.maildrop.short_retr = {"uid-1": 0}  # an empty reply to RETR

    first = rig.poll()

    assert (first.delivered, first.failed, first.short_retrs, first.quarantined) == (1, 1, 1, 0)
    assert rig.row("uid-1").state is PENDING and rig.row("uid-1").attempts == 1
    assert rig.destination.uidls == ["uid-2"] and rig.maildrop.uidls == ["uid-1"]

    second = rig.poll()

    assert (second.short_retrs, second.quarantined) == (1, 1)
    assert rig.row("uid-1").state is FAILED and rig.maildrop.uidls == ["uid-1"]
    assert rig.destination.uidls == ["uid-2"]


def test_a_source_connection_lost_mid_poll_deletes_nothing_and_the_next_poll_finishes(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(2)
    rig.maildrop.drop_at = "RETR 2"

    first = rig.poll()

    assert (first.status, first.delivered, first.deleted) == ("error", 1, 0)
    assert rig.row("uid-1").state is DELIVERED and "uid-2" not in rig.rows()
    assert not any(command.startswith(("DELE", "QUIT")) for command in rig.maildrop.commands)
    assert rig.maildrop.uidls == ["uid-1", "uid-2"]

    second = rig.poll()

    assert (second.status, second.delivered, second.deleted) == ("ok", 1, 2)
    assert rig.destination.uidls == ["uid-1", "uid-2"]
    assert rig.states() == {"uid-1": DELETED, "uid-2": DELETED} and rig.maildrop.messages == []


def test_a_quit_that_is_not_answered_records_no_deletion(make_rig: RigFactory) -> None:
    rig = make_rig(1)
    rig.maildrop.drop_at = "QUIT"

    first = rig.poll()

    assert (first.status, first.delivered, first.deleted) == ("error", 1, 0)
    assert "DELE 1" in rig.maildrop.commands
    assert rig.row("uid-1").state is DELIVERED and rig.maildrop.uidls == ["uid-1"]

    second = rig.poll()

    assert (second.status, second.delivered, second.deleted) == ("ok", 0, 1)
    assert rig.row("uid-1").state is DELETED and rig.destination.uidls == ["uid-1"]


def test_an_expire_0_server_with_an_undelivered_message_gets_no_quit(make_rig: RigFactory) -> None:
    rig = make_rig(2, capabilities=["UIDL", "TOP", "EXPIRE 0"])
    rig.destination.refuse = {"uid-2": refused("uid-2")}
    timeline: list[str] = []
    rig.maildrop.on_command = lambda line: timeline.append(f"pop {line}")
    rig.destination.before = lambda call: timeline.append(f"destination {call}")

    result = rig.poll()

    # Fetched one at a time, never ahead of the delivery (what is retrieved is gone at QUIT).
    assert in_order(
        timeline, "pop RETR 1", "destination deliver uid-1", "pop RETR 2", "destination deliver uid-2"
    )
    assert "QUIT" not in rig.maildrop.commands
    assert any("EXPIRE 0" in problem for problem in result.problems)
    assert result.deleted == 0 and rig.maildrop.uidls == ["uid-1", "uid-2"]
    assert rig.row("uid-1").state is DELIVERED and rig.row("uid-2").state is PENDING


def test_an_expire_0_server_gets_quit_once_everything_retrieved_is_delivered(make_rig: RigFactory) -> None:
    rig = make_rig(2, capabilities=["UIDL", "TOP", "EXPIRE 0"])

    result = rig.poll()

    assert (result.status, result.delivered, result.deleted) == ("ok", 2, 2)
    assert rig.maildrop.commands[-1] == "QUIT" and rig.maildrop.messages == []


def test_login_delay_is_respected_by_the_next_poll(make_rig: RigFactory) -> None:
    rig = make_rig(1, capabilities=["UIDL", "TOP", "LOGIN-DELAY 3600"])

    result = rig.poll()

    assert result.status == "ok"
    assert result.next_poll_at == rig.clock.now + timedelta(hours=1)  # not poll_interval (5 minutes)
    assert rig.status().next_poll_at == rig.clock.now + timedelta(hours=1)


def test_a_login_refused_with_login_delay_waits_that_long(make_rig: RigFactory) -> None:
    rig = make_rig(1)
    refusal = SourceLoginDelayError("pop.fake.example:110: PASS failed: -ERR [LOGIN-DELAY] wait")
    refusal.login_delay = 1800
    rig.maildrop.refuse_login = refusal

    result = rig.poll()

    assert result.status == "error" and result.next_poll_at == rig.clock.now + timedelta(minutes=30)


def test_a_malformed_listing_line_leaves_that_message_and_delivers_the_others(make_rig: RigFactory) -> None:
    rig = make_rig(3)
    rig.maildrop.garbled = {"uid-2"}

    result = rig.poll()

    assert (result.status, result.delivered, result.unidentified) == ("ok", 2, 1)
    assert any("left on the server" in problem for problem in result.problems)
    assert rig.destination.uidls == ["uid-1", "uid-3"] and "uid-2" not in rig.rows()
    assert rig.maildrop.uidls == ["uid-2"]


def test_a_server_without_uidl_has_its_messages_identified_by_their_headers(make_rig: RigFactory) -> None:
    rig = make_rig(2)
    rig.maildrop.no_uidl = True

    result = rig.poll()

    assert (result.status, result.delivered, result.deleted) == ("ok", 2, 2)
    assert "TOP 1 0" in rig.maildrop.commands and "TOP 2 0" in rig.maildrop.commands
    assert len(rig.rows()) == 2 and all(uidl.startswith("hdr:") for uidl in rig.rows())
    assert [original(stored) for stored in rig.destination.stored] == [simple(1), simple(2)]


def test_two_messages_listed_under_one_uidl_are_each_delivered_once(make_rig: RigFactory) -> None:
    rig = make_rig([FakeMessage("uid-1", simple(1)), FakeMessage("uid-1", simple(2))], account=KEEP)

    first, second = rig.poll(), rig.poll()

    assert (first.delivered, second.delivered) == (2, 0)
    assert sorted(original(stored) for stored in rig.destination.stored) == [simple(1), simple(2)]
    assert len(rig.rows()) == 2 and set(rig.states().values()) == {DELIVERED}


def test_a_uidl_reused_for_a_message_with_other_headers_is_delivered_as_new(make_rig: RigFactory) -> None:
    rig = make_rig(1, account={"retention": {"mode": "days", "days": 2}})
    rig.poll()
    # The server gave the UIDL of the delivered message to another one (RFC 1939 allows it once it is gone).
    rig.maildrop.messages = [FakeMessage("uid-1", simple(7))]
    rig.clock.advance(timedelta(days=3))
    calls_before = len(rig.destination.calls)

    result = rig.poll()

    assert (result.status, result.delivered, result.deleted) == ("ok", 1, 0)
    assert not any(command.startswith("DELE") for command in commands_of_last_session(rig))
    assert in_order(rig.destination.calls[calls_before:], "find uid-1", "deliver uid-1")
    first, second = rig.destination.stored
    assert (original(first), original(second)) == (simple(1), simple(7))
    assert rig.row("uid-1").state is DELIVERED and rig.row("uid-1").sha256 == second.sha256
    assert rig.maildrop.uidls == ["uid-1"]


def test_an_empty_listing_forgets_nothing(make_rig: RigFactory) -> None:
    rig = make_rig(2, account=KEEP)
    rig.poll()
    kept = rig.maildrop.messages
    rig.maildrop.messages = []  # a locked or half-mounted maildrop lists nothing
    rig.clock.advance(timedelta(days=2))  # longer than forget_missing_after (24 hours)

    result = rig.poll()

    assert result.status == "ok" and any("nothing is forgotten" in problem for problem in result.problems)
    assert rig.states() == {"uid-1": DELIVERED, "uid-2": DELIVERED}
    assert all(row.missing_polls == 0 for row in rig.rows().values())  # not counted as a poll missing
    assert rig.status().listing_note

    rig.maildrop.messages = kept
    back = rig.poll()

    assert (back.delivered, back.deleted) == (0, 0) and rig.destination.uidls == ["uid-1", "uid-2"]
    assert all(row.missing_since is None for row in rig.rows().values())


def test_a_message_over_max_message_size_is_quarantined_without_being_fetched(make_rig: RigFactory) -> None:
    rig = make_rig(
        [FakeMessage("uid-1", simple(1, size=8000)), FakeMessage("uid-2", simple(2))],
        account={"max_message_size": "4KB"},
    )

    result = rig.poll()

    assert (result.delivered, result.quarantined) == (1, 1)
    assert "RETR 1" not in rig.maildrop.commands
    assert rig.row("uid-1").state is FAILED and rig.maildrop.uidls == ["uid-1"]
    assert rig.destination.uidls == ["uid-2"]


# --- the poll as a whole ------------------------------------------------------------------------------------


def test_a_suspended_account_is_not_polled(make_rig: RigFactory) -> None:
    rig = make_rig(1)
    account_id = rig.ledger.account_id("alice")
    assert account_id is not None
    rig.ledger.suspensions.suspend(account_id, "50 consecutive failed polls")

    result = rig.poll()

    assert result.status == "suspended" and "pop-connector resume alice" in (result.error or "")
    assert rig.maildrop.sessions == [] and rig.destination.calls == []
    assert result.next_poll_at == rig.clock.now + timedelta(minutes=5)
    assert rig.rows() == {}


def test_a_stop_request_ends_the_poll_after_the_current_message(make_rig: RigFactory) -> None:
    rig = make_rig(3)
    stop = threading.Event()
    rig.destination.before = lambda call: stop.set() if call == "deliver uid-1" else None

    result = rig.poll(stop=stop)

    assert (result.status, result.delivered, result.deleted) == ("stopped", 1, 1)
    assert result.ok
    assert rig.destination.uidls == ["uid-1"] and set(rig.rows()) == {"uid-1"}
    assert rig.maildrop.commands[-1] == "QUIT" and rig.maildrop.uidls == ["uid-2", "uid-3"]


def test_a_dry_run_changes_nothing_and_reports_nothing(make_rig: RigFactory) -> None:
    rig = make_rig(1, account=KEEP)
    rig.poll()
    rig.maildrop.messages.append(FakeMessage("uid-2", simple(2)))
    rows, status = rig.rows(), rig.status()
    rig.observer.clear()

    result = rig.poll(dry_run=True)

    assert result.plan is not None and [d.info.uidl for d in result.plan.deliver] == ["uid-2"]
    assert not any(c.startswith(("RETR", "DELE", "TOP")) for c in commands_of_last_session(rig))
    assert rig.rows() == rows and rig.status() == status
    assert rig.destination.uidls == ["uid-1"] and rig.maildrop.uidls == ["uid-1", "uid-2"]
    assert rig.observer.events == []


def test_a_dry_run_of_an_account_never_polled_creates_nothing(make_rig: RigFactory) -> None:
    rig = make_rig(2)

    result = rig.poll(dry_run=True)

    assert result.plan is not None and result.plan.new_count == 2
    assert rig.ledger.statuses() == [] and rig.destination.calls == []


# --- events -------------------------------------------------------------------------------------------------


def test_a_poll_emits_started_planned_finished_in_order_with_its_counts(make_rig: RigFactory) -> None:
    rig = make_rig(2)
    size = sum(len(message.data) for message in rig.maildrop.messages)

    result = rig.poll()

    assert rig.observer.names(*LIFECYCLE) == ["Started", "Planned", "Finished"]
    assert_lifecycle(rig.observer, result, messages=2, size=size, to_delete=0)

    rig.observer.clear()
    idle = rig.poll()
    assert_lifecycle(rig.observer, idle, messages=0, size=0, to_delete=0)


def test_a_poll_that_fails_before_its_plan_emits_no_planned(make_rig: RigFactory) -> None:
    rig = make_rig(1)
    rig.maildrop.refuse_login = SourceAuthError(
        "pop.fake.example:110: PASS failed: -ERR [AUTH] wrong password"
    )

    result = rig.poll()

    assert result.status == "auth_error"
    assert rig.observer.names(*LIFECYCLE) == ["Started", "Finished"]
    started, finished = lifecycle(rig.observer)
    assert started == Started("alice")
    assert isinstance(finished, Finished) and finished.planned is None and finished.result is result


def test_an_observer_that_fails_does_not_break_the_poll(make_rig: RigFactory) -> None:
    class Broken:
        def notify(self, event: PollEvent) -> None:
            raise RuntimeError("observer bug")

    rig = make_rig(1)
    rig.extra_observers.append(Broken())

    result = rig.poll()

    assert (result.status, result.delivered, result.deleted) == ("ok", 1, 1)
    assert rig.observer.names(*LIFECYCLE) == ["Started", "Planned", "Finished"]


def test_each_step_of_a_message_is_an_event_after_the_fact(make_rig: RigFactory) -> None:
    rig = make_rig(3, account={"retry": {"max_attempts": 1}})
    rig.destination.refuse = {"uid-2": refused("uid-2")}
    size = {message.uidl: len(message.data) for message in rig.maildrop.messages}

    rig.poll()

    kinds = (Fetched, Delivered, Recovered, Failed, Quarantined, Deleted)
    events = rig.observer.of(*kinds)
    by_uidl = [(type(event).__name__, getattr(event, "uidl", None)) for event in events]
    assert by_uidl == [
        ("Fetched", "uid-1"),
        ("Delivered", "uid-1"),
        ("Fetched", "uid-2"),
        ("Quarantined", "uid-2"),  # max_attempts 1: the refusal used the only attempt
        ("Failed", "uid-2"),
        ("Fetched", "uid-3"),
        ("Delivered", "uid-3"),
        ("Deleted", None),
    ]
    fetched = events[0]
    assert isinstance(fetched, Fetched) and fetched.size == size["uid-1"]
    delivered = events[1]
    [stored, _] = rig.destination.stored
    assert isinstance(delivered, Delivered)
    assert (delivered.size, delivered.sha256, delivered.mailbox) == (len(stored.data), stored.sha256, None)
    failed = events[4]
    assert isinstance(failed, Failed) and failed.counted and "uid-2" not in rig.destination.uidls
    assert events[-1] == Deleted("alice", ("uid-1", "uid-3"))


def test_a_recovery_is_an_event_and_so_is_an_attempt_given_back(make_rig: RigFactory) -> None:
    rig = make_rig(1)
    rig.destination.lose_answer = {"uid-1"}
    rig.poll()
    [failed] = rig.observer.of(Failed)
    assert isinstance(failed, Failed) and failed.uidl == "uid-1" and not failed.counted

    rig.observer.clear()
    rig.poll()
    [recovered] = rig.observer.of(Recovered)
    assert isinstance(recovered, Recovered) and recovered.uidl == "uid-1" and recovered.ref
    assert rig.observer.of(Delivered) == []


def test_every_log_line_about_a_message_carries_its_uidl(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Repairs are logged by the poll's thread while the fetch thread is already reading the next messages:
    # such a line used to carry the UIDL of another message.
    rig = make_rig(6)
    rig.maildrop.repaired = {message.uidl for message in rig.maildrop.messages}
    caplog.handler.addFilter(ContextFilter())  # what the configured handlers put on each line
    caplog.set_level(logging.DEBUG)

    rig.poll()

    lines = [
        (record.getMessage(), record) for record in caplog.records if record.name.startswith("connector.")
    ]
    repaired = [(text, record) for text, record in lines if "repaired" in text]
    assert len(repaired) == 6
    for text, record in lines:
        named = set(re.findall(r"uid-\d+", text))
        assert getattr(record, "account", None) == "alice", text
        if len(named) == 1:
            assert getattr(record, "uidl", None) in named, (text, getattr(record, "uidl", None))
