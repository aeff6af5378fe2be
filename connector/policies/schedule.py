"""When the service first polls each account: at start, and for accounts a reload adds. Pure functions.

The rule (docs/operations.md tells it to the admin, under "With systemd"):

- An account whose last poll chose a later time (a ``sync`` too) keeps that time: a restart does not move
  accounts that were already spread out.
- Accounts that are due (that time has passed, or they were never polled): as many as the service polls
  at once (``max_workers``) are polled now, since the workers are free at start: a few accounts, or a
  single one, are all polled at once.
- The others follow one after the other at the rate the whole configuration needs in the steady state
  (the sum of 1 ÷ poll interval over its accounts): due accounts never add a burst above that rate. When
  every account is due (a first start, or after an outage longer than the interval) that spreads them
  over one interval, so the polls are spread from the first cycle instead of all starting at once and
  coming back together every interval; when a third of them is due they take a third of the interval.
  No account is placed more than its own interval ahead (an account with a short interval among long
  ones is placed at its share of its own interval).
- The order: never polled accounts first, then the longest overdue, so the accounts that waited most go
  first, and accounts that were spread before an outage keep their order after it; ties (a first start)
  in an order fixed by a hash of the name, so that one server's accounts, often named alike, are not
  polled back to back, and a restart gives the same order.
- ``run --now`` polls every account at once: asked for by a person.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum


class Why(Enum):
    """Why an account is first polled when it is (the log says it)."""

    ASKED = "run --now"
    NEVER_POLLED = "never polled"
    DUE = "due"
    STORED = "the next poll time its last poll chose"


@dataclass(frozen=True)
class Waiting:
    """An account to place: its name, its poll interval, and the next poll time its last poll stored
    (``None``: never polled)."""

    name: str
    interval: timedelta
    stored: datetime | None = None


@dataclass(frozen=True)
class FirstPoll:
    when: datetime
    why: Why
    # Set when the account was spread: how many due accounts were spread, and over how long.
    spread_over: timedelta | None = None
    spread_among: int = 0


def polls_per_second(intervals: Iterable[timedelta]) -> float:
    """The rate at which accounts with these poll intervals are polled in the steady state."""
    return sum(1 / interval.total_seconds() for interval in intervals)


def first_polls(
    accounts: Sequence[Waiting], now: datetime, *, at_once: int, poll_now: bool = False
) -> dict[str, FirstPoll]:
    """When a service starting at ``now`` first polls each of ``accounts`` (all that it polls), and why.
    ``at_once`` is how many polls it runs at a time (``max_workers``)."""
    if poll_now:
        return {account.name: FirstPoll(now, Why.ASKED) for account in accounts}
    later = {
        account.name: FirstPoll(account.stored, Why.STORED)
        for account in accounts
        if account.stored is not None and account.stored > now
    }
    due = [account for account in accounts if account.name not in later]
    rate = polls_per_second(account.interval for account in accounts)
    return {**spread(due, now, rate=rate, at_once=at_once), **later}


def spread(due: Sequence[Waiting], now: datetime, *, rate: float, at_once: int) -> dict[str, FirstPoll]:
    """First polls for ``due`` accounts, never polled and longest overdue first: the first ``at_once`` now
    (the workers are free), then one every ``1 / rate`` seconds (``rate``: the polls per second of every
    account the service has, ``polls_per_second``), none more than its own interval ahead."""

    def why(account: Waiting) -> Why:
        return Why.NEVER_POLLED if account.stored is None else Why.DUE

    ordered = sorted(due, key=_order)
    later = len(ordered) - at_once
    if later <= 0 or rate <= 0:
        return {account.name: FirstPoll(now, why(account)) for account in ordered}
    whole = max(min(timedelta(seconds=later / rate), account.interval) for account in ordered)
    first = {account.name: FirstPoll(now, why(account)) for account in ordered[:at_once]}
    for place, account in enumerate(ordered[at_once:], start=1):
        # A short-interval account among long ones is placed within its own interval, at its share.
        offset = min(timedelta(seconds=place / rate), account.interval * place / later)
        first[account.name] = FirstPoll(now + offset, why(account), spread_over=whole, spread_among=later)
    return first


def _order(account: Waiting) -> tuple[bool, datetime, bytes]:
    never = account.stored is None
    return (not never, account.stored or datetime.min, hashlib.sha256(account.name.encode()).digest())
