"""Catch-all (multidrop) delivery: one fetched message into each local mailbox its routing names, once.

The ledger keeps a row per (message, recipient mailbox) (``connector/ledger/recipients.py``):

    RETR -> route -> record the message ``pending`` -> for each recipient not yet delivered:
    record the recipient ``pending`` (commit) -> deliver into its mailbox -> record it ``delivered`` (commit)
    -> when every recipient is delivered: record the message ``delivered`` -> DELE per retention.

A recipient found ``pending`` by a later poll may have been delivered before a crash: its mailbox is
searched (Message-ID, size, SHA-256) before delivering again, exactly as for single deliveries. The POP3
message is DELEted only once all its recipients are recorded. ``RoutedDelivery`` is mixed into the engine's
per-poll state; ``DestinationPool`` keeps the sessions of one poll, one per recipient mailbox.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from connector.config import Account
from connector.destinations.base import DestinationSession, look_up
from connector.ledger.records import RecipientState
from connector.ledger.store import Ledger
from connector.message import HEADER_PARSE_LIMIT, FetchedMessage
from connector.ops.protocol_log import protocol_note
from connector.policies.routing import route
from connector.poll.plan import Delivery
from connector.pop3 import MessageInfo

log = logging.getLogger("connector.poll.multidrop")

DestinationAction = Callable[[DestinationSession], "str | None"]
# Sessions kept open at once in one poll; a domain's mail for more mailboxes logs the oldest out.
SESSION_LIMIT = 8


def header_section(fetched: FetchedMessage, limit: int = 2 * HEADER_PARSE_LIMIT) -> bytes:
    """The message's header section (through the blank line), read from its spool, at most ``limit``."""
    data = bytearray()
    for chunk in fetched.chunks():
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(data[: end + 4])
        if len(data) >= limit:
            break
    return bytes(data[:limit])


class DestinationPool:
    """The destination sessions of one poll: the account's own (key None) or one per recipient mailbox,
    at most ``limit`` open at once (the least recently used is logged out)."""

    def __init__(self, open_session: Callable[[str | None], DestinationSession], limit: int = SESSION_LIMIT):
        self._open = open_session
        self._limit = limit
        self._sessions: OrderedDict[str | None, DestinationSession] = OrderedDict()
        # Recipient mailboxes that cannot take mail in this poll (over quota, busy): left out until the next.
        self._held: set[str] = set()

    def get(self, mailbox: str | None = None) -> DestinationSession:
        session = self._sessions.get(mailbox)
        if session is not None:
            self._sessions.move_to_end(mailbox)
            return session
        while len(self._sessions) >= self._limit:
            _close_quietly(self._sessions.popitem(last=False)[1])
        session = self._sessions[mailbox] = self._open(mailbox)
        return session

    def opened(self, mailbox: str | None = None) -> DestinationSession | None:
        """The session for ``mailbox`` if one is open (without opening one)."""
        return self._sessions.get(mailbox)

    def hold(self, mailbox: str) -> None:
        """Leave ``mailbox`` out for the rest of the poll."""
        self._held.add(mailbox)
        self.discard(mailbox)

    def held(self, mailbox: str) -> bool:
        return mailbox in self._held

    def discard(self, mailbox: str | None) -> None:
        """Close the session for ``mailbox`` (broken, or no longer wanted); the next ``get`` opens another."""
        session = self._sessions.pop(mailbox, None)
        if session is not None:
            _close_quietly(session)

    def close_all(self) -> None:
        while self._sessions:
            _close_quietly(self._sessions.popitem(last=False)[1])


def _close_quietly(session: DestinationSession) -> None:
    try:
        session.close()
    except Exception:  # closing a broken connection must not hide the poll's real result
        log.debug("error closing a destination session", exc_info=True)


class RoutedDelivery:
    """Delivery of one message of a catch-all account to each recipient; mixed into the engine's ``_Poll``,
    which provides the attributes and the steps declared here."""

    ledger: Ledger
    account: Account
    account_id: int
    destinations: DestinationPool

    def _record_pending(self, fetched: FetchedMessage, info: MessageInfo, *, headers_only: bool) -> None:
        raise NotImplementedError

    def _call_destination(
        self,
        fetched: FetchedMessage,
        action: DestinationAction,
        *,
        counted: bool,
        pending: bool,
        mailbox: str | None = None,
    ) -> str | None:
        raise NotImplementedError

    def _delivered(self, info: MessageInfo, ref: str) -> None:
        raise NotImplementedError

    def _quarantine(self, info: MessageInfo, reason: str) -> None:
        raise NotImplementedError

    def _count(self, *, recovered: bool) -> None:
        raise NotImplementedError

    def _deliver_routed(self, fetched: FetchedMessage, delivery: Delivery) -> None:
        assert self.account.routing is not None
        info = delivery.info
        decision = route(header_section(fetched), self.account.routing)
        if not decision.routed:
            self._record_pending(fetched, info, headers_only=delivery.headers_only)
            self._quarantine(
                info,
                f"no routing rule matches ({', '.join(self.account.routing.headers)}) "
                "and there is no default mailbox; left on the server",
            )
            return
        log.info("account %s: message %s goes to %s", self.account.name, info.uidl, decision.describe())
        missing = self._missing(fetched, info, decision.mailboxes, recover=delivery.recover)
        if missing and delivery.attempts >= self.account.retry.max_attempts:
            self._quarantine(info, f"gave up after {delivery.attempts} attempts; the last one did not finish")
            return
        # A recipient whose mailbox could not take mail earlier in this poll waits for the next one.
        ready = [mailbox for mailbox in missing if not self.destinations.held(mailbox)]
        if ready:
            self._record_pending(fetched, info, headers_only=delivery.headers_only)
        # A list, not a generator: one recipient's server refusing the message must not cost the others.
        delivered_all = all([self._deliver_to(fetched, info, mailbox) for mailbox in ready])
        if len(ready) < len(missing):
            self._held_back(info, [mailbox for mailbox in missing if mailbox not in ready], tried=bool(ready))
        elif delivered_all:
            self._delivered(info, "routed to " + ", ".join(decision.mailboxes))

    def _held_back(self, info: MessageInfo, held: list[str], *, tried: bool) -> None:
        """Not delivered to ``held`` in this poll: the message stays, to be delivered to them later."""
        log.info(
            "account %s: message %s waits for the next poll for %s (could not take mail in this poll)",
            self.account.name, info.uidl, ", ".join(held),
        )  # fmt: skip
        if tried:  # the attempt counted for the others is not this message's fault for these
            self.ledger.record_failure(
                self.account_id,
                info.uidl,
                f"not delivered to {', '.join(held)}: could not take mail in this poll",
                counted=False,
                max_attempts=self.account.retry.max_attempts,
            )

    def _missing(
        self, fetched: FetchedMessage, info: MessageInfo, mailboxes: list[str], *, recover: bool
    ) -> list[str]:
        """The recipients still to deliver to; a ``pending`` one found in its mailbox is recorded instead,
        and with ``recover`` (the message's identity is in doubt: it may have been delivered under a row
        the ledger no longer has) so is one the ledger knows nothing about."""
        states = self.ledger.recipients.states(self.account_id, info.uidl)
        missing = []
        for mailbox in mailboxes:
            state = states.get(mailbox)
            if state is RecipientState.DELIVERED:
                continue
            doubtful = state is RecipientState.PENDING or (state is None and recover)
            if doubtful and not self.destinations.held(mailbox) and self._found(fetched, info, mailbox):
                continue
            missing.append(mailbox)
        return missing

    def _found(self, fetched: FetchedMessage, info: MessageInfo, mailbox: str) -> bool:
        ref = self._call_destination(
            fetched, lambda dest: look_up(dest, fetched), counted=False, pending=False, mailbox=mailbox
        )
        if ref is None:
            return False
        log.info(
            "account %s: message %s was already delivered to %s (%s); recorded it",
            self.account.name, info.uidl, mailbox, ref,
        )  # fmt: skip
        self.ledger.recipients.record_delivered(self.account_id, info.uidl, mailbox, ref)
        self._count(recovered=True)
        return True

    def _deliver_to(self, fetched: FetchedMessage, info: MessageInfo, mailbox: str) -> bool:
        self.ledger.recipients.record_pending(self.account_id, info.uidl, mailbox)
        ref = self._call_destination(
            fetched, lambda dest: dest.deliver(fetched), counted=True, pending=True, mailbox=mailbox
        )
        if ref is None:
            return False
        self.ledger.recipients.record_delivered(self.account_id, info.uidl, mailbox, ref)
        self._count(recovered=False)
        protocol_note("delivered %s to %s: %d bytes, sha256 %s -> %s", info.uidl, mailbox, fetched.size,
                      fetched.sha256, ref)  # fmt: skip
        log.info(
            "account %s: message %s delivered (%d bytes) to %s: %s",
            self.account.name, info.uidl, fetched.size, mailbox, ref,
        )  # fmt: skip
        return True
