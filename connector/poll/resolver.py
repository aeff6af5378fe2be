"""Host addresses for the idle probe, looked up without stopping its loop.

The probe drives every session from one thread (probe.py). A name lookup blocks: ``getaddrinfo`` has no
timeout of its own, and a resolver that does not answer holds it for its retries (5 s per try and
nameserver by default). Inside the loop that would stall every session in flight, and their deadlines
would pass and hand them all to full polls, for one account whose domain's nameservers are down.

So lookups run in threads of their own (a few, one lookup per host at a time); the loop asks for a host's
addresses and gets them at once when they are known, or is woken (``wake``) once a lookup has ended. A
host's addresses are looked up again after ``every`` seconds (``run`` serves for as long as it runs, and a
host that moves must not be probed at its old address for ever); meanwhile the last ones serve, and they
keep serving if that lookup fails. A failed first lookup is told to the accounts that waited for it
(their full polls look the name up themselves and report it); it is not remembered, so the next poll
tries again.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from connector.poll.probe_session import Address

# Seconds a host's addresses are used before they are looked up again.
RESOLVE_EVERY = 60.0
# Lookups at once, at most: a fleet's hosts are looked up when `run` starts, a thread each would be
# thousands; more than a few at once only queue in the resolver.
LOOKUP_THREADS = 4

Host = tuple[str, int]


def look_up(host: str, port: int) -> list[Address]:
    """What ``socket.create_connection`` would try, in its order: the family and address of each."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, address) for family, _type, _proto, _name, address in found]


@dataclass
class _Known:
    addresses: list[Address]
    at: float
    refreshing: bool = False


class HostAddresses:
    """The probe's cache of host addresses, filled by lookup threads; used from the probe's thread only,
    but for ``finished``'s queue, which the lookup threads fill."""

    def __init__(self, wake: Callable[[], None], *, every: float = RESOLVE_EVERY) -> None:
        self._wake = wake
        self._every = every
        self._known: dict[Host, _Known] = {}
        self._first: set[Host] = set()  # first lookups under way: the accounts of these hosts wait
        self._asked: queue.SimpleQueue[Host] = queue.SimpleQueue()
        self._ended: queue.SimpleQueue[tuple[Host, list[Address] | OSError]] = queue.SimpleQueue()
        # Lookup threads running; each ends once nothing is asked (lookups come once a minute per host).
        self._threads = 0
        self._lock = threading.Lock()

    def get(self, host: Host) -> list[Address] | None:
        """The host's addresses (a copy), or None while its first lookup runs: ``finished`` tells when it
        has ended."""
        known = self._known.get(host)
        if known is None:
            if host not in self._first:
                self._first.add(host)
                self._ask(host)
            return None
        if not known.refreshing and time.monotonic() - known.at > self._every:
            known.refreshing = True
            self._ask(host)
        return list(known.addresses)

    def finished(self) -> list[tuple[Host, list[Address] | OSError]]:
        """The first lookups that ended since the last call: the addresses found, or why none were."""
        ended: list[tuple[Host, list[Address] | OSError]] = []
        while True:
            try:
                host, outcome = self._ended.get_nowait()
            except queue.Empty:
                return ended
            known = self._known.get(host)
            if isinstance(outcome, list):
                self._known[host] = _Known(outcome, time.monotonic())
            elif known is not None:  # a refresh failed: the last addresses serve until the next one
                known.at, known.refreshing = time.monotonic(), False
            if host in self._first:
                self._first.discard(host)
                ended.append((host, outcome))

    def _ask(self, host: Host) -> None:
        with self._lock:
            self._asked.put(host)
            if self._threads >= LOOKUP_THREADS:
                return
            self._threads += 1
        # Daemon threads: a lookup the resolver never answers must not keep the process from exiting.
        threading.Thread(target=self._look_up, name="probe-lookup", daemon=True).start()

    def _look_up(self) -> None:
        while True:
            with self._lock:  # under the lock: a host asked after this finds the queue empty starts a thread
                try:
                    host = self._asked.get_nowait()
                except queue.Empty:
                    self._threads -= 1
                    return
            try:
                outcome: list[Address] | OSError = look_up(*host)
            except OSError as exc:
                outcome = exc
            except Exception as exc:  # e.g. UnicodeError for a name IDNA refuses: the account's, not ours
                outcome = OSError(f"{exc.__class__.__name__}: {exc}")
            self._ended.put((host, outcome))
            self._wake()
