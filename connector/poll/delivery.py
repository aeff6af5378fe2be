"""The second phase of a poll: fetch each planned message and hand it to its delivery strategy, in order.

Whole messages are RETRed ahead by a fetch thread (pipeline.py) while this thread records and delivers
them; what has been fetched meanwhile goes in one batch where the destination takes batches (batched.py).
Headers-only fetches (TOP) and servers that delete whatever was retrieved at QUIT (EXPIRE 0) take the
simple path: one message fetched, then delivered, at a time (nothing fetched ahead).

For each message: a fetch that failed is recorded (``Recorder.not_fetched`` / ``fetched_wrong``); else it
is marked retrieved (``Deletions``: what an EXPIRE 0 server would lose), an earlier message's row under
its UIDL is replaced, and the strategy for the account delivers it: ``RoutedDelivery`` (catch-all),
``BatchedDelivery`` (a run of plain new messages), ``SingleDelivery`` (anything else). Every log line of
that work is about the message (``about_message``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial

from connector.config import Account
from connector.errors import MessageFetchError, SourceShortReplyError
from connector.ops.logs import about_message
from connector.policies.server_limits import deletes_retrieved
from connector.poll.batched import BatchedDelivery, batchable
from connector.poll.deletions import Deletions
from connector.poll.destination import DestinationDown, Destinations
from connector.poll.events import Fetched as FetchedEvent
from connector.poll.events import Observers
from connector.poll.fetch import fetch, spool_for
from connector.poll.pipeline import BATCH_BYTES, Fetched, Prefetcher
from connector.poll.plan import Delivery
from connector.poll.recorder import Recorder
from connector.poll.routed import RoutedDelivery
from connector.poll.single import SingleDelivery
from connector.pop3 import Pop3Client

log = logging.getLogger("connector.poll.delivery")


class DeliveryPhase:
    def __init__(
        self,
        account: Account,
        recorder: Recorder,
        destinations: Destinations,
        deletions: Deletions,
        observers: Observers,
        stop: threading.Event,
        *,
        doubtful: frozenset[str],
    ) -> None:
        self._account = account
        self._recorder = recorder
        self._destinations = destinations
        self._deletions = deletions
        self._observers = observers
        self._stop = stop
        self._single = SingleDelivery(recorder, destinations, doubtful=doubtful)
        self._batched = BatchedDelivery(recorder, destinations, self._single)
        routing = account.routing
        self._routed = RoutedDelivery(recorder, destinations, routing) if routing is not None else None

    def deliver_all(self, pop: Pop3Client, deliveries: Sequence[Delivery]) -> None:
        """Deliver in plan order; returns early when the destination is down or a stop was requested."""
        # Whatever a server with EXPIRE 0 has sent is gone at QUIT: it gets nothing fetched ahead.
        simple_only = deletes_retrieved(pop.capabilities)
        if deliveries and self._routed is None:
            self._destinations.pool.open_ahead()
        for simple, group in itertools.groupby(deliveries, lambda d: simple_only or d.headers_only):
            run = list(group)
            go_on = self._one_at_a_time(pop, run) if simple else self._overlapped(pop, run)
            if not go_on:
                return

    def _overlapped(self, pop: Pop3Client, deliveries: Sequence[Delivery]) -> bool:
        """The next messages are fetched while this thread records and delivers (see pipeline.py); what
        has been fetched meanwhile goes in one batch where the destination takes batches.
        False when the poll must stop delivering."""
        spool = partial(spool_for, self._account)
        with Prefetcher(pop, deliveries, spool, ceiling=self._account.message_size_ceiling) as prefetcher:
            for item in prefetcher:
                first = item.message.size if item.message is not None else 0
                batch = [item, *prefetcher.ready(self._batch_room() - 1, BATCH_BYTES - first)]
                with contextlib.ExitStack() as spools:
                    for fetched in batch:
                        spools.enter_context(fetched)
                    if self._stop_requested() or not self._deliver_fetched(batch):
                        return False
        return True

    def _one_at_a_time(self, pop: Pop3Client, deliveries: Sequence[Delivery]) -> bool:
        """One message fetched (RETR, or TOP for headers only), then delivered, at a time."""
        for delivery in deliveries:
            if self._stop_requested():
                return False
            with about_message(delivery.info.uidl), _fetch_now(pop, self._account, delivery) as item:
                if not self._guarded(partial(self._deliver_one, item)):
                    return False
        return True

    def _batch_room(self) -> int:
        """Messages the next delivery may carry (catch-all mail goes to each recipient on its own)."""
        return self._destinations.max_batch() if self._routed is None else 1

    def _deliver_fetched(self, items: Sequence[Fetched]) -> bool:
        """Deliver ``items`` in order, runs of plain new messages together; False when the poll must stop."""
        for together, group in itertools.groupby(items, lambda item: batchable(item, self._account)):
            run = list(group)
            if together and len(run) > 1:
                if not self._guarded(partial(self._deliver_together, run)):
                    return False
                continue
            for item in run:  # stops at the first that fails
                with about_message(item.delivery.info.uidl):
                    if not self._guarded(partial(self._deliver_one, item)):
                        return False
        return True

    def _guarded(self, step: Callable[[], None]) -> bool:
        """Run a delivery step; False when the destination is down and the poll must stop delivering."""
        try:
            step()
        except DestinationDown:
            return False
        return True

    def _stop_requested(self) -> bool:
        if not self._stop.is_set():
            return False
        self._recorder.result.status = "stopped"
        log.info("account %s: stop requested; ending the poll after the current message", self._account.name)
        return True

    def _deliver_together(self, items: Sequence[Fetched]) -> None:
        for item in items:
            self._fetched(item)
        self._batched.deliver(items)

    def _deliver_one(self, item: Fetched) -> None:
        delivery = item.delivery
        if item.message is None:
            assert item.error is not None
            if isinstance(item.error, SourceShortReplyError):
                # Retrieved all the same: a server that deletes what was retrieved (EXPIRE 0) must not get
                # QUIT.
                self._deletions.retrieved(delivery.info.uidl)
                self._recorder.fetched_wrong(delivery.info, item.error)
            else:
                self._recorder.not_fetched(delivery.info, item.error)
            return
        self._fetched(item)
        if self._routed is not None:
            self._routed.deliver(item.message, delivery)
        else:
            self._single.deliver(item.message, delivery)

    def _fetched(self, item: Fetched) -> None:
        """A message fetched whole: retrieved in this session, reported, and its UIDL's old row replaced."""
        info, delivery = item.delivery.info, item.delivery
        assert item.message is not None
        self._deletions.retrieved(info.uidl, keep_whole=delivery.headers_only)
        self._observers.emit(FetchedEvent(self._account.name, info.uidl, info.size, item.message.size))
        if delivery.replaces_row:
            # Only now: a crash before this message is recorded leaves the row, and the next poll again
            # looks for the message in the destination first.
            self._recorder.replace_row(info.uidl)


def _fetch_now(pop: Pop3Client, account: Account, delivery: Delivery) -> Fetched:
    try:
        message = fetch(pop, account, delivery.info, headers_only=delivery.headers_only)
    except MessageFetchError as exc:
        return Fetched(delivery, error=exc)
    return Fetched(delivery, message=message)
