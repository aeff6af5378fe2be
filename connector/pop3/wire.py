"""Reading a POP3 byte stream: a buffered reader that can hand over whole message bodies in large pieces,
and the decoder that turns the wire form of a body into message bytes.

Bodies are cut at the terminator with ``bytes.find`` on large buffers and unstuffed with ``bytes.replace``,
so the cost per message does not grow with its number of lines (a per-line loop in Python was the largest
cost of a RETR). With PIPELINING the buffer may already hold the next replies; the reader never consumes
past the terminator of the reply being read.
"""

from __future__ import annotations

import socket

# Bodies are handed over in pieces of at most this many bytes, so a single enormous line never has to fit
# in memory and a sink sees writes of a bounded size.
BODY_PIECE = 64 * 1024
_RECV_SIZE = 256 * 1024
TERMINATORS = (b"\n.\r\n", b"\n.\n")  # a bare-LF variant is accepted from sloppy servers
_LINE_START_TERMINATORS = (b".\r\n", b".\n")


class ConnectionClosed(Exception):
    """The peer closed the connection before the reply was complete."""


class StreamReader:
    """Buffered reads from a socket (plain or TLS). Socket errors (``OSError``) propagate to the caller."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _fill(self) -> bool:
        """Read more from the socket; False at end of stream."""
        data = self._sock.recv(_RECV_SIZE)
        if not data:
            return False
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        return True

    def readline(self, limit: int) -> bytes:
        """Up to and including the next LF, or ``limit`` bytes, or what is left at end of stream."""
        while True:
            end = self._buf.find(b"\n", self._pos, self._pos + limit)
            if end >= 0:
                return self._take(end + 1)
            if self.buffered >= limit:
                return self._take(self._pos + limit)
            if not self._fill():
                return self._take(len(self._buf))

    def _take(self, end: int) -> bytes:
        data = self._buf[self._pos : end]
        self._pos = end
        return data

    def body_piece(self, at_line_start: bool) -> tuple[bytes, bool]:
        """The next piece of a multi-line reply body (wire form, terminator excluded) and whether the
        terminator followed it. Pieces end at a line end unless a line is longer than ``BODY_PIECE``."""
        while True:
            piece = self._next_piece(at_line_start)
            if piece is not None:
                return piece
            if not self._fill():
                raise ConnectionClosed

    def _next_piece(self, at_line_start: bool) -> tuple[bytes, bool] | None:
        buf, pos = self._buf, self._pos
        if at_line_start:
            for terminator in _LINE_START_TERMINATORS:
                if buf.startswith(terminator, pos):
                    self._pos = pos + len(terminator)
                    return b"", True
            if buf.startswith(b".", pos) and len(buf) - pos < 3:
                return None  # may be the start of the terminator: wait for more
        window_end = pos + BODY_PIECE
        ends = [buf.find(t, pos, window_end + len(t)) for t in TERMINATORS]
        found = [(end, len(t)) for end, t in zip(ends, TERMINATORS, strict=True) if end >= 0]
        if found:
            end, length = min(found)
            piece = buf[pos : end + 1]
            self._pos = end + length
            return piece, True
        last_lf = buf.rfind(b"\n", pos, window_end)
        if last_lf >= 0:
            return self._take(last_lf + 1), False
        if len(buf) - pos >= BODY_PIECE:
            return self._take(window_end), False
        return None


class BodyDecoder:
    """Wire form of a multi-line reply body -> message bytes: dot-unstuffing, CRLF line endings.

    Pieces may be cut anywhere; the decoder remembers whether the next piece starts a line (for
    unstuffing) and holds back a trailing CR until the next piece says whether it starts a CRLF.
    A bare LF or a bare CR becomes CRLF.
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self._pending_cr = False
        # Whether any line ending had to be repaired (bare LF or bare CR), for the ledger.
        self.repaired = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        ends_line = chunk.endswith(b"\n")
        if self.at_line_start and chunk.startswith(b"."):
            chunk = chunk[1:]
        # Only LF starts a line for unstuffing (as RFC 1939 counts lines); a stuffed line loses one dot.
        chunk = chunk.replace(b"\n.", b"\n")
        if self._pending_cr:
            chunk = b"\r" + chunk
        self._pending_cr = chunk.endswith(b"\r")
        if self._pending_cr:
            chunk = chunk[:-1]
        self.at_line_start = ends_line
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            self.repaired = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        return chunk

    def finish(self) -> bytes:
        """What is held back at the end of the body (a final bare CR becomes a line end)."""
        if self._pending_cr:
            self._pending_cr = False
            self.repaired = True
            return b"\r\n"
        return b""
