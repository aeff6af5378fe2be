"""The idle probe: many accounts' polls with nothing to do, in one thread, recorded in one write per batch.

At 100,000 mailboxes nearly every poll finds the listing the ledger already keeps. The full poll
(engine.py) costs several times a bare poplib loop for that, most of it in its design rather than its
checks: a thread per poll (a GIL hand-off at every socket call), three ledger transactions per poll, the
layers of a blocking client (docs/benchmarks.md, issue 16). The probe does the same wire work for up to
``at_once`` accounts at a time on non-blocking sockets driven by one ``selectors`` loop, and the ledger's
for a batch at once (connector/ledger/idle.py):

    batch read -> per account: policies/idle.py ``ledger_refusal``? -> the full poll
               -> connect (TLS handshake) -> greeting -> CAPA -> USER -> PASS -> UIDL -> QUIT (unawaited)
               -> policies/idle.py ``listing_is_idle``? -> recorded idle; else QUIT awaited -> the full poll
    batch write: each idle poll's lease passed through and its result, as the full poll writes them

The probe decides only "nothing to do". Whatever else it meets (a new message, a refused login, a reply
it does not expect, a timeout, a TLS failure) it hands the account over to the full poll, which decides,
reports and records: so the exactly-once rules stay in one place, and the probe never fetches, delivers,
deletes or records a message. A handed-over account costs one more login than before (the probe's), so
an account whose last poll failed is not probed at all (a wrong password would count twice against the
server's lockout).

Observers get the same events as from a full idle poll (Started, Planned, Finished), once the batch's
write has committed.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from connector.config import Account
from connector.connections import ProbeTarget
from connector.errors import ConnectorError, LedgerError
from connector.ledger.idle import IdlePoll, chunks
from connector.ledger.records import Clock, LedgerView
from connector.policies.idle import (
    capabilities_refusal,
    kept_uidls,
    ledger_refusal,
    listing_is_idle,
    probe_refusal,
)
from connector.policies.retry import success_delay
from connector.policies.server_limits import login_delay
from connector.poll.events import Finished, Planned, Started
from connector.poll.result import PollResult
from connector.pop3 import (
    DEFAULT_MAX_LISTING_BYTES,
    MAX_STATUS_LINE,
    Capabilities,
    parse_capabilities,
    parse_status,
    split_listing,
    unstuff_block,
)
from connector.pop3.client import wire_log
from connector.pop3.replies import parse_uidl_block_lenient

if TYPE_CHECKING:
    from connector.poll.engine import SyncEngine

log = logging.getLogger("connector.poll.probe")

_RECV = 256 * 1024
_TERMINATORS = (b"\n.\r\n", b"\n.\n")  # as the client's reader: a bare-LF variant from sloppy servers


class _Step(enum.Enum):
    CONNECT = "connect"
    HANDSHAKE = "TLS handshake"
    GREETING = "greeting"
    CAPA = "CAPA"
    USER = "USER"
    PASS = "PASS"
    UIDL = "UIDL"
    QUIT = "QUIT"


_MULTILINE = (_Step.CAPA, _Step.UIDL)


class _HandOver(Exception):
    """The probe cannot tell that this poll has nothing to do: the full poll takes the account."""


@dataclass
class _Session:
    """One account's probe session on a non-blocking socket, advanced by what arrives."""

    account: Account
    view: LedgerView
    target: ProbeTarget
    kept: set[str]
    sock: socket.socket
    deadline: float
    started: datetime
    started_at: float
    step: _Step = _Step.CONNECT
    # Grown in place: ``bytes +=`` copied the whole buffer at every read, quadratic in a long reply (a
    # 32 MiB CAPA took 4 s of this thread over TLS, every other session of the batch waiting).
    buffer: bytearray = field(default_factory=bytearray)
    # Where the search for a multi-line reply's terminator goes on (the part before was searched).
    scanned: int = 0
    capabilities: Capabilities = field(default_factory=Capabilities)
    listed: int = 0
    # Set once the session is over: True (nothing to do), or the reason the full poll takes over.
    idle: bool = False
    reason: str | None = None

    @property
    def done(self) -> bool:
        return self.idle or self.reason is not None

    def events(self) -> int:
        """What the selector waits for in this step."""
        if self.step is _Step.CONNECT:
            return selectors.EVENT_WRITE
        return selectors.EVENT_READ

    # --- I/O ----------------------------------------------------------------------------------------

    def ready(self) -> int | None:
        """Go on after the selector's event; returns the events to wait for next (None: over)."""
        try:
            if self.step is _Step.CONNECT:
                self._connected()
            if self.step is _Step.HANDSHAKE:
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
            raise _HandOver(f"cannot connect: {errno.errorcode.get(error, error)}")
        context = self.target.context
        if context is None:
            self.step = _Step.GREETING
            return
        self.sock = context.wrap_socket(
            self.sock, server_hostname=self.target.host, do_handshake_on_connect=False
        )
        self.step = _Step.HANDSHAKE

    def _handshake(self) -> int | None:
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        self.step = _Step.GREETING
        return None

    def _receive(self) -> None:
        """Read what arrived (a TLS socket may hold more than one record) and act on each whole reply."""
        while not self.done:
            try:
                chunk = self.sock.recv(_RECV)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            if not chunk:
                if self.step is _Step.QUIT:
                    self.reason = self.reason or "closed"
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
        found = [(at, len(t)) for t in _TERMINATORS if (at := self.buffer.find(t, start)) >= 0]
        if not found:
            self.scanned = max(status_end, len(self.buffer) - 4)
            return None
        return min(found)

    def _advance(self, status: bytes, body: bytes | None) -> None:
        step = self.step
        if step is _Step.QUIT:
            self.reason = self.reason or "QUIT"
            return
        reply = parse_status(status)  # a SourceProtocolError hands over
        if step is _Step.GREETING:
            self._expect(reply.ok, "the greeting is not +OK")
            self._next(_Step.CAPA, b"CAPA\r\n")
        elif step is _Step.CAPA:
            if reply.ok:  # a server that refuses CAPA has none (as Pop3Client.capa)
                assert body is not None
                self.capabilities = parse_capabilities(split_listing(body))
            conflict = capabilities_refusal(self.capabilities, self.account)
            self._expect(conflict is None, f"CAPA: {conflict}")
            self._next(_Step.USER, b"USER " + self.target.username.encode("utf-8") + b"\r\n")
        elif step is _Step.USER:
            self._expect(reply.ok, "USER refused")
            self._next(_Step.PASS, b"PASS " + self.target.password.encode("utf-8") + b"\r\n")
        elif step is _Step.PASS:
            # Not the server's text: a server may echo the password in its refusal.
            self._expect(reply.ok, "PASS refused")
            self._next(_Step.UIDL, b"UIDL\r\n")
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
            self.idle = True

    def _expect(self, condition: bool, reason: str) -> None:
        if not condition:
            raise _HandOver(reason)

    def _next(self, step: _Step, command: bytes) -> None:
        self.step = step
        self._send(command)

    def _hand_over(self, reason: str) -> None:
        """End the session so that the full poll's login finds the maildrop unlocked: QUIT, and its reply
        awaited when the session got as far as a login (a server holds the maildrop's lock until then)."""
        logged_in = self.step in (_Step.UIDL,)
        self.reason = reason
        if logged_in:
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(max(0.1, self.deadline - time.monotonic()))
                self.sock.sendall(b"QUIT\r\n")
                self.sock.recv(_RECV)
            except OSError:
                pass  # closed below; the full poll retries a locked maildrop ([IN-USE]) once
        self.step = _Step.QUIT


@dataclass
class Probed:
    """What the probe did with a batch of accounts: the polls it recorded (idle, or ``busy``: another
    poll took the account meanwhile) and the accounts the full poll must poll."""

    results: list[PollResult] = field(default_factory=list)
    full: list[Account] = field(default_factory=list)


class IdleProbe:
    """Probes accounts for ``engine`` (its configuration, ledger, connections, clock and observers)."""

    def __init__(self, engine: SyncEngine, *, at_once: int) -> None:
        self._engine = engine
        self._at_once = max(1, at_once)

    def refusal(self, account: Account) -> str | None:
        """Why ``account``'s polls are all full polls (None: it may be probed)."""
        refused = probe_refusal(account, wire_traced=wire_log.isEnabledFor(logging.DEBUG))
        if refused is None and self._target(account) is None:
            refused = "its POP3 connection is not one the probe can open"
        return refused

    def _target(self, account: Account) -> ProbeTarget | None:
        """``Connections.probe_target``, or None when building it fails: a ``ca_file`` removed or rewritten
        since the configuration was read fails the TLS context. The full poll meets the same failure and
        reports it as this account's error; raised here, it would end the whole round."""
        try:
            return self._engine.connections.probe_target(account)
        except Exception as exc:
            log.debug("account %s: no idle probe: %s: %s", account.name, exc.__class__.__name__, exc)
            return None

    def run(self, accounts: Sequence[Account], stop: threading.Event | None = None) -> Probed:
        """Probe ``accounts`` (each one once, in batches of connector/ledger/idle.py's ``BATCH``)."""
        probed = Probed()
        for batch in chunks(accounts):
            if stop is not None and stop.is_set():
                probed.full.extend(batch)  # the caller's full polls see the stop too
                continue
            self._batch(batch, probed, stop)
        return probed

    def _batch(self, accounts: Sequence[Account], probed: Probed, stop: threading.Event | None) -> None:
        engine = self._engine
        now = engine.clock()
        try:
            views = engine.ledger.idle.read([account.name for account in accounts], now)
        except LedgerError as exc:
            log.warning("idle probe: %s; polling %d account(s) in full", exc, len(accounts))
            probed.full.extend(accounts)
            return
        waiting: list[tuple[Account, LedgerView, ProbeTarget]] = []
        for account in accounts:
            view = views.get(account.name)
            target = self._target(account)
            refused = ledger_refusal(account, view, now) if target is not None else "no probe target"
            if refused is not None or view is None or target is None:
                _handed_over(account, refused or "", probed)
                continue
            waiting.append((account, view, target))
        loop = _Loop(engine.clock, self._at_once)
        sessions = loop.run(waiting, stop)
        self._record([s for s in sessions if s.idle], probed)
        for session in sessions:
            if not session.idle:
                _handed_over(session.account, session.reason or "", probed)
        for account, reason in loop.unstarted:
            _handed_over(account, reason, probed)

    def _record(self, sessions: Sequence[_Session], probed: Probed) -> None:
        if not sessions:
            return
        engine = self._engine
        now = engine.clock()
        polls = []
        for session in sessions:
            account = session.account
            delay = success_delay(
                account.poll_interval, account.poll_jitter, server_delay=login_delay(session.capabilities)
            )
            view = session.view
            polls.append(IdlePoll(view.account_id, view.lease, session.started, now + delay, session.listed))
        try:
            busy = engine.ledger.idle.record(polls, now)
        except LedgerError as exc:
            # Nothing of the batch was written: the full polls record these accounts (or fail as they do).
            log.warning("idle probe: %s; polling %d account(s) in full", exc, len(sessions))
            probed.full.extend(session.account for session in sessions)
            return
        ended = time.monotonic()
        for session, poll in zip(sessions, polls, strict=True):
            result = self._result(session, poll, now, busy=poll.account_id in busy)
            engine.observers.emit(Started(result.account))
            if result.ok:
                engine.observers.emit(Planned(result.account, 0, 0, 0))
            planned = 0 if result.ok else None
            engine.observers.emit(Finished(result.account, result, ended - session.started_at, planned))
            probed.results.append(result)

    def _result(self, session: _Session, poll: IdlePoll, now: datetime, *, busy: bool) -> PollResult:
        account = session.account
        result = PollResult(account=account.name, listed=session.listed, next_poll_at=poll.next_poll_at)
        if busy:
            result.status = "busy"
            result.error = (
                f"account {account.name}: another poll took the account while the idle probe polled it; "
                "skipped, as busy"
            )
            result.next_poll_at = now + account.poll_interval
            log.warning("%s", result.error)
            return result
        log.debug(
            "account %s: %d on server, nothing new (idle probe); next poll at %s",
            account.name,
            session.listed,
            poll.next_poll_at.isoformat(timespec="seconds"),
        )
        return result


def _handed_over(account: Account, reason: str, probed: Probed) -> None:
    log.debug("account %s: polled in full: %s", account.name, reason)
    probed.full.append(account)


class _Loop:
    """The selector loop: up to ``at_once`` sessions in flight, each started as another ends."""

    def __init__(self, clock: Clock, at_once: int) -> None:
        self._clock = clock
        self._at_once = at_once
        self._addresses: dict[tuple[str, int], tuple[socket.AddressFamily, tuple[str, int]]] = {}
        # Accounts whose session never started, and why (the full poll takes them).
        self.unstarted: list[tuple[Account, str]] = []

    def run(
        self, waiting: Sequence[tuple[Account, LedgerView, ProbeTarget]], stop: threading.Event | None
    ) -> list[_Session]:
        sessions: list[_Session] = []
        queue = list(reversed(waiting))
        running: dict[int, _Session] = {}
        with selectors.DefaultSelector() as selector:
            while queue or running:
                if stop is not None and stop.is_set():
                    # Not started: the full poll sees the stop and says so.
                    self.unstarted.extend((account, "stopping") for account, _view, _target in queue)
                    queue.clear()
                while queue and len(running) < self._at_once:
                    session = self._start(*queue.pop())
                    if session is None:
                        continue
                    sessions.append(session)
                    if not session.done:
                        selector.register(session.sock, session.events(), session)
                        running[id(session)] = session
                if not running:
                    continue
                earliest = min(session.deadline for session in running.values())
                for key, _mask in selector.select(max(0.0, earliest - time.monotonic())):
                    self._ready(selector, key, running)
                now = time.monotonic()
                if earliest <= now:
                    for session in [s for s in running.values() if s.deadline <= now]:
                        session.reason = f"no reply within the timeout ({session.step.value})"
                        del running[id(session)]
                        _close(selector, session)
        return sessions

    @staticmethod
    def _ready(
        selector: selectors.BaseSelector, key: selectors.SelectorKey, running: dict[int, _Session]
    ) -> None:
        session: _Session = key.data
        try:
            wanted = session.ready()
        except Exception as exc:  # a bug must cost this account's probe, not the batch's
            log.exception("account %s: idle probe failed", session.account.name)
            session.reason = f"internal error: {exc.__class__.__name__}"
            wanted = None
        if wanted is None:
            del running[id(session)]
            _close(selector, session)
        elif wanted != key.events:
            selector.modify(session.sock, wanted, session)

    def _start(self, account: Account, view: LedgerView, target: ProbeTarget) -> _Session | None:
        try:
            family, address = self._address(target)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self.unstarted.append((account, f"cannot connect: {exc}"))
            return None
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS):
            sock.close()
            self.unstarted.append((account, f"cannot connect: {errno.errorcode.get(error, error)}"))
            return None
        return _Session(
            account=account,
            view=view,
            target=target,
            kept=kept_uidls(view),
            sock=sock,
            deadline=time.monotonic() + target.timeout,
            started=self._clock(),
            started_at=time.monotonic(),
        )

    def _address(self, target: ProbeTarget) -> tuple[socket.AddressFamily, tuple[str, int]]:
        """The host's first address, resolved once per batch (the full poll tries the others)."""
        key = (target.host, target.port)
        found = self._addresses.get(key)
        if found is None:
            family, _type, _proto, _name, address = socket.getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM
            )[0]
            found = self._addresses[key] = (family, (str(address[0]), int(address[1])))
        return found


def _close(selector: selectors.BaseSelector, session: _Session) -> None:
    selector.unregister(session.sock)
    session.sock.close()
