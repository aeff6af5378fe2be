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

import collections
import contextlib
import enum
import errno
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from connector.config import Account
from connector.connections import ProbeTarget
from connector.errors import ConnectorError, LedgerError
from connector.ledger.idle import BATCH, IdlePoll
from connector.ledger.records import LedgerView
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
# Seconds a handed-over session waits for its QUIT's reply before it is closed anyway.
QUIT_WAIT = 2.0
_TERMINATORS = (b"\n.\r\n", b"\n.\n")  # as the client's reader: a bare-LF variant from sloppy servers


class _Step(enum.Enum):
    CONNECT = "connect"
    HANDSHAKE = "TLS handshake"
    GREETING = "greeting"
    CAPA = "CAPA"
    UTF8 = "UTF8"
    USER = "USER"
    PASS = "PASS"
    UIDL = "UIDL"
    QUIT = "QUIT"


_MULTILINE = (_Step.CAPA, _Step.UIDL)
# One address of a host, as getaddrinfo gives it: the family and what connect() takes.
_Address = tuple[socket.AddressFamily, Any]


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
    # The host's other addresses, tried in turn when a connection is refused at once (IPv6 unreachable).
    addresses: list[_Address]
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
        if self.step is _Step.CONNECT:
            return selectors.EVENT_WRITE
        return selectors.EVENT_READ

    # --- I/O ----------------------------------------------------------------------------------------

    def ready(self) -> int | None:
        """Go on after the selector's event; returns the events to wait for next (None: over)."""
        try:
            if self.step is _Step.CONNECT:
                self._connected()
                if self.step is _Step.CONNECT:  # under way to the next address
                    return self.events()
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
            self.sock.close()
            if not self.addresses:
                raise _HandOver(f"cannot connect: {errno.errorcode.get(error, error)}")
            self.sock = connect(self.addresses)  # the loop registers the new socket
            return
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
        found = [(at, len(t)) for t in _TERMINATORS if (at := self.buffer.find(t, start)) >= 0]
        if not found:
            self.scanned = max(status_end, len(self.buffer) - 4)
            return None
        return min(found)

    def _advance(self, status: bytes, body: bytes | None) -> None:
        step = self.step
        if step is _Step.QUIT:
            self.done = True
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
            if self.capabilities.has("UTF8"):
                # As the full poll (Pop3Client.enable_utf8): a server may take UTF-8 credentials only after
                # it, and a login that only the probe's session fails would fail at every poll.
                self._next(_Step.UTF8, b"UTF8\r\n")
            else:
                self._user()
        elif step is _Step.UTF8:
            self._user()  # refused: the full poll goes on as well (and logs it)
        elif step is _Step.USER:
            self._expect(reply.ok, "USER refused")
            self._next(_Step.PASS, b"PASS " + self.target.password.encode("utf-8") + b"\r\n")
        elif step is _Step.PASS:
            # Not the server's text: a server may echo the password in its refusal.
            self._expect(reply.ok, "PASS refused")
            self.logged_in = True
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
            self.idle = self.done = True

    def _user(self) -> None:
        self._next(_Step.USER, b"USER " + self.target.username.encode("utf-8") + b"\r\n")

    def _expect(self, condition: bool, reason: str) -> None:
        if not condition:
            raise _HandOver(reason)

    def _next(self, step: _Step, command: bytes) -> None:
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
        self.step = _Step.QUIT
        self.buffer.clear()
        self.deadline = min(self.deadline, time.monotonic() + QUIT_WAIT)
        try:
            self._send(b"QUIT\r\n")
        except (OSError, _HandOver):
            self.done = True  # closed at once; the full poll retries a locked maildrop ([IN-USE]) once


# Where the accounts to probe come from: up to ``most`` of them, waiting up to ``timeout`` seconds for the
# first; an empty list when none came, None when none will come any more.
Take = Callable[[int, float], Sequence[Account] | None]
# What became of one account: its poll, recorded (idle, or ``busy``), or None: the full poll must poll it,
# not sooner than the given seconds (the LOGIN-DELAY the server announced to the probe's login).
Done = Callable[[Account, PollResult | None, float], None]

# Seconds an idle poll waits for its batch's write at most: the write goes as soon as ``at_once`` idle polls
# wait, or no session is in flight, or the oldest has waited this long.
FLUSH_AFTER = 0.05


@dataclass
class Probed:
    """What ``IdleProbe.run`` did with a list of accounts: the polls it recorded (idle, or ``busy``: another
    poll took the account meanwhile) and the accounts the full poll must poll."""

    results: list[PollResult] = field(default_factory=list)
    full: list[Account] = field(default_factory=list)
    # Seconds the full poll of a handed-over account must wait before it logs in: the server announced
    # LOGIN-DELAY to the probe's session, and may refuse a login sooner (RFC 2449).
    wait: dict[str, float] = field(default_factory=dict)

    def done(self, account: Account, result: PollResult | None, wait: float) -> None:
        if result is not None:
            self.results.append(result)
            return
        self.full.append(account)
        if wait:
            self.wait[account.name] = wait


class IdleProbe:
    """Probes accounts for ``engine`` (its configuration, ledger, connections, clock and observers)."""

    def __init__(self, engine: SyncEngine, *, at_once: int) -> None:
        self._engine = engine
        self._at_once = max(1, at_once)

    def refusal(self, account: Account) -> str | None:
        """Why ``account``'s polls are all full polls (None: it may be probed)."""
        refused = probe_refusal(account, wire_traced=wire_log.isEnabledFor(logging.DEBUG))
        if refused is None and _target(self._engine, account) is None:
            refused = "its POP3 connection is not one the probe can open"
        return refused

    def run(self, accounts: Sequence[Account], stop: threading.Event | None = None) -> Probed:
        """Probe ``accounts``, each once; what the probe did not get to (a stop) is in ``full``."""
        probed = Probed()
        self.serve(in_batches(accounts), probed.done, stop)
        told = {result.account for result in probed.results} | {account.name for account in probed.full}
        probed.full += [account for account in accounts if account.name not in told]
        return probed

    def serve(self, take: Take, done: Done, stop: threading.Event | None = None) -> None:
        """Probe the accounts ``take`` gives until it gives None (or ``stop`` is set), telling ``done`` what
        became of each as soon as it is known: up to ``at_once`` sessions in flight, each account's ledger
        read with the others taken with it, each idle poll written with the others that ended near it."""
        _Stream(self._engine, self._at_once, take, done, stop or threading.Event()).run()


def in_batches(accounts: Sequence[Account]) -> Take:
    """``accounts`` as a ``Take`` (``IdleProbe.serve``): as many as asked for each time, then None."""
    given = 0

    def take(most: int, timeout: float) -> Sequence[Account] | None:
        nonlocal given
        if given >= len(accounts):
            return None
        batch = accounts[given : given + max(1, most)]
        given += len(batch)
        return batch

    return take


@dataclass
class _Waiting:
    """An account read from the ledger, waiting for a session."""

    account: Account
    view: LedgerView
    target: ProbeTarget


class _Stream:
    """The probe's one loop: sessions in flight on one selector, accounts taken as room frees, idle polls
    written in small batches (see ``IdleProbe.serve``)."""

    def __init__(
        self, engine: SyncEngine, at_once: int, take: Take, done: Done, stop: threading.Event
    ) -> None:
        self._engine = engine
        self._at_once = at_once
        self._take = take
        self._done = done
        self._stop = stop
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._running: dict[int, _Session] = {}
        self._unwritten: list[_Session] = []
        self._unwritten_since = 0.0
        self._exhausted = False
        self._addresses: dict[tuple[str, int], list[_Address]] = {}
        self._selector: selectors.BaseSelector = selectors.DefaultSelector()

    def run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            self._write()
            for session in list(self._running.values()):  # only after an error of the loop itself
                session.reason = session.reason or "the probe stopped"
                self._end(session)
            self._selector.close()

    def _step(self) -> bool:
        """One turn of the loop; False once there is nothing more to do."""
        stopping = self._stop.is_set()
        if stopping:
            while self._waiting:  # not started: the full poll sees the stop and says so
                self._hand_over(self._waiting.popleft().account, "stopping", 0.0)
        elif not self._exhausted and len(self._waiting) < self._at_once:
            busy = self._running or self._unwritten or self._waiting
            self._admit(BATCH - len(self._waiting), 0.0 if busy else 0.2)
        while self._waiting and len(self._running) < self._at_once and not stopping:
            self._start(self._waiting.popleft())
        if not self._running:
            self._write()
            return not (stopping or (self._exhausted and not self._waiting))
        now = time.monotonic()
        until = min(session.deadline for session in self._running.values())
        if self._unwritten:
            until = min(until, self._unwritten_since + FLUSH_AFTER)
        for key, _mask in self._selector.select(max(0.0, until - now)):
            self._ready(key)
        now = time.monotonic()
        for session in [s for s in self._running.values() if s.deadline <= now]:
            session.expire()
            self._end(session)
        if self._unwritten and (
            len(self._unwritten) >= self._at_once
            or not self._running
            or now >= self._unwritten_since + FLUSH_AFTER
        ):
            self._write()
        return True

    # --- accounts in ----------------------------------------------------------------------------------

    def _admit(self, most: int, timeout: float) -> None:
        """Take more accounts and read them from the ledger in one go; hand over those it refuses."""
        accounts = self._take(most, timeout)
        if accounts is None:
            self._exhausted = True
            return
        if not accounts:
            return
        engine = self._engine
        now = engine.clock()
        try:
            views = engine.ledger.idle.read([account.name for account in accounts], now)
        except LedgerError as exc:
            log.warning("idle probe: %s; polling %d account(s) in full", exc, len(accounts))
            for account in accounts:
                self._done(account, None, 0.0)
            return
        for account in accounts:
            view = views.get(account.name)
            target = _target(engine, account)
            refused = ledger_refusal(account, view, now) if target is not None else "no probe target"
            if refused is not None or view is None or target is None:
                self._hand_over(account, refused or "", 0.0)
            else:
                self._waiting.append(_Waiting(account, view, target))

    def _start(self, waiting: _Waiting) -> None:
        target = waiting.target
        try:
            addresses = list(self._addresses_of(target))
            sock = connect(addresses)
        except OSError as exc:
            self._hand_over(waiting.account, f"cannot connect: {exc}", 0.0)
            return
        session = _Session(
            account=waiting.account,
            view=waiting.view,
            target=target,
            kept=kept_uidls(waiting.view),
            sock=sock,
            addresses=addresses,
            deadline=time.monotonic() + target.timeout,
            started=self._engine.clock(),
            started_at=time.monotonic(),
        )
        self._selector.register(sock, session.events(), session)
        self._running[id(session)] = session

    def _addresses_of(self, target: ProbeTarget) -> list[_Address]:
        """The host's addresses, resolved once per loop (the first poll of each host)."""
        key = (target.host, target.port)
        found = self._addresses.get(key)
        if found is None:
            resolved = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            found = self._addresses[key] = [(family, address) for family, _t, _p, _n, address in resolved]
        return found

    # --- sessions -------------------------------------------------------------------------------------

    def _ready(self, key: selectors.SelectorKey) -> None:
        session: _Session = key.data
        try:
            wanted = session.ready()
        except Exception as exc:  # a bug must cost this account's probe, not the loop's
            log.exception("account %s: idle probe failed", session.account.name)
            session.reason = f"internal error: {exc.__class__.__name__}"
            session.done = True
            wanted = None
        if wanted is None:
            self._end(session)
        elif session.sock is not key.fileobj:
            # A new socket: the next address's (the last one's was closed, and its number may have been
            # reused) or the TLS one wrapping it. The selector must know the new one.
            self._selector.unregister(key.fileobj)
            self._selector.register(session.sock, wanted, session)
        elif wanted != key.events:
            self._selector.modify(session.sock, wanted, session)

    def _end(self, session: _Session) -> None:
        del self._running[id(session)]
        self._selector.unregister(session.sock)
        session.sock.close()
        if session.idle:
            if not self._unwritten:
                self._unwritten_since = time.monotonic()
            self._unwritten.append(session)
            return
        delay = session.capabilities.login_delay if session.logged_in else None
        self._hand_over(session.account, session.reason or "", float(delay or 0))

    def _hand_over(self, account: Account, reason: str, wait: float) -> None:
        log.debug("account %s: polled in full: %s", account.name, reason)
        self._done(account, None, wait)

    # --- idle polls out -------------------------------------------------------------------------------

    def _write(self) -> None:
        """The idle polls that ended since the last write, in one transaction; then their events."""
        sessions, self._unwritten = self._unwritten, []
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
            for session in sessions:
                self._done(session.account, None, 0.0)
            return
        ended = time.monotonic()
        for session, poll in zip(sessions, polls, strict=True):
            result = _result(session, poll, now, busy=poll.account_id in busy)
            engine.observers.emit(Started(result.account))
            if result.ok:
                engine.observers.emit(Planned(result.account, 0, 0, 0))
            planned = 0 if result.ok else None
            engine.observers.emit(Finished(result.account, result, ended - session.started_at, planned))
            self._done(session.account, result, 0.0)


def _result(session: _Session, poll: IdlePoll, now: datetime, *, busy: bool) -> PollResult:
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


def _target(engine: SyncEngine, account: Account) -> ProbeTarget | None:
    """``Connections.probe_target``, or None when building it fails: a ``ca_file`` removed or rewritten
    since the configuration was read fails the TLS context. The full poll meets the same failure and
    reports it as this account's error; raised here, it would end the whole round."""
    try:
        return engine.connections.probe_target(account)
    except Exception as exc:
        log.debug("account %s: no idle probe: %s: %s", account.name, exc.__class__.__name__, exc)
        return None


def connect(addresses: list[_Address]) -> socket.socket:
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
