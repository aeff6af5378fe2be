"""Retention: whether a delivered message may now be deleted from the POP3 server. Pure functions."""

from __future__ import annotations

from datetime import datetime, timedelta

from connector.config import RetentionPolicy


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
