"""Several small messages delivered in one destination command (IMAP MULTIAPPEND, RFC 3502).

The ledger's steps are those of a single delivery, for the batch:

    record every message ``pending`` (one transaction, one commit) -> one command carrying all of them ->
    record each ``delivered`` (deferred, committed with the next batch's ``pending``) -> DELE per
    retention, after the deliveries are committed.

The messages share one ``pending`` commit because they share the command that follows it: a crash before
the commit leaves none of them recorded and none sent, one after it leaves every message of the batch
``pending``: the next poll looks for each one in the destination before delivering it again, as it does
after a crash during a single delivery (the server may have stored all of the batch, or, for Exchange's
CreateItem, part of it). A batch the server refuses stored nothing:
its messages then go one at a time (``SingleDelivery.deliver_recorded``), so that the message at fault is
named and the others go in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from connector.config import Account
from connector.errors import LedgerError
from connector.message import FetchedMessage
from connector.ops.logs import about_message
from connector.poll.destination import REFUSED, Destinations
from connector.poll.pipeline import Fetched
from connector.poll.recorder import Recorder
from connector.poll.single import SingleDelivery
from connector.pop3 import MessageInfo


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
    def __init__(self, recorder: Recorder, destinations: Destinations, single: SingleDelivery) -> None:
        self._recorder = recorder
        self._destinations = destinations
        self._single = single

    def deliver(self, items: Sequence[Fetched]) -> None:
        """Deliver ``items`` (all ``batchable``) in one command. Raises ``DestinationDown`` when the
        destination stopped taking mail (the failures are recorded)."""
        pairs = [(item.message, item.delivery.info) for item in items if item.message is not None]
        messages = [message for message, _ in pairs]
        self._recorder.batch_pending(pairs)
        refs = self._destinations.deliver_many(messages)
        if refs is None:  # failed, and recorded as failed for each message
            return
        if refs is REFUSED:
            self._one_by_one(pairs)
            return
        for (message, info), ref in zip(pairs, refs, strict=True):
            self._recorder.delivered(message, info, ref)

    def _one_by_one(self, pairs: Sequence[tuple[FetchedMessage, MessageInfo]]) -> None:
        for done, (message, info) in enumerate(pairs):
            try:
                with about_message(info.uidl):
                    self._single.deliver_recorded(message, info)
            except BaseException:
                # The destination stopped taking mail (full, gone): the messages not tried yet were
                # recorded ``pending`` with an attempt they did not make; give it back.
                with contextlib.suppress(LedgerError):
                    self._recorder.attempt_given_back(
                        [message.uidl for message, _ in pairs[done + 1 :]],
                        "not delivered: the destination stopped taking mail before this message's turn",
                    )
                raise
