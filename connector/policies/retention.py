"""Retention: whether a delivered message may now be deleted from the POP3 server. Pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from connector.config import RetentionPolicy

# Later than any delivery time: with retention = "delete", every recorded delivery allows deleting.
_END_OF_TIME = datetime.max.replace(tzinfo=UTC)


def should_delete(policy: RetentionPolicy, delivered_at: datetime | None, now: datetime) -> bool:
    """Only ever true for a message whose delivery is recorded (``delivered_at`` set)."""
    if delivered_at is None:
        return False
    if policy.mode == "delete":
        return True
    if policy.mode == "keep":
        return False
    assert policy.days is not None  # guaranteed by RetentionPolicy's validator
    return now - delivered_at >= timedelta(days=policy.days)


def deletable_until(policy: RetentionPolicy, now: datetime) -> datetime | None:
    """The latest delivery time that ``should_delete`` allows deleting at ``now``; None when it allows
    none ("keep"). Everything delivered later is kept: the ledger need not hand those rows to the planner
    one by one, nor read their delivery times."""
    if policy.mode == "keep":
        return None
    if policy.mode == "delete":
        return _END_OF_TIME
    assert policy.days is not None  # guaranteed by RetentionPolicy's validator
    return now - timedelta(days=policy.days)
