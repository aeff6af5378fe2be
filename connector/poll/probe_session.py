"""One account's idle probe session: a POP3 session on a non-blocking socket, advanced by what arrives.

The wire half of the idle probe (probe.py drives many of these from one ``selectors`` loop): connect
(trying the host's next address when one refuses at once), the TLS handshake, greeting, CAPA, UTF8 when
offered, USER, PASS, UIDL; then QUIT, not awaited, when the listing is what the ledger keeps
(policies/idle.py ``listing_is_idle``), or QUIT awaited for at most ``QUIT_WAIT`` seconds, so that the
full poll finds the maildrop unlocked, when anything else happened. Replies are parsed with the POP3
client's own pure parsers (connector/pop3/replies.py); a reply this session does not expect ends it with
the reason the full poll takes over.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from connector.config import Account
from connector.connections import ProbeTarget
from connector.errors import ConnectorError
from connector.ledger.records import LedgerView
from connector.policies.idle import capabilities_refusal, listing_is_idle
from connector.pop3 import (
    DEFAULT_MAX_LISTING_BYTES,
    MAX_STATUS_LINE,
    Capabilities,
    parse_capabilities,
    parse_status,
    split_listing,
    unstuff_block,
)
from connector.pop3.replies import parse_uidl_block_lenient
from connector.pop3.wire import TERMINATORS  # the client's reader's: a bare-LF variant from sloppy servers

_RECV = 256 * 1024
# Seconds a handed-over session waits for its QUIT's reply before it is closed anyway.
QUIT_WAIT = 2.0


class Step(enum.Enum):
    CONNECT = "connect"
    HANDSHAKE = "TLS handshake"
    GREETING = "greeting"
    CAPA = "CAPA"
    UTF8 = "UTF8"
    USER = "USER"
    PASS = "PASS"
    UIDL = "UIDL"
    QUIT = "QUIT"


_MULTILINE = (Step.CAPA, Step.UIDL)
# One address of a host, as getaddrinfo gives it: the family and what connect() takes.
Address = tuple[socket.AddressFamily, Any]


class _HandOver(Exception):
    """The probe cannot tell that this poll has nothing to do: the full poll takes the account."""


@dataclass
class ProbeSession:
    """One account's probe session on a non-blocking socket, advanced by what arrives."""

    account: Account
    view: LedgerView
    target: ProbeTarget
    kept: set[str]
    sock: socket.socket
    # The host's other addresses, tried in turn when a connection is refused at once (IPv6 unreachable).
    addresses: list[Address]
    deadline: float
    started: datetime
    started_at: float
    step: Step = Step.CONNECT
    # Grown in place: ``bytes +=`` copied the whole buffer at every read, quadratic in a long reply (a
    # 32 MiB CAPA took 4 s of this thread over TLS, every other session of the batch waiting).
    buffer: bytearray = field(default_factory=bytearray)
    # Where the search for a multi-line reply's terminator goes on (the part before was searched).
    scanned: int = 0
    capabilities: Capabilities = field(default_factory=Capabilities)
    logged_in: bool = False
    listed: int = 0
    # The outcome: True (nothing to do), or the reason the full poll takes over; and whether the session
    # is over (a handed-over one may still wait for its QUIT's reply).
    idle: bool = False
    reason: str | None = None
    done: bool = False

    def expire(self) -> None:
        """Its time is up: over, handed over (a handed-over one was only waiting for QUIT's reply)."""
        self.reason = self.reason or f"no reply within the timeout ({self.step.value})"
        self.done = True

    def events(self) -> int:
        """What the selector waits for in this step."""
        if self.step is Step.CONNECT:
            return selectors.EVENT_WRITE
        return selectors.EVENT_READ

    # --- I/O ----------------------------------------------------------------------------------------

    def ready(self) -> int | None:
        """Go on after the selector's event; returns the events to wait for next (None: over)."""
        try:
            if self.step is Step.CONNECT:
                self._connected()
                if self.step is Step.CONNECT:  # under way to the next address
                    return self.events()
            if self.step is Step.HANDSHAKE:
                wanted = self._handshake()
                if wanted is not None:
                    return wanted
            self._receive()
        except _HandOver as exc:
            self._hand_over(str(exc))
        except (OSError, ConnectorError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._hand_over(f"{self.step.value}: {exc.__class__.__name__}: {exc}")
        return None if self.done else self.events()

    def _connected(self) -> None:
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.sock.close()
            if not self.addresses:
                raise _HandOver(f"cannot connect: {errno.errorcode.get(error, error)}")
            self.sock = connect(self.addresses)  # the loop registers the new socket
            return
        context = self.target.context
        if context is None:
            self.step = Step.GREETING
            return
        self.sock = context.wrap_socket(
            self.sock, server_hostname=self.target.host, do_handshake_on_connect=False
        )
        self.step = Step.HANDSHAKE

    def _handshake(self) -> int | None:
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        self.step = Step.GREETING
        return None

    def _receive(self) -> None:
        """Read what arrived (a TLS socket may hold more than one record) and act on each whole reply."""
        while not self.done:
            try:
                chunk = self.sock.recv(_RECV)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            if not chunk:
                if self.step is Step.QUIT:
                    self.done = True
                    return
                raise _HandOver(f"the server closed the connection during {self.step.value}")
            self.buffer += chunk
            self._replies()

    def _send(self, command: bytes) -> None:
        try:
            sent = self.sock.send(command)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        if sent != len(command):  # a few bytes into an empty socket buffer: not seen, but not assumed
            raise _HandOver("the socket took only part of a command")

    # --- replies ------------------------------------------------------------------------------------

    def _replies(self) -> None:
        while not self.done:
            reply = self._next_reply()
            if reply is None:
                return
            status, body = reply
            self._advance(status, body)

    def _next_reply(self) -> tuple[bytes, bytes | None] | None:
        """The next whole reply in the buffer: its status line and, for a multi-line +OK, its body
        (unstuffed, terminator removed, every line ending in LF)."""
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > MAX_STATUS_LINE:
                raise _HandOver(f"{self.step.value}: status line longer than {MAX_STATUS_LINE} bytes")
            return None
        status = bytes(self.buffer[: end + 1])
        if self.step not in _MULTILINE or not status.startswith(b"+"):
            del self.buffer[: end + 1]
            return status, None
        found = self._terminator(end)
        if found is None:
            if len(self.buffer) > DEFAULT_MAX_LISTING_BYTES:
                raise _HandOver(f"{self.step.value}: reply longer than {DEFAULT_MAX_LISTING_BYTES} bytes")
            return None
        at, length = found
        body = bytes(self.buffer[end + 1 : at + 1])
        del self.buffer[: at + length]
        self.scanned = 0
        return status, unstuff_block(body)

    def _terminator(self, status_end: int) -> tuple[int, int] | None:
        """Where the multi-line reply ends (the LF before its "." line) and the terminator's length."""
        start = max(status_end, self.scanned)
        found = [(at, len(t)) for t in TERMINATORS if (at := self.buffer.find(t, start)) >= 0]
        if not found:
            self.scanned = max(status_end, len(self.buffer) - 4)
            return None
        return min(found)

    def _advance(self, status: bytes, body: bytes | None) -> None:
        step = self.step
        if step is Step.QUIT:
            self.done = True
            return
        reply = parse_status(status)  # a SourceProtocolError hands over
        if step is Step.GREETING:
            self._expect(reply.ok, "the greeting is not +OK")
            self._next(Step.CAPA, b"CAPA\r\n")
        elif step is Step.CAPA:
            if reply.ok:  # a server that refuses CAPA has none (as Pop3Client.capa)
                assert body is not None
                self.capabilities = parse_capabilities(split_listing(body))
            conflict = capabilities_refusal(self.capabilities, self.account)
            self._expect(conflict is None, f"CAPA: {conflict}")
            if self.capabilities.has("UTF8"):
                # As the full poll (Pop3Client.enable_utf8): a server may take UTF-8 credentials only after
                # it, and a login that only the probe's session fails would fail at every poll.
                self._next(Step.UTF8, b"UTF8\r\n")
            else:
                self._user()
        elif step is Step.UTF8:
            self._user()  # refused: the full poll goes on as well (and logs it)
        elif step is Step.USER:
            self._expect(reply.ok, "USER refused")
            self._next(Step.PASS, b"PASS " + self.target.password.encode("utf-8") + b"\r\n")
        elif step is Step.PASS:
            # Not the server's text: a server may echo the password in its refusal.
            self._expect(reply.ok, "PASS refused")
            self.logged_in = True
            self._next(Step.UIDL, b"UIDL\r\n")
        else:
            self._expect(reply.ok and body is not None, "UIDL refused")
            assert body is not None
            listing, unlisted = parse_uidl_block_lenient(body)
            self.listed = len(listing) + len(unlisted)
            idle = listing_is_idle(listing, len(unlisted), self.kept, self.view)
            self._expect(idle, "the listing is not what the ledger keeps")
            # Not awaited: nothing was marked for deletion, so the reply decides nothing (RFC 1939 §6); nor
            # needed (a session closed without it deletes nothing either).
            with contextlib.suppress(OSError, _HandOver):
                self._send(b"QUIT\r\n")
            self.idle = self.done = True

    def _user(self) -> None:
        self._next(Step.USER, b"USER " + self.target.username.encode("utf-8") + b"\r\n")

    def _expect(self, condition: bool, reason: str) -> None:
        if not condition:
            raise _HandOver(reason)

    def _next(self, step: Step, command: bytes) -> None:
        self.step = step
        self._send(command)

    def _hand_over(self, reason: str) -> None:
        """The full poll takes the account. A session that got as far as a login sends QUIT and waits a
        moment for its reply (or the server's close), as a server holds the maildrop's lock until then and
        the full poll's login would find it locked; the loop goes on meanwhile."""
        self.reason = reason
        if not self.logged_in or self.done:
            self.done = True
            return
        self.step = Step.QUIT
        self.buffer.clear()
        self.deadline = min(self.deadline, time.monotonic() + QUIT_WAIT)
        try:
            self._send(b"QUIT\r\n")
        except (OSError, _HandOver):
            self.done = True  # closed at once; the full poll retries a locked maildrop ([IN-USE]) once


def connect(addresses: list[Address]) -> socket.socket:
    """A non-blocking connection under way to the first of ``addresses`` that does not refuse at once
    (taken off the list); OSError when all do."""
    error: OSError | None = None
    while addresses:
        family, address = addresses.pop(0)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code in (0, errno.EINPROGRESS):
            return sock
        sock.close()
        error = OSError(code, os.strerror(code))
    raise error or OSError(errno.EHOSTUNREACH, "no address")
