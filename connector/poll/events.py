"""What a poll tells the rest of the program: typed events, emitted by the poll itself.

Logs, metrics, progress bars, health and the status page learn what a poll did from these events and from
nothing else, in every run mode (``sync``, ``run``, a distributed worker): ``connector.ops.observers``
builds the standard set. The poll emits each event after the fact it reports is done (a ``Delivered``
after the destination confirmed the message, a ``Deleted`` after QUIT confirmed the DELEs).

A poll emits from its own thread (``Fetched`` when the fetched message is taken for delivery), but polls of
several accounts run at once, so ``Observers`` calls observers one event at a time. An observer that fails
is logged and ignored: watching a poll must never break it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from connector.poll.result import PollResult

log = logging.getLogger("connector.poll.events")


@dataclass(frozen=True, slots=True)
class Started:
    """A poll of ``account`` begins (before it connects)."""

    account: str


@dataclass(frozen=True, slots=True)
class Planned:
    """The listing is read and compared with the ledger: ``messages`` will be fetched and delivered,
    ``size`` octets by the server's LIST sizes."""

    account: str
    messages: int
    size: int
    to_delete: int


@dataclass(frozen=True, slots=True)
class Fetched:
    """Message ``uidl`` was read from the POP3 server (``size`` by its LIST size, so that progress adds up
    to what was planned; ``received`` octets as sent)."""

    account: str
    uidl: str
    size: int
    received: int


@dataclass(frozen=True, slots=True)
class Delivered:
    """The destination confirmed message ``uidl`` (``size`` octets as delivered, ``sha256`` of them) as
    ``ref``; ``mailbox`` is the recipient's for catch-all accounts."""

    account: str
    uidl: str
    size: int
    sha256: str
    ref: str
    mailbox: str | None = None


@dataclass(frozen=True, slots=True)
class Recovered:
    """Message ``uidl`` was found already delivered (``ref``) by an earlier, interrupted attempt."""

    account: str
    uidl: str
    ref: str
    mailbox: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """Delivering or fetching message ``uidl`` failed (``error``); ``counted`` when it cost an attempt."""

    account: str
    uidl: str
    error: str
    counted: bool
    mailbox: str | None = None


@dataclass(frozen=True, slots=True)
class Quarantined:
    """Message ``uidl`` is given up on and left on the POP3 server until a person retries it."""

    account: str
    uidl: str
    reason: str


@dataclass(frozen=True, slots=True)
class Deleted:
    """QUIT confirmed the DELE of these messages: the server has removed them."""

    account: str
    uidls: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    """The poll is over; ``planned`` is None when it ended before its plan was made."""

    account: str
    result: PollResult
    duration: float
    planned: int | None

    @property
    def backlog(self) -> int | None:
        """Messages that were due for delivery and are still not delivered after this poll."""
        if self.planned is None:
            return None
        return max(0, self.planned - self.result.messages_done)


PollEvent = Started | Planned | Fetched | Delivered | Recovered | Failed | Quarantined | Deleted | Finished


class PollObserver(Protocol):
    """Anything that wants to know what polls do. Called in the poll's threads: keep it quick."""

    def notify(self, event: PollEvent) -> None: ...


class Observers:
    """The observers of a run; the poll emits every event here."""

    def __init__(self, observers: Iterable[PollObserver] = ()) -> None:
        self._observers = list(observers)
        self._lock = threading.Lock()

    def emit(self, event: PollEvent) -> None:
        with self._lock:
            for observer in self._observers:
                try:
                    observer.notify(event)
                except Exception:
                    log.exception("observer %s failed on %s", type(observer).__name__, type(event).__name__)
