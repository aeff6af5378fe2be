"""When the service first polls each account (policies/schedule.py): pure, no clock, no scheduler."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from connector.policies.schedule import FirstPoll, Waiting, Why, first_polls, polls_per_second, spread

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HALF_MINUTE = timedelta(seconds=30)


def never_polled(count: int, interval: timedelta = HALF_MINUTE) -> list[Waiting]:
    return [Waiting(f"a{i}", interval) for i in range(count)]


def most_in_one_second(plan: dict[str, FirstPoll]) -> int:
    offsets = sorted((first.when - NOW).total_seconds() for first in plan.values())
    return max(sum(1 for other in offsets if start <= other < start + 1) for start in offsets)


def test_a_first_start_of_many_accounts_is_spread_over_one_interval() -> None:
    plan = first_polls(never_polled(1000), NOW, at_once=8)
    times = sorted(first.when for first in plan.values())
    assert len(plan) == 1000
    assert times.count(NOW) == 8  # the free workers start at once
    assert max(times) < NOW + HALF_MINUTE
    # Evenly: the rest one every interval / accounts (30 ms), never a burst above the steady rate.
    gaps = {round((later - earlier).total_seconds(), 6) for earlier, later in itertools.pairwise(times[7:])}
    assert gaps == {0.03}
    assert most_in_one_second(plan) <= 8 + 34
    assert {first.why for first in plan.values()} == {Why.NEVER_POLLED}


def test_a_single_account_or_as_many_as_the_workers_are_polled_now() -> None:
    assert first_polls(never_polled(1), NOW, at_once=1) == {"a0": FirstPoll(NOW, Why.NEVER_POLLED)}
    plan = first_polls(never_polled(8), NOW, at_once=8)
    assert {first.when for first in plan.values()} == {NOW}
    assert all(first.spread_over is None for first in plan.values())


def test_run_now_polls_every_account_at_once() -> None:
    accounts = [*never_polled(999), Waiting("later", HALF_MINUTE, NOW + timedelta(hours=1))]
    plan = first_polls(accounts, NOW, at_once=8, poll_now=True)
    assert {first.when for first in plan.values()} == {NOW}
    assert {first.why for first in plan.values()} == {Why.ASKED}


def test_a_stored_next_poll_time_is_kept() -> None:
    later = NOW + timedelta(minutes=3)
    accounts = [*never_polled(100), Waiting("kept", HALF_MINUTE, later)]
    assert first_polls(accounts, NOW, at_once=8)["kept"] == FirstPoll(later, Why.STORED)


def test_a_restart_spreads_only_the_due_accounts_at_the_steady_rate() -> None:
    # 300 of 900 accounts came due while the service was down: they take a third of the interval, at the
    # 30 polls/s the 900 need, instead of a whole interval on top of the others.
    accounts = [
        Waiting(f"a{i}", HALF_MINUTE, NOW - timedelta(seconds=1 if i < 300 else -(i % 29 + 1)))
        for i in range(900)
    ]
    plan = first_polls(accounts, NOW, at_once=8)
    due = [first for name, first in plan.items() if int(name[1:]) < 300]
    assert {first.why for first in due} == {Why.DUE}
    last = max(first.when for first in due)
    assert (last - NOW).total_seconds() == pytest.approx(292 / 30)
    (over,) = {first.spread_over for first in due if first.spread_over}
    assert over.total_seconds() == pytest.approx(292 / 30)


def test_never_polled_then_the_longest_overdue_go_first() -> None:
    accounts = [
        *(Waiting(f"late{i}", HALF_MINUTE, NOW - timedelta(minutes=i)) for i in range(1, 20)),
        Waiting("new", HALF_MINUTE),
    ]
    plan = first_polls(accounts, NOW, at_once=2)
    order = sorted(plan, key=lambda name: plan[name].when)
    assert order[0] == "new"
    assert order[1:] == [f"late{i}" for i in range(19, 0, -1)]
    assert plan["new"].why is Why.NEVER_POLLED and plan["late1"].why is Why.DUE


def test_the_order_is_the_same_whatever_order_the_configuration_lists_them() -> None:
    accounts = never_polled(200)
    shuffled = accounts[:]
    random.Random(7).shuffle(shuffled)
    assert first_polls(accounts, NOW, at_once=8) == first_polls(shuffled, NOW, at_once=8)
    # Not simply by name: accounts named alike (one server's) are interleaved with the others.
    order = sorted(first_polls(accounts, NOW, at_once=0).items(), key=lambda item: item[1].when)
    assert [name for name, _ in order] != sorted(name for name, _ in order)


def test_no_account_is_placed_beyond_its_own_interval() -> None:
    # 100 accounts every 10 minutes and 10 every 10 seconds: the steady rate is 1.17 polls/s, so the 110
    # due ones take about 94 s; the short-interval ones are placed within their own 10 s.
    short = [Waiting(f"s{i}", timedelta(seconds=10)) for i in range(10)]
    accounts = [*never_polled(100, timedelta(minutes=10)), *short]
    plan = first_polls(accounts, NOW, at_once=0)
    assert all(plan[account.name].when < NOW + account.interval for account in accounts)
    assert max(first.when for first in plan.values()) > NOW + timedelta(seconds=60)


def test_accounts_a_reload_adds_are_spread_only_when_many() -> None:
    rate = polls_per_second([HALF_MINUTE] * 1000)
    assert rate == pytest.approx(1000 / 30)
    few = spread(never_polled(5), NOW, rate=rate, at_once=8)
    assert {first.when for first in few.values()} == {NOW}
    many = spread(never_polled(108), NOW, rate=rate, at_once=8)
    last = max(first.when for first in many.values())
    assert (last - NOW).total_seconds() == pytest.approx(100 * 0.03)
