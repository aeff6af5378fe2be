"""Runs ``pop-connector`` in this process, killing it with SIGKILL at a chosen point of the Nth message.

Usage: python -m tests.acceptance.crash_driver POINT N -- CLI ARGS...
POINT is one of: before-pending, before-append, before-delivered-record, before-quit, and for catch-all
accounts before-recipient-record (the Nth recipient's copy is in its mailbox, its ledger row not yet);
these run with one message per APPEND, so that the Nth call is the Nth message. before-multiappend and
after-multiappend kill around the Nth MULTIAPPEND of several messages (after: they are stored, their
``delivered`` records not written); the first ``max_batch`` call (once the destination session, opened
while the first message is fetched, is open) then waits a moment, so that the fetching thread has every
message ready and they all go in the first batch. before-createitem-batch and
after-createitem-batch do the same around the Nth CreateItem of several messages into Exchange (EWS).

The idle probe's points (connector/poll/probe.py, test_crash_probe.py): before-idle-record kills before the
probe's Nth batch write of idle polls (``IdlePolls.record``: its transaction not begun), inside-idle-record
inside it (every statement of the batch executed, the commit not made), after-idle-record once it committed
(before the observers hear of its polls); probe-after-uidl at the Nth UIDL reply a probe session gets (read,
not acted on: no QUIT sent), with the probe's other sessions in flight. They serve ``sync`` and ``run`` alike
(test_crash_probe_run.py kills the service after some of its cycles): the marker says how many idle polls of
each account the earlier batch writes committed (``recorded 3:2,4:1``, account id: polls; or ``none``), the
killed batch's not counted.

Each kill first writes one line to stderr, ``crash_driver: killed at POINT`` and what it found there, so
that a test knows the point was reached. The kill is a real SIGKILL of this process: no finally block, no
atexit, no flush runs.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from connector import cli
from connector.destinations import imap
from connector.ledger import idle
from connector.ledger.idle import IdlePoll, IdlePolls
from connector.ledger.lease import Leases
from connector.ledger.prepared import Cursor, driver_transaction
from connector.ledger.recipients import Recipients
from connector.ledger.store import Ledger
from connector.poll import probe
from connector.poll.probe_session import ProbeSession, Step
from connector.pop3 import Pop3Client

TARGETS: dict[str, tuple[Any, str]] = {
    "before-pending": (Ledger, "record_batch_pending"),
    "before-append": (imap.ImapSession, "deliver"),
    "before-delivered-record": (Ledger, "record_delivered"),
    "before-quit": (Pop3Client, "quit"),
    "before-recipient-record": (Recipients, "record_delivered"),
    "before-multiappend": (imap.ImapSession, "deliver_many"),
    "after-multiappend": (imap.ImapSession, "deliver_many"),
    "before-idle-record": (IdlePolls, "record"),
    "after-idle-record": (IdlePolls, "record"),
}
BATCH_POINTS = ("before-multiappend", "after-multiappend")
# Exchange: exchangelib is imported only for these.
EWS_POINTS = ("before-createitem-batch", "after-createitem-batch")
# The idle probe's: meanwhile the full polls of the same process stall mid-delivery (_stall_full_polls).
PROBE_POINTS = ("before-idle-record", "inside-idle-record", "after-idle-record", "probe-after-uidl")
# At the probe's points: set once a full poll has stored a message and stalled (see _stall_full_polls).
FULL_POLL_STALLED = threading.Event()
# At the probe's points: per account id, the idle polls this process committed (see _count_recorded).
RECORDED: collections.Counter[int] = collections.Counter()


def kill(point: str, found: str = "") -> None:
    """SIGKILL this process, after one line on stderr saying where (written at once, unbuffered). At the
    probe's points, not before a full poll is stalled mid-delivery (inside-idle-record waits for it before
    its transaction begins: on SQLite, the full poll's next write waits for that transaction's lock)."""
    if point in PROBE_POINTS and point != "inside-idle-record":
        found += _mid_delivery()
    if point in PROBE_POINTS:
        found += "; recorded " + (",".join(f"{i}:{n}" for i, n in sorted(RECORDED.items())) or "none")
    os.write(2, f"crash_driver: killed at {point}: pid {os.getpid()}{found}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def _mid_delivery() -> str:
    """Wait (20 s at most) for a full poll to stall mid-delivery; what the marker says about it."""
    return "; a full poll mid-delivery" if FULL_POLL_STALLED.wait(20) else "; no full poll mid-delivery"


def _stall_full_polls() -> None:
    """At the probe's points, every full poll stops for good after its first APPEND (the message stored,
    its ``delivered`` record not written, the account's lease held), so that the kill in the probe's
    thread finds the full polls mid-delivery however quick they are."""

    def stalling(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            FULL_POLL_STALLED.set()
            threading.Event().wait()  # until the kill
            return result

        return wrapper

    imap.ImapSession.deliver = stalling(imap.ImapSession.deliver)  # type: ignore[method-assign]
    imap.ImapSession.deliver_many = stalling(imap.ImapSession.deliver_many)  # type: ignore[method-assign]


def _count_recorded() -> None:
    """At the probe's points, ``IdlePolls.record`` counts the polls it committed (not ``busy``) in
    ``RECORDED``: a kill in `run` then tells how many of its cycles went before."""
    record = IdlePolls.record

    @functools.wraps(record)
    def counting(self: IdlePolls, polls: Any, now: Any) -> set[int]:
        busy = record(self, polls, now)
        RECORDED.update(poll.account_id for poll in polls if poll.account_id not in busy)
        return busy

    IdlePolls.record = counting  # type: ignore[method-assign]


def _killing(
    original: Callable[..., Any],
    nth: int,
    *,
    after: bool = False,
    point: str = "",
    found: Callable[[tuple[Any, ...], Any], str] | None = None,
) -> Callable[..., Any]:
    """``original``, killing the process at its Nth call (before it, or ``after`` it returned); ``found``:
    what the marker line says, from the call's arguments (and its result, after it)."""
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth and not after:
            kill(point or original.__qualname__, found(args, None) if found else "")
        result = original(*args, **kwargs)
        if calls == nth:
            kill(point or original.__qualname__, found(args, result) if found else "")
        return result

    return wrapper


def _batch(args: tuple[Any, ...], busy: set[int] | None) -> str:
    """What a kill around ``IdlePolls.record(polls, now)`` found: its accounts' ids (and the busy ones)."""
    polls: list[IdlePoll] = list(args[1])
    text = "; accounts " + ",".join(str(poll.account_id) for poll in polls)
    return text if busy is None else text + "; busy " + ",".join(str(i) for i in sorted(busy))


def _kill_before_commit(nth: int) -> None:
    """inside-idle-record: the Nth batch write's transaction gets all its statements, then the kill comes
    where its commit would. The lease rows that the batch's compare-and-sets took (and released) are read
    back in that transaction, so the marker says what the commit would have written (and each lease's
    generation there: ``generations 3:7``, one more than the ledger keeps if the batch is not committed)."""
    passed: list[int] = []
    pass_through = Leases.pass_through

    def counting(self: Leases, cursor: Cursor, account_id: int, seen: Any) -> bool:
        done = pass_through(self, cursor, account_id, seen)
        if done:
            passed.append(account_id)
        return done

    Leases.pass_through = counting  # type: ignore[method-assign]
    calls = 0

    @contextlib.contextmanager
    def killing(*args: Any, **kwargs: Any) -> Iterator[Cursor]:
        nonlocal calls
        if not kwargs.get("write"):  # the probe's read (the module's other transaction): not a batch write
            with driver_transaction(*args, **kwargs) as cursor:
                yield cursor
            return
        calls += 1
        waited = _mid_delivery() if calls == nth else ""
        with driver_transaction(*args, **kwargs) as cursor:
            yield cursor
            if calls == nth:
                ids = ",".join(str(account_id) for account_id in passed) or "0"
                cursor.execute(
                    f"SELECT count(*) FROM leases WHERE pid = {os.getpid()} AND account_id IN ({ids})"
                )
                (taken,) = cursor.fetchone()
                cursor.execute(f"SELECT account_id, generation FROM leases WHERE account_id IN ({ids})")
                generations = ",".join(f"{i}:{g}" for i, g in sorted(cursor.fetchall()))
                kill(
                    "inside-idle-record",
                    f"; accounts {ids}; {taken} lease rows taken, not committed; generations {generations}"
                    + waited,
                )
            passed.clear()

    idle.driver_transaction = killing  # type: ignore[attr-defined]  # the name read() and record() look up


def _kill_at_uidl(nth: int) -> None:
    """probe-after-uidl: the Nth UIDL reply that a probe session gets, before the session acts on it."""
    streams: list[Any] = []
    start = probe._Stream.run
    advance = ProbeSession._advance
    replies = 0

    def run(self: Any) -> None:
        streams.append(self)
        start(self)

    def advancing(self: ProbeSession, status: bytes, body: bytes | None) -> None:
        nonlocal replies
        if self.step is Step.UIDL:
            replies += 1
            if replies == nth:
                flight = sum(len(stream._running) for stream in streams)
                kill("probe-after-uidl", f"; account {self.account.name}; {flight} probe sessions in flight")
        advance(self, status, body)

    probe._Stream.run = run  # type: ignore[method-assign]
    ProbeSession._advance = advancing  # type: ignore[method-assign]


def _first_call_waits(original: Callable[..., Any]) -> Callable[..., Any]:
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.3)
        return original(*args, **kwargs)

    return wrapper


def main() -> int:
    point, nth, separator, *cli_args = sys.argv[1:]
    assert separator == "--", __doc__
    if point in EWS_POINTS:
        from connector.destinations import ews

        deliver_many = _killing(ews.EwsSession.deliver_many, int(nth), after=point.startswith("after-"))
        ews.EwsSession.deliver_many = deliver_many  # type: ignore[method-assign]
        ews.EwsSession.max_batch = _first_call_waits(ews.EwsSession.max_batch)  # type: ignore[method-assign]
        return cli.main(cli_args)
    if point == "inside-idle-record":
        _kill_before_commit(int(nth))
    elif point == "probe-after-uidl":
        _kill_at_uidl(int(nth))
    else:
        owner, name = TARGETS[point]
        after = point.startswith("after-")
        found = _batch if owner is IdlePolls else None
        killing = _killing(getattr(owner, name), int(nth), after=after, point=point, found=found)
        setattr(owner, name, killing)
    if point in PROBE_POINTS:
        _count_recorded()  # around the kill's wrapper: the killed batch is not counted, even after its commit
        _stall_full_polls()
        return cli.main(cli_args)
    if point == "before-quit":
        # A session that sent no DELE (retention "keep") ends with the QUIT it does not wait for.
        Pop3Client.quit_unawaited = _killing(Pop3Client.quit_unawaited, int(nth))  # type: ignore[method-assign]
    if point in BATCH_POINTS:
        imap.ImapSession.max_batch = _first_call_waits(imap.ImapSession.max_batch)  # type: ignore[method-assign]
    else:
        imap.ImapSession.max_batch = lambda self: 1  # type: ignore[method-assign]
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
