"""Retry: how long an account waits after failed polls. Pure functions; randomness is passed in."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta

from connector.config import RetryPolicy

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
