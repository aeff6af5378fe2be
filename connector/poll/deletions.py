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

from connector.pop3 import MessageInfo


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
