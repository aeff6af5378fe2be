"""A fault-injecting TCP proxy for tests: sits between the connector and a real server (Dovecot's POP3 or
IMAP port) and breaks the connection in one precise way.

A ``Fault`` fires on the first ``times`` connections; later connections pass untouched, so the test can
check that the next poll recovers. Where it fires is told by a ``trigger`` (bytes the *client* sends, e.g.
``b"RETR 2"``) and ``after`` (how many more bytes may pass in ``direction`` once the trigger was seen):

* ``reset``: RST both sides (SO_LINGER 0), like a crashed middlebox;
* ``cut``: a clean FIN to the client after the allowed bytes (a server that hangs up);
* ``stall``: stop forwarding ``direction`` and keep the sockets open (the client must time out);
* ``trickle``: forward ``direction`` a few bytes at a time with a pause in between;
* ``refuse``: nobody listens on the port while the fault lasts (connection refused).

Matching only works on plaintext, so fault tests use the plain ports.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Literal

FaultKind = Literal["reset", "cut", "stall", "trickle", "refuse"]
Direction = Literal["up", "down"]  # up: client -> server, down: server -> client

_CHUNK = 16 * 1024


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    direction: Direction = "down"
    trigger: bytes | None = None
    after: int = 0
    occurrence: int = 1  # fire at the Nth appearance of the trigger
    times: int = 1
    trickle_bytes: int = 16
    trickle_pause: float = 0.01


class _Link:
    """One proxied connection: two pump threads and the fault's progress."""

    def __init__(self, client: socket.socket, upstream: socket.socket, fault: Fault | None) -> None:
        self.client = client
        self.upstream = upstream
        self.fault = fault
        self.armed = fault is not None and fault.trigger is None
        self.counted = 0
        self.fired = False
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._tail = b""
        self._seen = 0

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._pump, args=(self.client, self.upstream, "up"), daemon=True),
            threading.Thread(target=self._pump, args=(self.upstream, self.client, "down"), daemon=True),
        ]
        for thread in threads:
            thread.start()
        return threads

    def _see_trigger(self, data: bytes) -> int | None:
        """Arms the fault when the client's stream contains the trigger; returns the offset just past it."""
        fault = self.fault
        if fault is None or fault.trigger is None or self.armed:
            return None
        window = self._tail + data
        index = window.find(fault.trigger)
        while index >= 0:
            self._seen += 1
            if self._seen == fault.occurrence:
                self.armed = True
                return max(0, index + len(fault.trigger) - len(self._tail))
            index = window.find(fault.trigger, index + len(fault.trigger))
        self._tail = window[-(len(fault.trigger) - 1) :] if len(fault.trigger) > 1 else b""
        return None

    def _allowed(self, data: bytes, direction: Direction, start: int) -> int:
        """How many bytes of ``data`` may pass before the fault fires (len(data) if it does not)."""
        fault = self.fault
        if fault is None or not self.armed or self.fired or fault.direction != direction:
            return len(data)
        if fault.kind == "trickle":
            return len(data)
        room = fault.after - self.counted
        countable = len(data) - start
        if countable < room:
            self.counted += countable
            return len(data)
        self.counted = fault.after
        return start + max(0, room)

    def _pump(self, source: socket.socket, target: socket.socket, direction: Direction) -> None:
        try:
            while not self.closed.is_set():
                data = source.recv(_CHUNK)
                if not data:
                    break
                with self._lock:
                    start = 0
                    if direction == "up":
                        seen = self._see_trigger(data)
                        start = len(data) if seen is None and not self.armed else (seen or 0)
                    allowed = self._allowed(data, direction, start)
                if self._trickling(direction):
                    self._send_slowly(target, data)
                    continue
                target.sendall(data[:allowed])
                if allowed < len(data) or self._due(direction):
                    self._fire(direction)
                    return
        except OSError:
            pass
        self._hang_up(target)

    def _due(self, direction: Direction) -> bool:
        fault = self.fault
        return (
            fault is not None
            and fault.kind != "trickle"
            and self.armed
            and not self.fired
            and fault.direction == direction
            and self.counted >= fault.after
        )

    def _trickling(self, direction: Direction) -> bool:
        fault = self.fault
        return fault is not None and fault.kind == "trickle" and self.armed and fault.direction == direction

    def _send_slowly(self, target: socket.socket, data: bytes) -> None:
        assert self.fault is not None
        step = self.fault.trickle_bytes
        for offset in range(0, len(data), step):
            target.sendall(data[offset : offset + step])
            time.sleep(self.fault.trickle_pause)

    def _fire(self, direction: Direction) -> None:
        assert self.fault is not None
        self.fired = True
        kind = self.fault.kind
        if kind == "stall":
            # Keep both sockets open and forward nothing more this way; the other pump goes on.
            self.closed.wait()
            return
        if kind == "reset":
            for sock in (self.client, self.upstream):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def _hang_up(self, target: socket.socket) -> None:
        # The source ended (or broke): pass the FIN on; after a stall nothing is left to keep open.
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
        if self.fired:
            self.close()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            # SHUT_RD sends nothing but wakes the other pump's recv(); close() then sends FIN, or RST
            # when SO_LINGER is 0.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """``FaultProxy(host, port)``; ``start()``; connect to ``proxy.port``; ``inject(Fault(...))``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0
        self.faulted = 0
        self._fault: Fault | None = None
        self._listener: socket.socket | None = None
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def inject(self, fault: Fault | None) -> None:
        """The next ``fault.times`` connections get ``fault`` (``None`` clears it)."""
        with self._lock:
            self._fault = fault
            self.faulted = 0
        if fault is not None and fault.kind == "refuse":
            self._close_listener()
        elif self._listener is None:
            self._listen()

    def heal(self) -> None:
        self.inject(None)

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _next_fault(self) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or self.faulted >= fault.times:
                return None
            self.faulted += 1
            return fault

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream, self._next_fault())
            self._links.append(link)
            self._threads.extend(link.start())

    def stop(self) -> None:
        self._stopping.set()
        self._close_listener()
        for link in self._links:
            link.close()
        for thread in self._threads:
            thread.join(timeout=5)
