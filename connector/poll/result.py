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
    # Messages the destination took in this poll.
    delivered: int = 0
    # Messages an interrupted earlier attempt had delivered: found in the destination and recorded.
    recovered: int = 0
    # Planned messages this poll finished (delivered or recovered). The same as ``delivered + recovered``
    # but for catch-all accounts, where those two count recipients and a message is finished only when
    # every recipient has it: what the backlog is measured against.
    messages_done: int = 0
    # Messages whose delivery failed with an attempt counted in the ledger (refused for good, a driver
    # error, a dropped connection charged to the message), quarantined ones included: always what the
    # ledger counted.
    failed: int = 0
    # Messages the destination did not take, with no attempt counted (it was down or unreachable, or refused
    # for now): left as they were, delivered by a later poll.
    not_delivered: int = 0
    # Messages quarantined in this poll (out of attempts, too large): left on the server until
    # `quarantine retry`.
    quarantined: int = 0
    # Messages the POP3 server deleted at this poll's QUIT.
    deleted: int = 0
    # Messages the server would not send now (a temporary -ERR to RETR): no attempt, retried next poll.
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
    def idle(self) -> bool:
        """It succeeded and there was nothing to do: nothing delivered, deleted, quarantined, held back or
        wrong. Its log lines are DEBUG: at INFO, 100,000 accounts polled every 5 minutes wrote 660 lines a
        second, twice what journald lets a service log by default (10,000 per 30 s), and it would drop
        the warnings with them. The status page, `status` and the metrics show every poll."""
        return self.status == "ok" and not (
            self.delivered
            or self.recovered
            or self.failed
            or self.not_delivered
            or self.quarantined
            or self.deleted
            or self.skipped
            or self.short_retrs
            or self.unidentified
            or self.problems
        )

    @property
    def poll_failed(self) -> bool:
        """The poll ran and failed; an account skipped because another process polls it is no failure."""
        return not self.ok and self.status != "busy"
