"""``poll_round`` (connector/poll/rounds.py): every account once, in order, and a hand-over polled in full
while the probe is still at work on the others (new mail need not wait for the whole sweep)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from connector.config import Account
from connector.poll.probe import Done, IdleProbe, Take
from connector.poll.result import PollResult
from connector.poll.rounds import poll_round


class _Account:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_hand_over_is_polled_in_full_while_the_probe_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accounts: list[Any] = [_Account(f"a{n}") for n in range(4)]
    first_full_poll_started = threading.Event()

    def serve(self: IdleProbe, take: Take, done: Done, stop: object = None) -> None:
        # The first two: one idle, one handed over. The next ones are probed only once that hand-over is
        # being polled in full (else it never is: the test fails instead of hanging).
        first = take(2, 0.0)
        assert first is not None
        done(first[0], PollResult(account=first[0].name), 0.0)
        done(first[1], None, 0.0)
        assert first_full_poll_started.wait(10), "the hand-over waited for the whole sweep"
        for account in first[2:]:
            done(account, PollResult(account=account.name) if account.name == "a2" else None, 0.0)
        rest = take(2, 0.0)
        for account in rest or ():
            done(account, PollResult(account=account.name) if account.name == "a2" else None, 0.0)

    monkeypatch.setattr(IdleProbe, "serve", serve)
    monkeypatch.setattr(IdleProbe, "refusal", lambda self, account: None)
    full: list[str] = []

    def full_poll(account: Account) -> PollResult:
        full.append(account.name)
        first_full_poll_started.set()
        return PollResult(account=account.name, delivered=1)

    results = poll_round(object(), accounts, workers=2, full_poll=full_poll)  # type: ignore[arg-type]
    assert [r.account for r in results] == ["a0", "a1", "a2", "a3"]  # in the order given
    assert sorted(full) == ["a1", "a3"]
    assert [r.delivered for r in results] == [0, 1, 0, 1]
