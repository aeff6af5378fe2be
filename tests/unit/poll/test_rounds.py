"""``poll_round`` (connector/poll/rounds.py): every account once, in order, and a batch's hand-overs
polled in full while the next batch is still being probed (new mail need not wait for the whole sweep)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from connector.config import Account
from connector.poll.probe import IdleProbe, Probed
from connector.poll.result import PollResult
from connector.poll.rounds import poll_round


class _Account:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_batch_s_hand_overs_are_polled_while_the_next_batch_is_probed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accounts: list[Any] = [_Account(f"a{n}") for n in range(4)]
    first_full_poll_started = threading.Event()

    def batches(self: IdleProbe, probed: Sequence[Account], stop: object = None) -> Iterator[Probed]:
        # The first batch: one idle, one handed over. The second is probed only once the first's
        # hand-over is being polled in full (else it never is: the test fails instead of hanging).
        yield Probed(results=[PollResult(account="a0")], full=[probed[1]])
        assert first_full_poll_started.wait(10), "the first batch's hand-over waited for the whole sweep"
        yield Probed(results=[PollResult(account="a2")], full=[probed[3]])

    monkeypatch.setattr(IdleProbe, "batches", batches)
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
