"""Retry: how long an account waits after failed polls. Pure functions; randomness is passed in."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta

from connector.config import RetryPolicy
from connector.policies.failures import Backoff

# Spread out accounts that failed together (a shared server went down) so they do not return together.
JITTER_FRACTION = 0.2


def account_backoff(
    policy: RetryPolicy, consecutive_failures: int, *, rand: Callable[[], float] = random.random
) -> timedelta:
    """Exponential back-off from ``initial_backoff``, doubling per failure, capped at ``max_backoff``,
    with up to ±20% jitter (never above the cap)."""
    if consecutive_failures <= 0:
        return timedelta(0)
    exponent = min(consecutive_failures - 1, 32)
    base = min(policy.initial_backoff * (2**exponent), policy.max_backoff)
    factor = 1 + JITTER_FRACTION * (2 * rand() - 1)
    jittered: timedelta = base * factor
    return min(jittered, policy.max_backoff)


def jittered_interval(
    interval: timedelta, jitter: float, *, rand: Callable[[], float] = random.random
) -> timedelta:
    """The next regular poll: ``interval`` ± ``jitter`` * interval, so accounts drift apart."""
    return interval * (1 + jitter * (2 * rand() - 1))


def failure_delay(
    policy: RetryPolicy,
    consecutive_failures: int,
    *,
    backoff: Backoff,
    server_delay: timedelta | None = None,
    rand: Callable[[], float] = random.random,
) -> timedelta:
    """The wait after a failed poll (``consecutive_failures`` counts this one).

    A failure only a person can fix (``Backoff.PERSON``: a refused login, a certificate that does not
    verify, a permanent refusal; see policies/failures.py) waits ``auth_failure_backoff`` flat: retrying at
    the normal rate could make the provider lock the mailbox, and a password is not fixed by waiting longer
    and longer. A temporary failure backs off exponentially. Neither is ever shorter than what the server
    asked for (LOGIN-DELAY).
    """
    if backoff is Backoff.PERSON:
        delay = max(policy.auth_failure_backoff, account_backoff(policy, consecutive_failures, rand=rand))
    else:
        delay = account_backoff(policy, consecutive_failures, rand=rand)
    return max(delay, server_delay or timedelta(0))


def success_delay(
    interval: timedelta,
    jitter: float,
    *,
    server_delay: timedelta | None = None,
    rand: Callable[[], float] = random.random,
) -> timedelta:
    """The wait after a successful poll: the jittered interval, but never less than LOGIN-DELAY, since a
    login sooner than that is refused anyway."""
    return max(jittered_interval(interval, jitter, rand=rand), server_delay or timedelta(0))


def should_suspend(policy: RetryPolicy, consecutive_failures: int) -> bool:
    """True once an account has failed ``max_consecutive_failures`` polls in a row (0 = never)."""
    limit = policy.max_consecutive_failures
    return limit > 0 and consecutive_failures >= limit
