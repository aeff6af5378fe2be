"""What one poll will do, decided from the server's listing and the ledger alone. A pure function.

Kept apart from the engine so that ``sync --dry-run`` shows exactly the plan a real poll would follow, and
so that the rules (what is new, what is retried, what is deleted, what is forgotten) are unit-testable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from connector.config import RetentionPolicy
from connector.ledger.models import MessageState
from connector.ledger.store import KnownMessage
from connector.policies.retention import should_delete
from connector.pop3 import MessageInfo


@dataclass(frozen=True)
class Delivery:
    """A message to fetch and deliver. ``recover`` means a previous try may have reached the destination:
    look for it there before delivering again."""

    info: MessageInfo
    recover: bool
    attempts: int


@dataclass(frozen=True)
class PollPlan:
    deliver: list[Delivery] = field(default_factory=list)
    delete: list[MessageInfo] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    quarantined: int = 0

    @property
    def new_count(self) -> int:
        return sum(1 for d in self.deliver if not d.recover)


def plan_poll(
    listing: Sequence[MessageInfo],
    known: Mapping[str, KnownMessage],
    retention: RetentionPolicy,
    now: datetime,
) -> PollPlan:
    """``listing`` is in server order (oldest first); the plan keeps that order."""
    counts = Counter(info.uidl for info in listing)
    duplicates = sorted(uidl for uidl, count in counts.items() if count > 1)
    deliver: list[Delivery] = []
    delete: list[MessageInfo] = []
    quarantined = 0
    for info in listing:
        if counts[info.uidl] > 1:
            continue  # cannot tell these apart by UIDL; delivering one could deliver the wrong one twice
        row = known.get(info.uidl)
        if row is None:
            deliver.append(Delivery(info, recover=False, attempts=0))
        elif row.state is MessageState.PENDING:
            deliver.append(Delivery(info, recover=True, attempts=row.attempts))
        elif row.state is MessageState.FAILED:
            quarantined += 1
        elif should_delete(retention, row.delivered_at, now):
            # DELIVERED, or DELETED whose deletion the server did not carry out: either way it is safe.
            delete.append(info)
    on_server = set(counts)
    gone = [uidl for uidl in known if uidl not in on_server]
    return PollPlan(deliver=deliver, delete=delete, gone=gone, duplicates=duplicates, quarantined=quarantined)
