"""An IMAP-aware proxy for tests, in front of a real IMAP server (Dovecot's plain port), that plays the
destinations crash recovery has to cope with:

* ``add_header``: a server that does not store what it is given: the proxy puts this header line first in
  every APPEND literal (MULTIAPPEND's too), as filters, archiving gateways and converting servers do,
  so the stored size and SHA-256 differ from what the connector sent;
* ``lose_append_answers``: the tagged answers of these APPEND commands (counted from 1 over the proxy's
  life, MULTIAPPEND counts as one) never reach the client: the server stored the message(s), then the
  connection drops (what a reset or a timeout after the server's work leaves behind);
* ``refuse``: a command (``EXAMINE``, ``SEARCH``, ``FETCH``, ``UID SEARCH`` counts as ``SEARCH``) is not
  forwarded; the client gets ``NO`` or ``BAD`` for it, as from a server that cannot answer now.

The proxy parses the command stream line by line and follows literals (``{n}`` and ``{n+}``) both ways,
so message bytes are never taken for commands or responses.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field

_LITERAL_RE = re.compile(rb"\{(\d+)(\+?)\}\r\n\Z")


class _Reader:
    """Lines and literals from one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def line(self) -> bytes | None:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                return None
        end = self.buffer.index(b"\r\n") + 2
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line

    def exactly(self, count: int) -> bytes | None:
        while len(self.buffer) < count:
            if not self._fill():
                return None
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


def _literal(line: bytes) -> tuple[int, bytes] | None:
    """(size, "+" or b"") when ``line`` ends with a literal marker."""
    match = _LITERAL_RE.search(line)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass
class ImapRewriter:
    """``with ImapRewriter(host, port) as proxy:`` connect to ``proxy.port``; set the attributes any time."""

    target_host: str
    target_port: int
    add_header: bytes | None = None
    lose_append_answers: set[int] = field(default_factory=set)
    refuse: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    appends: int = 0
    refused: list[str] = field(default_factory=list)
    _listener: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sockets: list[socket.socket] = field(default_factory=list)

    def __enter__(self) -> ImapRewriter:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.target_host, self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            # The proxy writes a command in pieces (line, literal, line): with Nagle's algorithm each piece
            # after the first waits for the server's delayed ACK, some 40 ms per APPEND, which no real
            # network adds on loopback.
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            link = _Link(self, client, upstream)
            threading.Thread(target=link.up, daemon=True).start()
            threading.Thread(target=link.down, daemon=True).start()


class _Link:
    def __init__(self, proxy: ImapRewriter, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.lost_tags: set[bytes] = set()
        self.send_lock = threading.Lock()

    def _to_client(self, data: bytes) -> None:
        with self.send_lock:
            self.client.sendall(data)

    def _drop(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def up(self) -> None:
        reader = _Reader(self.client)
        try:
            while (line := reader.line()) is not None:
                words = line.split(None, 3)
                tag = words[0] if words else b""
                name = words[1].upper() if len(words) > 1 else b""
                if name == b"UID" and len(words) > 2:
                    name = words[2].upper()
                refusal = self.proxy.refuse.get(name.decode("ascii", "replace"))
                if refusal is not None and _literal(line) is None:
                    self.proxy.refused.append(name.decode())
                    answer = b" refused by the test proxy\r\n"
                    self._to_client(tag + b" " + refusal.encode() + answer)
                    continue
                if name == b"APPEND":
                    with self.proxy._lock:
                        self.proxy.appends += 1
                        if self.proxy.appends in self.proxy.lose_append_answers:
                            self.lost_tags.add(tag)
                    if not self._append(line, reader):
                        break
                    continue
                self.upstream.sendall(line)
                while (literal := _literal(line)) is not None:
                    data = reader.exactly(literal[0])
                    line = reader.line() if data is not None else None
                    if data is None or line is None:
                        return
                    self.upstream.sendall(data + line)
        except OSError:
            pass
        finally:
            self._drop()

    def _append(self, line: bytes, reader: _Reader) -> bool:
        """Forward one (MULTI)APPEND command, each message literal with ``add_header`` put first."""
        extra = self.proxy.add_header or b""
        while (literal := _literal(line)) is not None:
            size, plus = literal
            marker = b"{%d%s}\r\n" % (size, plus)
            self.upstream.sendall(line[: -len(marker)] + b"{%d%s}\r\n" % (size + len(extra), plus))
            data = reader.exactly(size)
            if data is None:
                return False
            self.upstream.sendall(extra + data)
            next_line = reader.line()
            if next_line is None:
                return False
            line = next_line
        self.upstream.sendall(line)
        return True

    def down(self) -> None:
        reader = _Reader(self.upstream)
        try:
            while (line := reader.line()) is not None:
                tag = line.split(None, 1)[0] if line.strip() else b""
                if tag in self.lost_tags:
                    # Stored by the server; the client never hears it.
                    self._drop()
                    return
                chunks = [line]
                while (literal := _literal(line)) is not None:
                    data = reader.exactly(literal[0])
                    line = reader.line() if data is not None else None
                    if data is None or line is None:
                        return
                    chunks += [data, line]
                self._to_client(b"".join(chunks))
        except OSError:
            pass
        finally:
            self._drop()
