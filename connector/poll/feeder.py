"""The idle probe's thread and the polls handed to it: how `run`'s scheduler and a distributed worker give a
poll to the probe (probe.py) and learn what became of it.

    hand_in(account) -> a Future -> the queue -> the probe's thread (IdleProbe.serve) -> the Future's
    Verdict: the poll recorded (idle, or ``busy``), or no result: poll it in full, not sooner than ``wait``

Every account handed in gets exactly one verdict, whatever becomes of the thread. If the probe fails (a
bug), each account it had, or had still to take, gets "poll it in full", and so does every account handed
in later: the failure is logged once and the probe is not started again. After a stop, or once the feeder
is closed, no account is taken any more: those still queued, and those handed in later, get "poll it in
full" too (the caller sees the stop and does not poll).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from connector.config import Account
from connector.poll.probe import IdleProbe
from connector.poll.result import PollResult

log = logging.getLogger("connector.poll.probe")


@dataclass(frozen=True)
class Verdict:
    """What the probe made of one poll: ``result``, the poll it recorded (idle, or ``busy``), or None: the
    full poll must poll the account, not sooner than ``wait`` seconds (the server's LOGIN-DELAY since the
    probe's login)."""

    result: PollResult | None
    wait: float = 0.0


FULL = Verdict(None)


class ProbeFeeder:
    """One thread running ``probe`` on the accounts handed in, until ``stop`` is set or it is closed."""

    def __init__(self, probe: IdleProbe, stop: threading.Event, *, name: str = "idle-probe") -> None:
        self.probe = probe
        self._stop = stop
        self._queue: queue.SimpleQueue[Account] = queue.SimpleQueue()
        # The accounts handed in whose verdict is not told yet, queued or in the probe. The lock makes
        # "hand in" and "the thread is over" one before the other: no account can be left without a verdict.
        self._pending: dict[str, Future[Verdict]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._ended = False
        self.failed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Take no more accounts: the thread ends once those handed in are done."""
        with self._lock:
            self._closed = True

    def join(self) -> None:
        if self._thread.is_alive():
            self._thread.join()

    def takes(self, account: Account) -> bool:
        """Whether ``account``'s poll may be handed in: the probe serves and may try the account."""
        return not (self._ended or self._closed) and self.probe.refusal(account) is None

    def hand_in(self, account: Account) -> Future[Verdict]:
        """``account``'s poll to the probe; the Future gets its verdict (at once when the probe is over)."""
        verdict: Future[Verdict] = Future()
        with self._lock:
            # One poll of an account at a time is the caller's rule; a second one goes to the full poll,
            # whose lease decides.
            if not (self._ended or self._closed or account.name in self._pending):
                self._pending[account.name] = verdict
                self._queue.put(account)
                return verdict
        verdict.set_result(FULL)
        return verdict

    def _take(self, most: int, timeout: float) -> list[Account] | None:
        """Up to ``most`` of the accounts handed in, waiting up to ``timeout`` for the first; None once
        closed and none is left (nothing is queued after ``close``)."""
        if self._closed and self._queue.empty():
            return None
        try:
            taken = [self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()]
        except queue.Empty:
            return []
        while len(taken) < most:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def _done(self, account: Account, result: PollResult | None, wait: float) -> None:
        with self._lock:
            verdict = self._pending.pop(account.name, None)
        if verdict is not None:  # outside the lock: the caller's callbacks run here
            verdict.set_result(Verdict(result, wait))

    def _serve(self) -> None:
        try:
            self.probe.serve(self._take, self._done, self._stop)
        except Exception:  # a bug in the probe must not cost the accounts it had: they are polled in full
            log.exception("idle probe failed: its accounts are polled in full, and all polls from now on")
            self.failed = True
        finally:
            with self._lock:
                self._ended = True
                left, self._pending = list(self._pending.values()), {}
            for verdict in left:  # those it had, and those still queued for it
                verdict.set_result(FULL)
