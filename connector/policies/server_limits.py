"""What a POP3 server announces about itself in CAPA (RFC 2449) and what it means for a poll. Pure functions.

``LOGIN-DELAY n``: the server refuses a login sooner than n seconds after the previous one.
``EXPIRE n``: the server deletes retrieved messages after n days whatever the client does; ``EXPIRE 0``
means it deletes every message retrieved in a session when the session ends with QUIT.
"""

from __future__ import annotations

from datetime import timedelta

from connector.config import RetentionPolicy
from connector.pop3 import Capabilities


def login_delay(capabilities: Capabilities) -> timedelta | None:
    seconds = capabilities.login_delay
    return timedelta(seconds=seconds) if seconds else None


def deletes_retrieved(capabilities: Capabilities) -> bool:
    """EXPIRE 0: QUIT would remove every message retrieved in this session, delivered or not."""
    return capabilities.expire == 0


def retention_conflict(capabilities: Capabilities, retention: RetentionPolicy) -> str | None:
    """A warning when the server will delete mail sooner than the retention policy would keep it."""
    days = capabilities.expire
    if days is None or days == 0 or retention.mode == "delete":
        return None
    if retention.mode == "days" and retention.days is not None and retention.days <= days:
        return None
    kept = "forever" if retention.mode == "keep" else f"{retention.days} days"
    return (
        f"the server deletes retrieved messages after {days} days (CAPA EXPIRE); the retention policy "
        f"({kept}) cannot be honoured"
    )
