"""The idle probe: many accounts' polls with nothing to do, in one thread, recorded together.

At 100,000 mailboxes nearly every poll finds the listing the ledger already keeps. The full poll
(engine.py) costs several times a bare poplib loop for that, most of it in its design rather than its
checks: a thread per poll (a GIL hand-off at every socket call), three ledger transactions per poll, the
layers of a blocking client (docs/benchmarks.md, issue 16). The probe does the same wire work for up to
``at_once`` accounts at a time, each a ``ProbeSession`` (probe_session.py) on a non-blocking socket, all
driven by one ``selectors`` loop, and the ledger's for many accounts at once (connector/ledger/idle.py):

    accounts taken as room frees -> one read for them -> policies/idle.py ``ledger_refusal``? -> full poll
    -> a ProbeSession each: connect, TLS, greeting, CAPA, UTF8, USER, PASS, UIDL, QUIT
    -> listing is what the ledger keeps (policies/idle.py ``listing_is_idle``)? no -> the full poll
    -> yes: written with the idle polls that ended near it (the lease passed through, the poll's result),
       then Started, Planned, Finished to the observers

The probe decides only "nothing to do". Whatever else it meets (a new message, a refused login, a reply
it does not expect, a timeout, a TLS failure) it hands the account over to the full poll, which decides,
reports and records: so the exactly-once rules stay in one place, and the probe never fetches, delivers,
deletes or records a message. A handed-over account costs one more login than before (the probe's), so
an account whose last poll failed or delivered mail is not probed at all (a wrong password would count
twice against the server's lockout; mail comes in bursts).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from connector.config import Account
from connector.connections import ProbeTarget
from connector.errors import LedgerError
from connector.ledger.idle import BATCH, IdlePoll
from connector.ledger.records import LedgerView
from connector.policies.idle import (
    kept_uidls,
    ledger_refusal,
    probe_refusal,
)
from connector.policies.retry import success_delay
from connector.policies.server_limits import login_delay
from connector.poll.events import Finished, Planned, Started
from connector.poll.probe_session import ProbeSession, connect
from connector.poll.resolver import Host, HostAddresses
from connector.poll.result import PollResult
from connector.pop3.client import wire_log

if TYPE_CHECKING:
    from connector.poll.engine import SyncEngine

log = logging.getLogger("connector.poll.probe")

# Where the accounts to probe come from: up to ``most`` of them, waiting up to ``timeout`` seconds for the
# first; an empty list when none came, None when none will come any more.
Take = Callable[[int, float], Sequence[Account] | None]
# What became of one account: its poll, recorded (idle, or ``busy``), or None: the full poll must poll it,
# not sooner than the given seconds (the LOGIN-DELAY the server announced to the probe's login).
Done = Callable[[Account, PollResult | None, float], None]

# Seconds the loop waits on its sessions at most before it asks for more accounts: in `run` they come one by
# one as they fall due, and a session waiting on a silent server (up to its timeout) must not hold them.
TAKE_EVERY = 0.05
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
        if refused is None and not self._engine.connections.probes:
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

    @property
    def host(self) -> Host:
        return (self.target.host, self.target.port)


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
        self._running: dict[int, ProbeSession] = {}
        self._unwritten: list[ProbeSession] = []
        self._unwritten_since = 0.0
        self._exhausted = False
        self._selector: selectors.BaseSelector = selectors.DefaultSelector()
        # Host names are looked up in threads of their own (resolver.py), which wake the loop through this
        # pair; the accounts of a host whose first lookup runs wait here, each until its own timeout.
        self._wakeup, self._waker = socket.socketpair()
        self._wakeup.setblocking(False)
        self._waker.setblocking(False)
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        self._hosts = HostAddresses(self._wake)
        self._looking_up: dict[Host, list[tuple[_Waiting, float]]] = {}

    def run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            self._write()
            for session in list(self._running.values()):  # only after an error of the loop itself
                session.reason = session.reason or "the probe stopped"
                self._end(session)
            self._give_up_lookups(lambda _deadline: True, "the probe stopped")
            self._selector.close()
            self._wakeup.close()
            self._waker.close()

    def _step(self) -> bool:
        """One turn of the loop; False once there is nothing more to do."""
        stopping = self._stop.is_set()
        if stopping:
            while self._waiting:  # not started: the full poll sees the stop and says so
                self._hand_over(self._waiting.popleft().account, "stopping", 0.0)
            self._give_up_lookups(lambda _deadline: True, "stopping")
        elif not self._exhausted and len(self._waiting) < self._at_once:
            busy = self._running or self._unwritten or self._waiting or self._looking_up
            self._admit(BATCH - len(self._waiting), 0.0 if busy else 0.2)
        while self._waiting and len(self._running) < self._at_once and not stopping:
            self._start(self._waiting.popleft())
        if not self._running and not self._looking_up:
            self._write()
            return not (stopping or (self._exhausted and not self._waiting))
        now = time.monotonic()
        deadlines = [session.deadline for session in self._running.values()]
        deadlines += [deadline for parked in self._looking_up.values() for _waiting, deadline in parked]
        until = min(deadlines)
        if self._unwritten:
            until = min(until, self._unwritten_since + FLUSH_AFTER)
        if not self._exhausted and not stopping:
            until = min(until, now + TAKE_EVERY)
        for key, _mask in self._selector.select(max(0.0, until - now)):
            if key.data is None:
                self._looked_up()
            else:
                self._ready(key)
        now = time.monotonic()
        for session in [s for s in self._running.values() if s.deadline <= now]:
            session.expire()
            self._end(session)
        self._give_up_lookups(lambda deadline: deadline <= now, "its host name was not looked up in time")
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
            refused = (
                ledger_refusal(account, view, now)
                if target is not None
                else "the probe cannot log in as the full poll would (credentials, TLS context)"
            )
            if refused is not None or view is None or target is None:
                self._hand_over(account, refused or "", 0.0)
            else:
                self._waiting.append(_Waiting(account, view, target))

    def _start(self, waiting: _Waiting) -> None:
        target = waiting.target
        addresses = self._hosts.get(waiting.host)
        if addresses is None:  # its first lookup runs: the account waits for it, up to its own timeout
            deadline = time.monotonic() + target.timeout
            self._looking_up.setdefault(waiting.host, []).append((waiting, deadline))
            return
        try:
            sock = connect(addresses)
        except OSError as exc:
            self._hand_over(waiting.account, f"cannot connect: {exc}", 0.0)
            return
        session = ProbeSession(
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

    # --- host names ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        """From a lookup thread: the loop's ``select`` returns."""
        with contextlib.suppress(OSError):  # full (it will wake anyway), or closed (the loop is over)
            self._waker.send(b"x")

    def _looked_up(self) -> None:
        """Lookups ended: their accounts wait for a session again, or are handed over."""
        with contextlib.suppress(OSError):
            while self._wakeup.recv(4096):
                pass
        for host, outcome in self._hosts.finished():
            parked = self._looking_up.pop(host, [])
            if isinstance(outcome, OSError):
                for waiting, _deadline in parked:
                    self._hand_over(waiting.account, f"cannot look up {host[0]}: {outcome}", 0.0)
            else:
                self._waiting.extendleft(waiting for waiting, _deadline in reversed(parked))

    def _give_up_lookups(self, due: Callable[[float], bool], reason: str) -> None:
        """Hand over the accounts waiting for a lookup whose deadline ``due`` says has come."""
        for host in list(self._looking_up):
            parked = self._looking_up[host]
            for waiting, deadline in [entry for entry in parked if due(entry[1])]:
                parked.remove((waiting, deadline))
                self._hand_over(waiting.account, reason, 0.0)
            if not parked:
                del self._looking_up[host]

    # --- sessions -------------------------------------------------------------------------------------

    def _ready(self, key: selectors.SelectorKey) -> None:
        session: ProbeSession = key.data
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

    def _end(self, session: ProbeSession) -> None:
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


def _result(session: ProbeSession, poll: IdlePoll, now: datetime, *, busy: bool) -> PollResult:
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
