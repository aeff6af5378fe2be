"""The DELEs of one POP3 session, held until the deliveries that allow them are committed.

A delivery's ``delivered`` row is a deferred ledger write (it commits with the next message's ``pending``,
see ``connector/ledger/store.py``), so a DELE queued after it may not go out before the ledger has
committed it. ``DeleQueue`` makes that the only way out: ``release`` flushes the ledger first, and when the
flush fails the queue is dropped, so an error path that still sends "whatever is queued" sends nothing. The
dropped messages stay on the server; the next poll finds each one ``delivered`` (and deletes it per
retention) or ``pending`` (and finds it in the destination before delivering it again).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from connector.config import Account
from connector.ledger.store import Clock
from connector.policies.retention import should_delete
from connector.pop3 import MessageInfo, Pop3Client


class DeleQueue:
    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._queued: list[MessageInfo] = []

    def add(self, info: MessageInfo) -> None:
        self._queued.append(info)

    def __len__(self) -> int:
        return len(self._queued)

    def release(self) -> list[MessageInfo]:
        """The queued DELEs, once the ledger has committed every deferred write; none at all (the queue is
        emptied and the flush's error raised) when it cannot."""
        queued, self._queued = self._queued, []
        if queued:  # else nothing waits for the deferred writes: they commit with the poll's result
            self._flush()
        return queued


class Deletions:
    """What the POP3 server may delete at the end of this session, and what it must not.

    The retention decides per delivered message (``delivered``); the plan adds messages delivered by
    earlier polls (``dele``). Retrieved messages not (yet) delivered are remembered: a server that deletes
    whatever was retrieved at QUIT (EXPIRE 0) must then not get a QUIT. A message delivered as its
    headers only (``keep_whole``) is never deleted: the server keeps the one whole copy.
    """

    def __init__(self, account: Account, flush: Callable[[], None], clock: Clock) -> None:
        self._retention = account.retention
        self._clock = clock
        self._queue = DeleQueue(flush)
        self._undelivered: set[str] = set()
        self._keep: set[str] = set()
        # DELEs sent in this session: the server removes them at a confirmed QUIT (RFC 1939 §6).
        self.sent: list[str] = []

    @property
    def undelivered(self) -> int:
        return len(self._undelivered)

    def retrieved(self, uidl: str, *, keep_whole: bool = False) -> None:
        self._undelivered.add(uidl)
        if keep_whole:
            self._keep.add(uidl)

    def delivered(self, info: MessageInfo, delivered_at: datetime) -> None:
        # The DELE is safe in this same session: it is sent only after the delivery is committed
        # (DeleQueue), and takes effect only at QUIT.
        self._undelivered.discard(info.uidl)
        if info.uidl not in self._keep and should_delete(self._retention, delivered_at, self._clock()):
            self._queue.add(info)

    def dele(self, info: MessageInfo) -> None:
        self._queue.add(info)

    def send(self, pop: Pop3Client) -> None:
        """Send the queued DELEs (pipelined), after the ledger has committed what allows them."""
        infos = self._queue.release()
        if infos:
            pop.dele_many([info.number for info in infos])
            self.sent.extend(info.uidl for info in infos)
