"""The poll lease's pure rules: who may poll an account, and the fencing token each take hands out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.config import parse_config
from connector.errors import ConfigError
from connector.policies.lease import (
    Claimant,
    LeaseHeld,
    LeaseRecord,
    expired,
    holder_name,
    renew_every,
    renewed_until,
    take,
)

NOW = datetime(2026, 12, 6, 10, 2, 17, tzinfo=UTC)
TTL = timedelta(minutes=2)
ALICE_POLL = Claimant(holder_name("mx1", 1234, "aaaa"), "mx1", 1234)
BOB_POLL = Claimant(holder_name("mx2", 99, "bbbb"), "mx2", 99)


def _held(by: Claimant, generation: int, expires_at: datetime) -> LeaseRecord:
    return LeaseRecord(7, generation, by.holder, by.host, by.pid, expires_at - TTL, expires_at)


def test_first_take_is_generation_one_until_the_ttl() -> None:
    lease = take(None, 7, ALICE_POLL, NOW, TTL)
    assert lease == LeaseRecord(7, 1, "mx1:1234:aaaa", "mx1", 1234, NOW, NOW + TTL)


def test_a_live_lease_is_busy_for_everyone_else_and_names_its_holder() -> None:
    current = _held(ALICE_POLL, 4, NOW + timedelta(seconds=1))
    busy = take(current, 7, BOB_POLL, NOW, TTL)
    assert busy == LeaseHeld("mx1:1234:aaaa", "mx1", 1234, current.acquired_at, current.expires_at)
    assert isinstance(busy, LeaseHeld)
    assert busy.describe("alice") == (
        "account alice is being polled by PID 1234 on host mx1 since 2026-12-06 10:00:18 UTC; skipped"
    )


def test_a_live_lease_is_busy_even_for_another_poll_of_the_same_process() -> None:
    current = _held(ALICE_POLL, 4, NOW + TTL)
    again = Claimant(holder_name("mx1", 1234, "cccc"), "mx1", 1234)
    assert isinstance(take(current, 7, again, NOW, TTL), LeaseHeld)


def test_an_expired_lease_is_taken_over_with_the_next_generation() -> None:
    current = _held(ALICE_POLL, 4, NOW)  # expires exactly now: over
    assert expired(current, NOW)
    lease = take(current, 7, BOB_POLL, NOW, TTL)
    assert isinstance(lease, LeaseRecord)
    assert (lease.generation, lease.holder, lease.host, lease.pid) == (5, "mx2:99:bbbb", "mx2", 99)
    assert (lease.acquired_at, lease.expires_at) == (NOW, NOW + TTL)


def test_a_lease_whose_process_is_gone_is_taken_over_before_its_expiry() -> None:
    current = _held(ALICE_POLL, 4, NOW + TTL)
    lease = take(current, 7, BOB_POLL, NOW, TTL, holder_gone=True)
    assert isinstance(lease, LeaseRecord) and lease.generation == 5


@given(
    generations=st.lists(st.booleans(), min_size=1, max_size=50),
    ttl_seconds=st.integers(min_value=1, max_value=3600),
)
def test_generation_increases_at_every_take_and_never_otherwise(
    generations: list[bool], ttl_seconds: int
) -> None:
    """Polls come one after the other, each one either after the last expired (a take) or while it
    still holds (busy): the generation counts the takes exactly."""
    ttl = timedelta(seconds=ttl_seconds)
    current: LeaseRecord | None = None
    now = NOW
    takes = 0
    for index, after_expiry in enumerate(generations):
        claimant = Claimant(holder_name("h", index, "t"), "h", index)
        if current is not None:
            now = current.expires_at if after_expiry else current.expires_at - timedelta(microseconds=1)
        outcome = take(current, 1, claimant, now, ttl)
        if current is None or after_expiry:
            assert isinstance(outcome, LeaseRecord)
            takes += 1
            assert outcome.generation == takes
            current = outcome
        else:
            assert isinstance(outcome, LeaseHeld) and outcome.holder == current.holder


def test_renewal_moves_the_expiry_and_happens_three_times_per_ttl() -> None:
    assert renewed_until(NOW, TTL) == NOW + TTL
    assert renew_every(TTL) == timedelta(seconds=40)


def test_lease_ttl_defaults_to_two_minutes_and_must_be_at_least_a_second() -> None:
    config_file = Path("/etc/pop-connector/config.toml")
    assert parse_config({}, config_file).service.lease_ttl == timedelta(minutes=2)
    assert parse_config({"service": {"lease_ttl": "5s"}}, config_file).service.lease_ttl.total_seconds() == 5
    with pytest.raises(ConfigError) as caught:
        parse_config({"service": {"lease_ttl": "0s"}}, config_file)
    assert "service.lease_ttl:" in str(caught.value) and "at least 1s" in str(caught.value)
