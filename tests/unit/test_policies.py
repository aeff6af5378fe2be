"""Retention and retry policies are pure functions of their inputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.config import RetentionPolicy, RetryPolicy
from connector.policies.failures import Backoff
from connector.policies.retention import deletable_until, should_delete
from connector.policies.retry import (
    account_backoff,
    failure_delay,
    jittered_interval,
    should_suspend,
    success_delay,
)
from connector.policies.server_limits import deletes_retrieved, login_delay, retention_conflict
from connector.pop3 import Capabilities, parse_capabilities

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


_POLICIES = [
    RetentionPolicy(mode="delete"),
    RetentionPolicy(mode="keep"),
    RetentionPolicy(mode="days", days=14),
]


@pytest.mark.parametrize("policy", _POLICIES, ids=lambda policy: policy.mode)
@given(age=st.timedeltas(min_value=timedelta(days=-30), max_value=timedelta(days=3000)))
def test_deletable_until_agrees_with_should_delete(policy: RetentionPolicy, age: timedelta) -> None:
    # The ledger splits rows on this bound; the planner decides with should_delete: they must agree.
    bound = deletable_until(policy, NOW)
    delivered_at = NOW - age
    assert should_delete(policy, delivered_at, NOW) is (bound is not None and delivered_at <= bound)


def test_deletable_until_by_mode() -> None:
    assert deletable_until(RetentionPolicy(mode="keep"), NOW) is None
    assert deletable_until(RetentionPolicy(mode="days", days=14), NOW) == NOW - timedelta(days=14)
    assert deletable_until(RetentionPolicy(mode="delete"), NOW) == datetime.max.replace(tzinfo=UTC)


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


# --- account failures, LOGIN-DELAY, suspension (issue 4) ------------------------------------------------

MIDDLE = lambda: 0.5  # noqa: E731 - no jitter at the midpoint


def test_auth_failure_waits_auth_failure_backoff_flat() -> None:
    policy = RetryPolicy(auth_failure_backoff=timedelta(hours=1), max_backoff=timedelta(minutes=10))
    assert failure_delay(policy, 1, backoff=Backoff.PERSON, rand=MIDDLE) == timedelta(hours=1)
    assert failure_delay(policy, 9, backoff=Backoff.PERSON, rand=MIDDLE) == timedelta(hours=1)
    assert failure_delay(policy, 1, backoff=Backoff.RETRY, rand=MIDDLE) == timedelta(minutes=1)


def test_failure_never_retries_before_login_delay() -> None:
    policy = RetryPolicy()
    delay = failure_delay(policy, 1, backoff=Backoff.RETRY, server_delay=timedelta(minutes=15), rand=MIDDLE)
    assert delay == timedelta(minutes=15)
    assert failure_delay(
        policy, 7, backoff=Backoff.RETRY, server_delay=timedelta(seconds=5), rand=MIDDLE
    ) == (timedelta(minutes=60))


def test_success_waits_at_least_login_delay() -> None:
    assert success_delay(timedelta(minutes=5), 0.0, server_delay=timedelta(minutes=15)) == timedelta(
        minutes=15
    )
    assert success_delay(timedelta(minutes=5), 0.0, server_delay=None) == timedelta(minutes=5)
    assert success_delay(timedelta(minutes=5), 0.0, server_delay=timedelta(seconds=1)) == timedelta(minutes=5)


@pytest.mark.parametrize(
    ("limit", "failures", "expected"), [(3, 2, False), (3, 3, True), (3, 9, True), (0, 99, False)]
)
def test_should_suspend(limit: int, failures: int, expected: bool) -> None:
    assert should_suspend(RetryPolicy(max_consecutive_failures=limit), failures) is expected


def _capabilities(*lines: str) -> Capabilities:
    return parse_capabilities([line.encode() for line in lines])


def test_server_limits_from_capa() -> None:
    assert login_delay(_capabilities("LOGIN-DELAY 900")) == timedelta(seconds=900)
    assert login_delay(_capabilities("LOGIN-DELAY 0")) is None
    assert login_delay(_capabilities("TOP")) is None
    assert deletes_retrieved(_capabilities("EXPIRE 0"))
    assert not deletes_retrieved(_capabilities("EXPIRE NEVER"))
    assert not deletes_retrieved(_capabilities("EXPIRE 30"))


def test_retention_conflict_with_expire() -> None:
    expire_30 = _capabilities("EXPIRE 30")
    assert retention_conflict(expire_30, RetentionPolicy(mode="delete")) is None
    assert retention_conflict(expire_30, RetentionPolicy(mode="days", days=14)) is None
    assert "30 days" in (retention_conflict(expire_30, RetentionPolicy(mode="keep")) or "")
    assert retention_conflict(expire_30, RetentionPolicy(mode="days", days=60)) is not None
    assert retention_conflict(_capabilities("EXPIRE NEVER"), RetentionPolicy(mode="keep")) is None
