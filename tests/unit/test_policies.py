"""Retention and retry policies are pure functions of their inputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from connector.config import RetentionPolicy, RetryPolicy
from connector.policies.retention import should_delete
from connector.policies.retry import account_backoff, jittered_interval

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_delete_mode_deletes_only_delivered() -> None:
    policy = RetentionPolicy(mode="delete")
    assert should_delete(policy, NOW, NOW)
    assert not should_delete(policy, None, NOW)


def test_keep_never_deletes() -> None:
    assert not should_delete(RetentionPolicy(mode="keep"), NOW - timedelta(days=9999), NOW)


@pytest.mark.parametrize(("age_days", "expected"), [(0, False), (13.9, False), (14, True), (30, True)])
def test_days_mode(age_days: float, expected: bool) -> None:
    policy = RetentionPolicy(mode="days", days=14)
    assert should_delete(policy, NOW - timedelta(days=age_days), NOW) is expected


def test_backoff_doubles_and_caps() -> None:
    policy = RetryPolicy(initial_backoff=timedelta(minutes=1), max_backoff=timedelta(minutes=10))
    middle = lambda: 0.5  # noqa: E731 - no jitter at the midpoint
    assert account_backoff(policy, 0, rand=middle) == timedelta(0)
    assert account_backoff(policy, 1, rand=middle) == timedelta(minutes=1)
    assert account_backoff(policy, 2, rand=middle) == timedelta(minutes=2)
    assert account_backoff(policy, 4, rand=middle) == timedelta(minutes=8)
    assert account_backoff(policy, 5, rand=middle) == timedelta(minutes=10)
    assert account_backoff(policy, 500, rand=middle) == timedelta(minutes=10)


def test_backoff_jitter_stays_within_twenty_percent_and_cap() -> None:
    policy = RetryPolicy(initial_backoff=timedelta(minutes=1), max_backoff=timedelta(hours=1))
    assert account_backoff(policy, 1, rand=lambda: 0.0) == timedelta(seconds=48)
    assert account_backoff(policy, 1, rand=lambda: 1.0) == timedelta(seconds=72)
    assert account_backoff(policy, 30, rand=lambda: 1.0) == timedelta(hours=1)


def test_jittered_interval() -> None:
    assert jittered_interval(timedelta(minutes=10), 0.1, rand=lambda: 0.0) == timedelta(minutes=9)
    assert jittered_interval(timedelta(minutes=10), 0.1, rand=lambda: 1.0) == timedelta(minutes=11)
    assert jittered_interval(timedelta(minutes=10), 0.0) == timedelta(minutes=10)
