"""What one poll did: the counts and status that the CLI, the scheduler and the observers read."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from connector.policies.failures import Backoff
from connector.poll.plan import PollPlan


@dataclass
class PollResult:
    account: str
    # ok | error | auth_error | stopped | suspended | busy (another poll holds the account's lease) |
    # lease_lost (another poll took the account over while this one stalled)
    status: str = "ok"
    error: str | None = None
    # How a failed poll waits for the next one (policies/failures.py): only a person fixes PERSON.
    backoff: Backoff = Backoff.RETRY
    delivered: int = 0
    recovered: int = 0
    failed: int = 0
    quarantined: int = 0
    deleted: int = 0
    skipped: int = 0
    # RETR replies far shorter than LIST said (counted in ``failed`` too); see policies/sizes.py.
    short_retrs: int = 0
    # Left on the POP3 server because the poll could not identify them (a malformed listing line, copies
    # nothing tells apart, no UIDL and TOP refused); reported when first seen, then shown by `status`.
    unidentified: int = 0
    # Messages on the server at the poll's listing (None: it did not get that far).
    listed: int | None = None
    next_poll_at: datetime | None = None
    plan: PollPlan | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "stopped")

    @property
    def poll_failed(self) -> bool:
        """The poll ran and failed; an account skipped because another process polls it is no failure."""
        return not self.ok and self.status != "busy"
