"""Several small messages delivered in one destination command (IMAP MULTIAPPEND, RFC 3502).

The ledger's steps per message are those of a single delivery, each its own transaction:

    record each message ``pending`` (one commit each) -> one command carrying all of them -> record each
    ``delivered`` -> DELE per retention, after the deliveries are committed.

The server stores a batch whole or not at all. A crash while the command is in flight leaves every
message of the batch ``pending``: the next poll looks for each one in the destination before delivering
it again, as it does after a crash during a single delivery. A batch the server refuses stored nothing:
its messages then go one at a time, so that the message at fault is named and the others go in.
``BatchedDelivery`` is mixed into the engine's per-poll state, which provides what is declared here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from connector.config import Account
from connector.destinations.base import DestinationSession
from connector.errors import LedgerError
from connector.ledger.store import Ledger
from connector.message import FetchedMessage
from connector.ops.logs import about_message
from connector.poll.pipeline import Fetched
from connector.pop3 import MessageInfo

_T = TypeVar("_T")


def batchable(item: Fetched, account: Account) -> bool:
    """A message that may share a command: fetched whole, new (no earlier attempt to look for), and for
    the account's one destination (catch-all mail goes to each recipient on its own)."""
    delivery = item.delivery
    return (
        item.message is not None
        and not delivery.recover
        and not delivery.headers_only
        and account.routing is None
    )


class BatchedDelivery:
    ledger: Ledger
    account: Account
    account_id: int
    undelivered: set[str]

    def _record_pending(self, fetched: FetchedMessage, info: MessageInfo, *, headers_only: bool) -> None:
        raise NotImplementedError

    def _call_destination_for(
        self,
        messages: Sequence[FetchedMessage],
        action: Callable[[DestinationSession], _T],
        *,
        counted: bool,
        pending: bool,
        mailbox: str | None = None,
    ) -> _T | None:
        raise NotImplementedError

    def _deliver_recorded(self, fetched: FetchedMessage, info: MessageInfo) -> None:
        raise NotImplementedError

    def _delivered_new(self, fetched: FetchedMessage, info: MessageInfo, ref: str) -> None:
        raise NotImplementedError

    def _deliver_together(self, items: Sequence[Fetched]) -> None:
        """Deliver ``items`` (all ``batchable``) in one command."""
        pairs = [(item.message, item.delivery.info) for item in items if item.message is not None]
        messages = [message for message, _ in pairs]
        for message, info in pairs:
            self.undelivered.add(info.uidl)
            self._record_pending(message, info, headers_only=False)
        refs = self._call_destination_for(
            messages, lambda dest: dest.deliver_many(messages) or _REFUSED, counted=True, pending=True
        )
        if refs is None:  # failed, and recorded as failed for each message
            return
        if refs is _REFUSED:
            self._deliver_one_by_one(pairs)
            return
        for (message, info), ref in zip(pairs, refs, strict=True):
            with about_message(info.uidl):  # log lines name each message, not the batch's first
                self._delivered_new(message, info, ref)

    def _deliver_one_by_one(self, pairs: Sequence[tuple[FetchedMessage, MessageInfo]]) -> None:
        for done, (message, info) in enumerate(pairs):
            try:
                self._deliver_recorded(message, info)
            except BaseException:
                # The destination stopped taking mail (full, gone): the messages not tried yet were
                # recorded ``pending`` with an attempt they did not make; give it back.
                with contextlib.suppress(LedgerError):
                    self._not_tried(pairs[done + 1 :])
                raise

    def _not_tried(self, pairs: Sequence[tuple[FetchedMessage, MessageInfo]]) -> None:
        for message, _info in pairs:
            self.ledger.record_failure(
                self.account_id,
                message.uidl,
                "not delivered: the destination stopped taking mail before this message's turn",
                counted=False,
                max_attempts=self.account.retry.max_attempts,
            )


# What deliver_many's None (refused as a whole, nothing stored) becomes, apart from a failure's None.
_REFUSED: list[str] = []
