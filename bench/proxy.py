"""A TCP proxy that adds a fixed delay to every byte in each direction, as a network path would.

Data read from one side is forwarded ``delay`` seconds later; reading never waits for earlier data to be
delivered, so pipelined commands overlap exactly as on a long, wide link (latency, not bandwidth).
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time

_CHUNK = 256 * 1024


class _DelayedPipe:
    """One direction of one connection: a reader thread stamps chunks, a writer sends each when due."""

    def __init__(self, source: socket.socket, target: socket.socket, delay: float) -> None:
        self.source, self.target, self.delay = source, target, delay
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.source.recv(_CHUNK)
            except OSError:
                data = b""
            with self.ready:
                self.queue.append((time.monotonic() + self.delay, data))
                self.ready.notify()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                due, data = self.queue.popleft()
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if not data:
                with contextlib.suppress(OSError):
                    self.target.shutdown(socket.SHUT_WR)
                return
            try:
                self.target.sendall(data)
            except OSError:
                return


class DelayProxy:
    """Listens on 127.0.0.1:``port`` (0 = any free port) and forwards to ``upstream`` with ``delay``
    seconds added each way. Use as a context manager; ``port`` is the port to connect to."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False

    def __enter__(self) -> DelayProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            _DelayedPipe(client, server, self.delay)
            _DelayedPipe(server, client, self.delay)
