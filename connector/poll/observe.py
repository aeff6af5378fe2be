"""Watching polls from outside the engine: the progress display, the metrics and the log context.

``ObservedEngine`` is a ``SyncEngine`` whose connections are wrapped, so that what the engine does to the
POP3 server and the destination (each RETR, pipelined or not, each delivery) is seen without the engine
knowing; the engine only announces its plan (``SyncEngine.planned``). RETRs may run in the poll's fetch
thread (pipeline.py), so observers are called under a lock.
Observers are told when a poll starts, what it plans to deliver, each message it fetched and delivered,
and the ``PollResult`` with the poll's duration and bytes. An observer that fails is logged and ignored:
watching must never break a poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from connector.config import Account, Config, Destination
from connector.connections import Connections
from connector.destinations.base import DestinationSession
from connector.ledger.store import Ledger
from connector.message import FetchedMessage
from connector.ops.logs import log_context, set_message
from connector.poll.engine import SyncEngine
from connector.poll.plan import PollPlan
from connector.poll.result import PollResult
from connector.pop3 import MessageInfo, Pop3Client, Sink, Streamed
from connector.pop3.client import RetrReply

log = logging.getLogger("connector.poll.observe")


@dataclass
class PollStats:
    """What one poll did, as seen from its connections. ``planned`` is None until the listing is read."""

    account: str
    started: float  # time.monotonic()
    planned: int | None = None
    planned_bytes: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    delivered_bytes: int = 0
    duration: float = 0.0
    # The planned messages by number, for the RETRs that follow.
    infos: dict[int, MessageInfo] = field(default_factory=dict, repr=False)

    def backlog(self, result: PollResult) -> int | None:
        """Messages that were due for delivery and are still not delivered after this poll."""
        if self.planned is None:
            return None
        return max(0, self.planned - result.delivered - result.recovered)


class PollObserver:
    """Base with no-op hooks; hooks run in the polling thread and must be quick."""

    def poll_started(self, account: Account, stats: PollStats) -> None:
        pass

    def poll_planned(self, stats: PollStats) -> None:
        pass

    def message_fetched(self, stats: PollStats, uidl: str, size: int) -> None:
        pass

    def message_delivered(self, stats: PollStats, uidl: str, size: int) -> None:
        pass

    def poll_finished(self, result: PollResult, stats: PollStats) -> None:
        pass


class ObservedEngine(SyncEngine):
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        connections: Connections | None = None,
        *,
        observers: Iterable[PollObserver] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(config, ledger, connections, **kwargs)
        self.inner_connections = self.connections
        self.connections = Connections(
            open_source=self._open_source,
            open_destination=self._open_destination,
            open_recipient=self._open_recipient,
        )
        self.hooks: list[PollObserver] = list(observers)
        self._stats: dict[str, PollStats] = {}
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()

    def poll(
        self, account: Account, *, dry_run: bool = False, stop: threading.Event | None = None
    ) -> PollResult:
        with log_context(account.name):
            if dry_run:
                return super().poll(account, dry_run=True, stop=stop)
            stats = PollStats(account.name, started=time.monotonic())
            with self._lock:
                self._stats[account.name] = stats
            self._notify("poll_started", account, stats)
            try:
                result = super().poll(account, stop=stop)
            finally:
                with self._lock:
                    self._stats.pop(account.name, None)
            stats.duration = time.monotonic() - stats.started
            self._notify("poll_finished", result, stats)
            return result

    def _notify(self, hook: str, *args: Any) -> None:
        with self._notify_lock:
            for observer in self.hooks:
                try:
                    getattr(observer, hook)(*args)
                except Exception:
                    log.exception("observer %s failed in %s", type(observer).__name__, hook)

    def _current(self, account: Account) -> PollStats | None:
        with self._lock:
            return self._stats.get(account.name)

    def _open_source(self, account: Account) -> Pop3Client:
        client = self.inner_connections.open_source(account)
        stats = self._current(account)
        if stats is None:  # dry run or check: nothing to watch
            return client
        return cast(Pop3Client, _ObservedSource(client, self, account, stats))

    def _open_destination(self, destination: Destination, account: Account) -> DestinationSession:
        return self._observed(self.inner_connections.open_destination(destination, account), account)

    def _open_recipient(self, destination: Destination, account: Account, mailbox: str) -> DestinationSession:
        return self._observed(self.inner_connections.open_recipient(destination, account, mailbox), account)

    def _observed(self, session: DestinationSession, account: Account) -> DestinationSession:
        stats = self._current(account)
        if stats is None:
            return session
        return _ObservedDestination(session, self, stats)

    def planned(self, account: Account, plan: PollPlan) -> None:
        stats = self._current(account)
        if stats is None:
            return
        stats.infos = {delivery.info.number: delivery.info for delivery in plan.deliver}
        stats.planned = len(plan.deliver)
        stats.planned_bytes = sum(delivery.info.size for delivery in plan.deliver)
        self._notify("poll_planned", stats)


class _ObservedSource:
    """Stands in for a ``Pop3Client``: tags log lines with the UIDL at hand and reports progress."""

    def __init__(self, client: Pop3Client, engine: ObservedEngine, account: Account, stats: PollStats):
        self._client = client
        self._engine = engine
        self._account = account
        self._stats = stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def __enter__(self) -> _ObservedSource:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        set_message(None)
        self._client.__exit__(*exc_info)

    def _about(self, number: int) -> MessageInfo | None:
        info = self._stats.infos.get(number)
        set_message(info.uidl if info is not None else None)
        return info

    def retr(self, number: int, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        info = self._about(number)
        streamed = self._client.retr(number, sink, max_bytes=max_bytes)
        self.fetched(info, streamed.octets)
        return streamed

    def retr_many(self, numbers: Iterable[int], *, window: int = 1) -> Generator[_ObservedReply, None, None]:
        replies = self._client.retr_many(numbers, window=window)
        try:
            for reply in replies:
                yield _ObservedReply(reply, self)
        finally:
            replies.close()  # the fetch thread's close() must reach the client's (it drains the stream)

    def fetched(self, info: MessageInfo | None, written: int) -> None:
        self._stats.fetched += 1
        # Counted in the server's LIST sizes, like planned_bytes, so progress ends at exactly 100%.
        self._stats.fetched_bytes += info.size if info is not None else written
        if info is not None:
            self._engine._notify("message_fetched", self._stats, info.uidl, info.size)

    def dele(self, number: int) -> None:
        self._about(number)
        self._client.dele(number)

    def quit(self) -> None:
        set_message(None)
        self._client.quit()


class _ObservedReply:
    """One reply of a pipelined RETR (``RetrReply``), counted when it has been read."""

    def __init__(self, reply: RetrReply, source: _ObservedSource) -> None:
        self._reply = reply
        self._source = source
        self.number = reply.number

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reply, name)

    def into(self, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        info = self._source._about(self.number)
        streamed = self._reply.into(sink, max_bytes=max_bytes)
        self._source.fetched(info, streamed.octets)
        return streamed


class _ObservedDestination:
    """A ``DestinationSession`` that counts delivered bytes and tags log lines with the UIDL."""

    def __init__(self, session: DestinationSession, engine: ObservedEngine, stats: PollStats) -> None:
        self._session = session
        self._engine = engine
        self._stats = stats

    def deliver(self, message: FetchedMessage) -> str:
        set_message(message.uidl)
        ref = self._session.deliver(message)
        self._stats.delivered_bytes += message.size
        self._engine._notify("message_delivered", self._stats, message.uidl, message.size)
        return ref

    def max_batch(self) -> int:
        return self._session.max_batch()

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        set_message(messages[0].uidl)
        refs = self._session.deliver_many(messages)
        if refs is not None:
            for message in messages:
                self._stats.delivered_bytes += message.size
                self._engine._notify("message_delivered", self._stats, message.uidl, message.size)
        return refs

    def find(self, message: FetchedMessage) -> str | None:
        set_message(message.uidl)
        return self._session.find(message)

    def check(self) -> object:
        return self._session.check()

    def close(self) -> None:
        self._session.close()
