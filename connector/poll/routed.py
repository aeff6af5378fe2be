"""Catch-all (multidrop) delivery: one fetched message into each local mailbox its routing names, once.

The ledger keeps a row per (message, recipient mailbox) (``connector/ledger/recipients.py``):

    RETR -> route -> record the message ``pending`` -> for each recipient not yet delivered:
    record the recipient ``pending`` (commit) -> deliver into its mailbox -> record it ``delivered`` (commit)
    -> when every recipient is delivered: record the message ``delivered`` -> DELE per retention.

A recipient found ``pending`` by a later poll may have been delivered before a crash: its mailbox is
searched (the stamp, else Message-ID, size and SHA-256) before delivering again, exactly as for single
deliveries. The POP3 message is DELEted only once all its recipients are recorded. A recipient mailbox that
cannot take mail in this poll is held (``DestinationPool.hold``): its part waits for a later poll.
"""

from __future__ import annotations

import logging

from connector.config import RoutingPolicy
from connector.ledger.records import RecipientState
from connector.message import FetchedMessage, spooled_header_section
from connector.policies.routing import route
from connector.poll.destination import Destinations
from connector.poll.plan import Delivery
from connector.poll.recorder import Recorder
from connector.pop3 import MessageInfo

log = logging.getLogger("connector.poll.routed")


class RoutedDelivery:
    def __init__(self, recorder: Recorder, destinations: Destinations, routing: RoutingPolicy) -> None:
        self._recorder = recorder
        self._destinations = destinations
        self._routing = routing
        self._account = recorder.account.name
        self._max_attempts = recorder.account.retry.max_attempts

    def deliver(self, fetched: FetchedMessage, delivery: Delivery) -> None:
        info, recorder = delivery.info, self._recorder
        decision = route(spooled_header_section(fetched), self._routing)
        if not decision.routed:
            recorder.pending(fetched, info, headers_only=delivery.headers_only)
            recorder.quarantine(
                info.uidl,
                f"no routing rule matches ({', '.join(self._routing.headers)}) "
                "and there is no default mailbox; left on the server",
            )
            return
        log.info("account %s: message %s goes to %s", self._account, info.uidl, decision.describe())
        missing = self._missing(fetched, info, decision.mailboxes, recover=delivery.recover)
        if missing and delivery.attempts >= self._max_attempts:
            recorder.quarantine(
                info.uidl, f"gave up after {delivery.attempts} attempts; the last one did not finish"
            )
            return
        # A recipient whose mailbox could not take mail earlier in this poll waits for the next one.
        pool = self._destinations.pool
        ready = [mailbox for mailbox in missing if not pool.held(mailbox)]
        if ready:
            recorder.pending(fetched, info, headers_only=delivery.headers_only)
        # A list, not a generator: one recipient's server refusing the message must not cost the others.
        delivered_all = all([self._deliver_to(fetched, info, mailbox) for mailbox in ready])
        if len(ready) < len(missing):
            self._held_back(info, [mailbox for mailbox in missing if mailbox not in ready], tried=bool(ready))
        elif delivered_all:
            recorder.routed(info, decision.mailboxes)

    def _held_back(self, info: MessageInfo, held: list[str], *, tried: bool) -> None:
        """Not delivered to ``held`` in this poll: the message stays, to be delivered to them later."""
        log.info(
            "account %s: message %s waits for the next poll for %s (could not take mail in this poll)",
            self._account, info.uidl, ", ".join(held),
        )  # fmt: skip
        if tried:  # the attempt counted for the others is not this message's fault for these
            reason = f"not delivered to {', '.join(held)}: could not take mail in this poll"
            self._recorder.attempt_given_back([info.uidl], reason)

    def _missing(
        self, fetched: FetchedMessage, info: MessageInfo, mailboxes: list[str], *, recover: bool
    ) -> list[str]:
        """The recipients still to deliver to; a ``pending`` one found in its mailbox is recorded instead,
        and with ``recover`` (the message's identity is in doubt: it may have been delivered under a row
        the ledger no longer has) so is one the ledger knows nothing about."""
        recorder = self._recorder
        states = recorder.ledger.recipients.states(recorder.account_id, info.uidl)
        missing = []
        for mailbox in mailboxes:
            state = states.get(mailbox)
            if state is RecipientState.DELIVERED:
                continue
            doubtful = state is RecipientState.PENDING or (state is None and recover)
            if doubtful and not self._destinations.pool.held(mailbox) and self._found(fetched, info, mailbox):
                continue
            missing.append(mailbox)
        return missing

    def _found(self, fetched: FetchedMessage, info: MessageInfo, mailbox: str) -> bool:
        ref = self._destinations.look_up(fetched, mailbox)
        if ref is None:
            return False
        self._recorder.recipient_recovered(fetched, info.uidl, mailbox, ref)
        return True

    def _deliver_to(self, fetched: FetchedMessage, info: MessageInfo, mailbox: str) -> bool:
        self._recorder.recipient_pending(info.uidl, mailbox)
        ref = self._destinations.deliver(fetched, mailbox)
        if ref is None:
            return False
        self._recorder.recipient_delivered(fetched, info.uidl, mailbox, ref)
        return True
