"""The poll's record of each message: its ledger writes, its counts in ``PollResult`` and its events.

Every step of a message that the ledger must know goes through one method here, which writes the ledger
first, then counts and reports what the write made true (events are facts: a ``Delivered`` is emitted after
the delivered row is written). The delivery strategies and the listing phase call it; none of them
writes the ledger's message rows or the result's counts themselves.

Ledger order per message (README, "How delivery stays exactly-once"): ``pending`` (committed, one attempt
counted) -> deliver -> ``delivered`` (deferred: it commits with the next message's ``pending`` or the
flush before the DELEs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime

from connector.config import Account
from connector.errors import AuthenticationError, ConnectorError, DestinationRejectedError
from connector.ledger.records import JournalEntry, MessageState, PendingMessage
from connector.ledger.store import Ledger
from connector.message import FetchedMessage
from connector.ops.logs import about_message
from connector.policies.failures import Backoff, Charge, backoff
from connector.policies.repair import describe_long_lines
from connector.poll.deletions import Deletions
from connector.poll.events import Delivered, Failed, Observers, Quarantined, Recovered
from connector.poll.result import PollResult
from connector.pop3 import MessageInfo

log = logging.getLogger("connector.poll.recorder")


def error_text(exc: BaseException) -> str:
    """What is kept of an error in the ledger and the result (``ConnectorError`` text is redacted)."""
    return (exc.message if isinstance(exc, ConnectorError) else str(exc)) or exc.__class__.__name__


class Recorder:
    def __init__(
        self,
        ledger: Ledger,
        account: Account,
        account_id: int,
        result: PollResult,
        observers: Observers,
        deletions: Deletions,
        started_at: datetime,
    ) -> None:
        self.ledger = ledger
        # Journal rows name the poll by the time it started.
        self._started_at = started_at
        self._deletions = deletions
        self.account = account
        self.account_id = account_id
        self.result = result
        self._observers = observers
        self._max_attempts = account.retry.max_attempts

    # --- the poll ------------------------------------------------------------------------------------

    def problem(self, text: str) -> None:
        """Something a person should know about this poll: shown in the sync summary and logged."""
        self.result.problems.append(text)
        log.warning("account %s: %s", self.account.name, text)

    def poll_failed(self, exc: BaseException, text: str) -> None:
        """The poll fails (it may go on with other messages); the first failure's text is the poll's error,
        the most severe one decides the back-off (policies/failures.py)."""
        if isinstance(exc, AuthenticationError):
            self.result.status = "auth_error"
        elif self.result.status != "auth_error":
            self.result.status = "error"
        self.result.error = self.result.error or text
        if backoff(exc) is Backoff.PERSON:
            self.result.backoff = Backoff.PERSON

    # --- one message ---------------------------------------------------------------------------------

    def replace_row(self, uidl: str) -> None:
        """Forget the row of an earlier message that had this UIDL (policies/listing.py): only once its
        successor is fetched, so that a crash before it is recorded leaves the row to look for again."""
        self.ledger.prune(self.account_id, [uidl])

    def pending(self, fetched: FetchedMessage, info: MessageInfo, *, headers_only: bool) -> None:
        """About to hand the message to the destination: committed, with one attempt counted."""
        self.batch_pending([(fetched, info)], headers_only=headers_only)

    def batch_pending(
        self, pairs: Sequence[tuple[FetchedMessage, MessageInfo]], *, headers_only: bool = False
    ) -> None:
        """``pending`` for the messages of one destination command, in one transaction (one commit)."""
        self.ledger.record_batch_pending(
            self.account_id, [_pending(fetched, info, headers_only) for fetched, info in pairs]
        )
        for fetched, info in pairs:
            self._log_fetched(fetched, info)

    def _log_fetched(self, fetched: FetchedMessage, info: MessageInfo) -> None:
        with about_message(info.uidl):
            if fetched.repairs:
                log.info("account %s: message %s repaired: %s", self.account.name, info.uidl, fetched.repairs)
            if fetched.long_lines:
                log.debug(
                    "account %s: message %s: %s",
                    self.account.name,
                    info.uidl,
                    describe_long_lines(fetched.long_lines),
                )

    def delivered(self, fetched: FetchedMessage, info: MessageInfo, ref: str) -> None:
        """The destination took the message. Deferred: committed with the next message's ``pending``, and
        always before a DELE (connector/poll/deletions.py), which the retention may now allow."""
        self._record_delivered(fetched, info, ref, recovered=False)
        self.result.delivered += 1
        self.result.messages_done += 1
        event = Delivered(self.account.name, info.uidl, fetched.size, fetched.sha256, ref)
        self._emit_about(info.uidl, event)

    def recovered(self, fetched: FetchedMessage, info: MessageInfo, ref: str, *, headers_only: bool) -> None:
        """An earlier, interrupted attempt had delivered the message: recorded, not delivered again."""
        self.pending(fetched, info, headers_only=headers_only)
        self._record_delivered(fetched, info, ref, recovered=True)
        self.result.recovered += 1
        self.result.messages_done += 1
        self._emit_about(info.uidl, Recovered(self.account.name, info.uidl, ref))

    def _record_delivered(
        self, fetched: FetchedMessage, info: MessageInfo, ref: str, *, recovered: bool
    ) -> None:
        """The ``delivered`` record with its journal row (deferred), then the retention's DELE."""
        journal = self._journal(fetched, ref, recovered=recovered)
        delivered_at = self.ledger.record_delivered(
            self.account_id, info.uidl, ref, defer=True, journal=journal
        )
        self._deletions.delivered(info, delivered_at)

    def quarantine(self, uidl: str, reason: str) -> None:
        """Give up on a message with a row: it stays on the server until `quarantine retry`."""
        self.ledger.record_quarantined(self.account_id, uidl, reason)
        self._quarantined(uidl, reason)

    def quarantine_unfetched(self, uidl: str, pop_size: int, reason: str) -> None:
        """Give up on a message that has no complete copy here (over max_message_size, or a runaway
        reply); it may have no ledger row yet."""
        self.ledger.record_skipped(self.account_id, uidl, pop_size, reason)
        self._quarantined(uidl, reason)

    def not_fetched(self, info: MessageInfo, exc: ConnectorError) -> None:
        """The server refused the message's RETR (a temporary ``-ERR``): no attempt; a later poll retries."""
        self.result.skipped += 1
        self._emit_about(info.uidl, Failed(self.account.name, info.uidl, exc.message, counted=False))
        self.problem(f"message {info.uidl!r}: cannot retrieve it: {exc.message}")

    def fetched_wrong(self, info: MessageInfo, exc: ConnectorError) -> None:
        """The server sent something that is not the message (policies/sizes.py): permanent for the
        message as the server stores it now, so it costs an attempt; nothing is delivered or deleted."""
        state = self.ledger.record_fetch_failure(
            self.account_id, info.uidl, info.size, exc.message, max_attempts=self._max_attempts
        )
        self.result.failed += 1
        self.result.short_retrs += 1
        self._emit_about(info.uidl, Failed(self.account.name, info.uidl, exc.message, counted=True))
        if state is MessageState.FAILED:
            self._quarantined(info.uidl, f"out of attempts: {exc.message}", problem=False)
            self.problem(f"message {info.uidl!r}: quarantined, out of attempts: {exc.message}")
        else:
            self.problem(f"message {info.uidl!r}: {exc.message}; retried at the next poll")

    def failed(
        self,
        uidl: str,
        exc: BaseException,
        charge: Charge,
        *,
        recorded: bool,
        mailbox: str | None = None,
        fails_poll: bool = True,
    ) -> None:
        """Delivering (or looking up) the message failed. ``recorded``: it was recorded ``pending`` for
        this delivery, with an attempt that ``charge`` keeps, gives back, or turns into quarantine."""
        text = error_text(exc)
        if recorded and charge is Charge.QUARANTINE:
            self.ledger.record_quarantined(self.account_id, uidl, text)
            self._quarantined(uidl, text, problem=False)
        elif recorded:
            state = self.ledger.record_failure(
                self.account_id,
                uidl,
                text,
                counted=charge is Charge.ATTEMPT,
                max_attempts=self._max_attempts,
            )
            if state is MessageState.FAILED:
                self._quarantined(uidl, text, problem=False)
        # ``failed`` counts what the ledger counted (an attempt, or quarantine); the rest waits for the
        # next poll as it was, and the sync summary must not call it a failed message.
        counted = recorded and charge is not Charge.NONE
        if counted:
            self.result.failed += 1
        else:
            self.result.not_delivered += 1
        self._emit_about(uidl, Failed(self.account.name, uidl, text, counted=counted, mailbox=mailbox))
        # A refusal of one message is that message's: the destination works, the poll does not fail.
        if fails_poll and isinstance(exc, ConnectorError) and not isinstance(exc, DestinationRejectedError):
            self.poll_failed(exc, text)
        recipient = f" for {mailbox}" if mailbox is not None else ""
        self.problem(f"message {uidl!r}{recipient}: {text}")

    def charge_drop(self, uidl: str, error: str) -> None:
        """Count the attempt that a dropped connection was given back: the destination took other mail in
        this poll, so the drop looks like the message's doing (policies/blame.py)."""
        reason = (
            f"the destination dropped the connection while this message was being delivered, and took other "
            f"messages in the same poll (counted as a failed attempt): {error}"
        )
        state = self.ledger.count_failed_attempt(
            self.account_id, uidl, reason, max_attempts=self._max_attempts
        )
        # ``failed`` left it uncounted a moment ago: now the ledger counts it.
        self.result.not_delivered -= 1
        self.result.failed += 1
        if state is MessageState.FAILED:
            self._quarantined(uidl, reason, problem=False)
            self.problem(f"message {uidl!r}: quarantined after {self._max_attempts} attempts: {reason}")

    def attempt_given_back(self, uidls: Iterable[str], reason: str) -> None:
        """Messages recorded ``pending`` whose delivery was not tried after all: no attempt is theirs."""
        for uidl in uidls:
            self.ledger.record_failure(
                self.account_id, uidl, reason, counted=False, max_attempts=self._max_attempts
            )

    # --- catch-all recipients ------------------------------------------------------------------------

    def routed(self, info: MessageInfo, mailboxes: Iterable[str]) -> None:
        """Every recipient of a catch-all message has it: the message itself is delivered."""
        ref = "routed to " + ", ".join(mailboxes)
        delivered_at = self.ledger.record_delivered(self.account_id, info.uidl, ref, defer=True)
        self.result.messages_done += 1
        self._deletions.delivered(info, delivered_at)

    def recipient_pending(self, uidl: str, mailbox: str) -> None:
        self.ledger.recipients.record_pending(self.account_id, uidl, mailbox)

    def recipient_delivered(self, fetched: FetchedMessage, uidl: str, mailbox: str, ref: str) -> None:
        journal = self._journal(fetched, ref, recipient=mailbox)
        self.ledger.recipients.record_delivered(self.account_id, uidl, mailbox, ref, journal=journal)
        self.result.delivered += 1
        event = Delivered(self.account.name, uidl, fetched.size, fetched.sha256, ref, mailbox=mailbox)
        self._emit_about(uidl, event)

    def recipient_recovered(self, fetched: FetchedMessage, uidl: str, mailbox: str, ref: str) -> None:
        journal = self._journal(fetched, ref, recipient=mailbox, recovered=True)
        self.ledger.recipients.record_delivered(self.account_id, uidl, mailbox, ref, journal=journal)
        self.result.recovered += 1
        self._emit_about(uidl, Recovered(self.account.name, uidl, ref, mailbox=mailbox))

    def _journal(
        self, fetched: FetchedMessage, ref: str, *, recipient: str | None = None, recovered: bool = False
    ) -> JournalEntry:
        return JournalEntry(
            uidl=fetched.uidl,
            message_id=fetched.message_id,
            size=fetched.size,
            sha256=fetched.sha256,
            ref=ref,
            poll_started_at=self._started_at,
            recipient=recipient,
            recovered=recovered,
            stamp=fetched.stamp,
        )

    # --- events --------------------------------------------------------------------------------------

    def _quarantined(self, uidl: str, reason: str, *, problem: bool = True) -> None:
        self.result.quarantined += 1
        self._emit_about(uidl, Quarantined(self.account.name, uidl, reason))
        if problem:
            self.problem(f"message {uidl!r}: quarantined: {reason}")

    def _emit_about(self, uidl: str, event: Delivered | Recovered | Failed | Quarantined) -> None:
        with about_message(uidl):  # what observers log is about this message
            self._observers.emit(event)


def _pending(fetched: FetchedMessage, info: MessageInfo, headers_only: bool) -> PendingMessage:
    return PendingMessage(
        info.uidl,
        pop_size=info.size,
        size=fetched.size,
        message_id=fetched.message_id,
        sha256=fetched.sha256,
        headers_only=headers_only,
        header_hash=fetched.header_sha256,
        repairs=fetched.repairs,
    )
