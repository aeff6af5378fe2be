"""The idle probe's thread and the polls handed to it (connector/poll/feeder.py): every poll handed in gets
exactly one verdict, whatever becomes of the thread. The probe here is scripted; the real one against real
servers is in tests/integration/test_idle_probe_service.py and test_distributed_probe.py."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from connector.config import Account
from connector.poll.feeder import FULL, ProbeFeeder, Verdict
from connector.poll.probe import Done, IdleProbe, Take
from connector.poll.result import PollResult

# A verdict that has not come after this long is never coming (it never bounds a duration).
STALL_SECONDS = 30.0

Script = Callable[[Take, Done, threading.Event], None]


class _Scripted(IdleProbe):
    """A probe whose ``serve`` is ``script``; it may try every account."""

    def __init__(self, script: Script) -> None:
        self._script = script

    def refusal(self, account: Account) -> str | None:
        return None

    def serve(self, take: Take, done: Done, stop: threading.Event | None = None) -> None:
        assert stop is not None
        self._script(take, done, stop)


def _account(name: str) -> Account:
    return Account.model_validate(
        {"name": name, "host": "pop.example", "username": name, "password": "pw", "destination": "d"}
    )


def _taking(count: int, then: Callable[[list[Account], Done], None]) -> Script:
    """Takes ``count`` accounts, then ``then(taken, done)``."""

    def script(take: Take, done: Done, stop: threading.Event) -> None:
        taken: list[Account] = []
        while len(taken) < count:
            taken += take(count - len(taken), 0.1) or []
        then(taken, done)

    return script


def test_each_poll_gets_its_own_verdict() -> None:
    idle = PollResult(account="a")

    def verdicts(taken: list[Account], done: Done) -> None:
        for account in taken:
            done(account, idle if account.name == "a" else None, 2.0 if account.name == "b" else 0.0)

    stop = threading.Event()
    feeder = ProbeFeeder(_Scripted(_taking(2, verdicts)), stop)
    feeder.start()
    told = {name: feeder.hand_in(_account(name)) for name in "ab"}
    assert told["a"].result(STALL_SECONDS) == Verdict(idle)
    assert told["b"].result(STALL_SECONDS) == Verdict(None, 2.0)
    stop.set()
    feeder.join()


def test_a_probe_that_fails_leaves_no_poll_without_a_verdict_and_takes_no_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One account told, one taken and not told, one still queued: the last two are polled in full, each
    verdict once; a later poll goes to the full poll at once."""
    idle = PollResult(account="a")
    release = threading.Event()

    def fail(taken: list[Account], done: Done) -> None:
        done(taken[0], idle, 0.0)
        release.wait(STALL_SECONDS)
        raise RuntimeError("a bug in the probe")

    feeder = ProbeFeeder(_Scripted(_taking(2, fail)), threading.Event())
    feeder.start()
    told = {name: feeder.hand_in(_account(name)) for name in "abc"}
    assert told["a"].result(STALL_SECONDS) == Verdict(idle)
    release.set()
    assert told["b"].result(STALL_SECONDS) == FULL
    assert told["c"].result(STALL_SECONDS) == FULL
    feeder.join()
    assert feeder.failed and caplog.text.count("idle probe failed") == 1
    assert not feeder.takes(_account("d"))
    assert feeder.hand_in(_account("d")).result(0) == FULL


def test_after_a_stop_or_a_close_nothing_is_taken_and_every_poll_is_told() -> None:
    stop = threading.Event()
    taken: list[Account] = []

    def never_tell(take: Take, done: Done, stop: threading.Event) -> None:
        while not stop.is_set():
            taken.extend(take(10, 0.1) or [])

    feeder = ProbeFeeder(_Scripted(never_tell), stop)
    feeder.start()
    waiting = feeder.hand_in(_account("a"))
    stop.set()
    assert waiting.result(STALL_SECONDS) == FULL  # taken or not, told once the thread is over
    feeder.join()
    assert feeder.hand_in(_account("b")).result(0) == FULL
    assert not feeder.failed

    closed = ProbeFeeder(_Scripted(_taking(1, lambda taken, done: done(taken[0], None, 0.0))), stop)
    closed.close()
    assert not closed.takes(_account("c"))
    assert closed.hand_in(_account("c")).result(0) == FULL


def test_a_closed_probe_ends_once_the_polls_handed_in_are_told() -> None:
    """``take`` gives what was handed in before the close, then None: the probe's loop ends."""
    told_all = threading.Event()
    takes: list[list[Account] | None] = []

    def serve_until_none(take: Take, done: Done, stop: threading.Event) -> None:
        while (accounts := take(10, 0.1)) is not None:
            takes.append(list(accounts))
            for account in accounts:
                done(account, None, 0.0)
        told_all.set()

    feeder = ProbeFeeder(_Scripted(serve_until_none), threading.Event())
    first = feeder.hand_in(_account("a"))
    feeder.close()
    feeder.start()
    assert first.result(STALL_SECONDS) == FULL
    assert told_all.wait(STALL_SECONDS)
    feeder.join()
    assert [account.name for batch in takes for account in batch] == ["a"]
