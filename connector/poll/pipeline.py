"""Fetching ahead of delivery within one poll of one account.

A ``Prefetcher`` thread owns the POP3 connection while the poll delivers: it RETRs the planned messages in
order (pipelined when the server offers PIPELINING), streams each into a ``MessageSpool`` and hands the
spooled messages over through a small bounded queue. The poll's own thread takes them in the same order
and does everything the ledger guarantees depend on, exactly as before: record ``pending`` (committed),
deliver, record ``delivered`` (committed), and only then queue the DELE. Fetching is read-only on the
POP3 server, so fetching message n+1 while n is being appended changes nothing about what a crash can
leave behind.

Memory stays bounded: replies in flight wait in the network buffers, and at most ``ahead`` spooled
messages (each in memory up to ``SPOOL_MEMORY_LIMIT``, then on disk) wait for delivery.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from connector.config import DEFAULT_MESSAGE_SIZE_CEILING
from connector.errors import MessageFetchError, SourceProtocolError
from connector.message import FetchedMessage, MessageSpool
from connector.ops.logs import about_message
from connector.poll.fetch import retr_to_spool
from connector.poll.plan import Delivery, PollPlan
from connector.pop3 import MessageInfo, Pop3Client, join_listings
from connector.pop3.client import RetrReply

log = logging.getLogger("connector.poll.pipeline")

# RETR commands in flight: enough to cover a long round trip with small messages, fewer for large ones so
# that stopping early (which reads and discards what is in flight) stays quick.
MAX_IN_FLIGHT = 64
IN_FLIGHT_BYTES = 8 * 1024 * 1024
# Up to this many messages to fetch, their sizes are asked one by one (pipelined) instead of listing all.
SIZE_QUERIES = 200
# Fetched messages waiting for delivery: enough to fill a batch (destinations that take several messages
# in one command) while the previous one is being delivered.
FETCH_AHEAD = 16
# Bytes of messages delivered in one batch (each message's literal is held in memory while it is sent).
BATCH_BYTES = 4 * 1024 * 1024
_POLL_SECONDS = 0.1


@dataclass
class Fetched:
    """The outcome of fetching one planned message: the spooled message, or why the server refused it."""

    delivery: Delivery
    message: FetchedMessage | None = None
    error: MessageFetchError | None = None

    def close(self) -> None:
        if self.message is not None:
            self.message.close()

    def __enter__(self) -> Fetched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Failure:
    error: BaseException


_END = object()


def with_sizes(
    pop: Pop3Client,
    listing: Sequence[MessageInfo],
    plan: PollPlan,
    replan: Callable[[Sequence[MessageInfo]], PollPlan],
) -> tuple[Sequence[MessageInfo], PollPlan]:
    """Sizes for a ``plan`` made from a UIDL-only listing (sizes 0): LIST is sent only when the plan fetches
    something. Sizes matter only for what is fetched (they bound the RETR reply); the caller made sure
    that nothing else in the plan depends on them (no ``max_message_size``)."""
    if not plan.deliver:
        return listing, plan
    if len(plan.deliver) <= SIZE_QUERIES:
        numbers = [delivery.info.number for delivery in plan.deliver]
        sizes = {entry.number: entry.size for entry in pop.list_sizes_of(numbers)}
        # A message whose LIST reply was malformed is left on the server (the client reports it).
        refused = {entry.number for entry in pop.unlisted}
        missing = set(numbers) - set(sizes)
        if set(sizes) - set(numbers) or (None not in refused and not missing <= refused):
            raise SourceProtocolError(f"{pop.peer}: LIST answered for other messages than asked")
        deliver = [
            replace(d, info=d.info._replace(size=sizes[d.info.number]))
            for d in plan.deliver
            if d.info.number in sizes
        ]
        return listing, replace(plan, deliver=deliver)
    try:
        listing = join_listings(listing, pop.list_sizes(), pop.unlisted)
    except SourceProtocolError as exc:
        raise SourceProtocolError(f"{pop.peer}: {exc.message}") from exc
    return listing, replan(listing)


def retr_window(deliveries: Sequence[Delivery]) -> int:
    largest = max((delivery.info.size for delivery in deliveries), default=1)
    return max(1, min(MAX_IN_FLIGHT, IN_FLIGHT_BYTES // max(largest, 1)))


class Prefetcher:
    """Iterate over it to get one ``Fetched`` per delivery, in plan order; ``close()`` when done (it stops
    the thread and leaves the POP3 session usable for DELE and QUIT unless the connection failed).
    No reply is read past ``ceiling`` bytes (``message_size_ceiling``).

    A failure of the connection itself is raised by the iterator at the point where it happened, after the
    messages fetched before it: the poll delivers those first, as it would without prefetching.
    """

    def __init__(
        self,
        pop: Pop3Client,
        deliveries: Sequence[Delivery],
        spool_for: Callable[[MessageInfo], MessageSpool],
        *,
        ahead: int = FETCH_AHEAD,
        ceiling: int = DEFAULT_MESSAGE_SIZE_CEILING,
    ) -> None:
        self._pop = pop
        self._ceiling = ceiling
        self._deliveries = list(deliveries)
        self._spool_for = spool_for
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, ahead))
        # Taken from the queue by ready() but not for it to hand out: the end, or a failure.
        self._held: list[object] = []
        self._stop = threading.Event()
        # The thread runs in a copy of this thread's context: log lines and the protocol log keep
        # naming the account (connector.ops.logs and connector.ops.protocol_log keep it in context variables).
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"fetch {pop.peer}", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Fetched]:
        while True:
            item = self._held.pop() if self._held else self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            assert isinstance(item, Fetched)
            yield item

    def ready(self, count: int, max_bytes: int) -> list[Fetched]:
        """Up to ``count`` more fetched messages, of at most ``max_bytes`` together, that are waiting now;
        never blocks. The end of the fetching, or its failure, is left for the iterator to report."""
        taken: list[Fetched] = []
        room = max_bytes
        while len(taken) < count and not self._held:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            size = item.message.size if isinstance(item, Fetched) and item.message is not None else 0
            if not isinstance(item, Fetched) or size > room:
                self._held.append(item)
                break
            taken.append(item)
            room -= size
        return taken

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            self._discard_queued()
            self._thread.join(_POLL_SECONDS)
        self._discard_queued()
        for item in self._held:
            if isinstance(item, Fetched):
                item.close()
        self._held.clear()

    def _discard_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Fetched):
                item.close()

    # --- the fetching thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            numbers = [delivery.info.number for delivery in self._deliveries]
            replies = self._pop.retr_many(numbers, window=retr_window(self._deliveries))
            try:
                for delivery, reply in zip(self._deliveries, replies, strict=True):
                    if self._stop.is_set():
                        break
                    item = self._fetch(delivery, reply)
                    if not self._put(item):
                        item.close()
                        break
            finally:
                replies.close()  # reads what is still in flight, so QUIT can follow
        except BaseException as exc:  # handed to the poll's thread, which decides
            self._put(_Failure(exc))
        finally:
            self._put(_END)

    def _fetch(self, delivery: Delivery, reply: RetrReply) -> Fetched:
        info = delivery.info
        try:
            # What this thread logs while it reads the reply (the wire trace, a repair) is about this
            # message, whatever the poll's thread is delivering meanwhile.
            with about_message(info.uidl):
                message = retr_to_spool(info, self._spool_for(info), reply.into, ceiling=self._ceiling)
        except MessageFetchError as exc:  # -ERR, or a reply far shorter than LIST: this message only
            return Fetched(delivery, error=exc)
        return Fetched(delivery, message=message)

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless the consumer has stopped; False if it was not queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
            except queue.Full:
                continue
            return True
        return False
