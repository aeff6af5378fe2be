"""What one poll will do, decided from the server's listing and the ledger alone. A pure function.

Kept apart from the engine so that ``sync --dry-run`` shows exactly the plan a real poll would follow, and
so that the rules (what is new, what is retried, what is deleted, what is forgotten) are unit-testable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from connector.config import RetentionPolicy
from connector.ledger.models import MessageState
from connector.ledger.store import KnownMessage, KnownMessages
from connector.policies.limits import Limits
from connector.policies.retention import should_delete
from connector.policies.sizes import over_ceiling
from connector.policies.uidl import duplicated_uidls
from connector.pop3 import MessageInfo


@dataclass(frozen=True)
class Delivery:
    """A message to fetch and deliver. ``recover`` means a previous try may have reached the destination:
    look for it there before delivering again."""

    info: MessageInfo
    recover: bool
    attempts: int
    headers_only: bool = False


@dataclass(frozen=True)
class PollPlan:
    deliver: list[Delivery] = field(default_factory=list)
    delete: list[MessageInfo] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    quarantined: int = 0
    # Over max_message_size with oversize = "skip": quarantined without being downloaded.
    oversize: list[MessageInfo] = field(default_factory=list)
    # Left for a later poll by max_messages_per_poll.
    deferred: int = 0
    # Recorded as already seen by a baseline (start = "new"): never delivered, never deleted by us.
    seen: int = 0

    @property
    def new_count(self) -> int:
        return sum(1 for d in self.deliver if not d.recover)


@dataclass
class _Tally:
    """What the per-message decisions add up to, before it becomes the frozen plan."""

    deliver: list[Delivery] = field(default_factory=list)
    delete: list[MessageInfo] = field(default_factory=list)
    oversize: list[MessageInfo] = field(default_factory=list)
    quarantined: int = 0
    seen: int = 0


def plan_poll(
    listing: Sequence[MessageInfo],
    known: KnownMessages,
    retention: RetentionPolicy,
    now: datetime,
    limits: Limits = Limits(),  # noqa: B008 - frozen, so a shared default is safe
) -> PollPlan:
    """``listing`` is in server order (oldest first); the plan keeps that order.

    ``known.kept`` (delivered, and the retention keeps them) need nothing, so they are only set aside:
    the messages decided one by one are the others, which for a maildrop that keeps its mail are the
    few new ones.
    """
    uidls = [info.uidl for info in listing]
    listed = set(uidls)
    # Duplicates cannot be told apart by UIDL: delivering one could deliver the wrong one twice.
    duplicates = duplicated_uidls(uidls) if len(listed) < len(uidls) else set()
    skipped = known.kept | duplicates if duplicates else known.kept
    tally = _Tally()
    rows = known.rows
    for info in listing:
        if info.uidl not in skipped:
            _decide(tally, info, rows.get(info.uidl), retention, now, limits)
    limit = limits.max_messages_per_poll
    # Oldest first: what is over the limit waits for the next poll, in the same order.
    deliver = tally.deliver[:limit] if limit else tally.deliver
    return PollPlan(
        deliver=deliver,
        delete=tally.delete,
        gone=[uidl for uidl in rows if uidl not in listed] + sorted(known.kept - listed),
        duplicates=sorted(duplicates),
        quarantined=tally.quarantined,
        oversize=tally.oversize,
        deferred=len(tally.deliver) - len(deliver),
        seen=tally.seen,
    )


def _decide(
    tally: _Tally,
    info: MessageInfo,
    row: KnownMessage | None,
    retention: RetentionPolicy,
    now: datetime,
    limits: Limits,
) -> None:
    if row is not None and row.state is MessageState.FAILED:
        tally.quarantined += 1
    elif row is not None and row.state is MessageState.SEEN:
        tally.seen += 1
    elif row is None or row.state is MessageState.PENDING:
        action = limits.oversize_action(info.size)
        if action == "skip":
            tally.oversize.append(info)
            return
        attempts = row.attempts if row is not None else 0
        tally.deliver.append(Delivery(info, row is not None, attempts, headers_only=action == "headers_only"))
    elif not row.headers_only and should_delete(retention, row.delivered_at, now):
        # DELIVERED, or DELETED whose deletion the server did not carry out: either way it is safe.
        # A headers-only delivery stays: the POP3 server has the only whole copy.
        tally.delete.append(info)


def within_ceiling(plan: PollPlan, limits: Limits) -> PollPlan:
    """``plan`` with the deliveries over the hard size ceiling moved to ``oversize`` (quarantined, never
    downloaded): for a plan made before the sizes were known (see pipeline.with_sizes)."""
    over = [d.info for d in plan.deliver if over_ceiling(d.info.size, limits.ceiling)]
    if not over:
        return plan
    deliver = [d for d in plan.deliver if not over_ceiling(d.info.size, limits.ceiling)]
    return replace(plan, deliver=deliver, oversize=[*plan.oversize, *over])


def with_recovery(plan: PollPlan, uidls: set[str]) -> PollPlan:
    """``plan`` with the deliveries of ``uidls`` turned into recoveries: looked for in the destination
    before being delivered (for messages whose identity is in doubt, e.g. after UIDLs changed)."""
    if not uidls:
        return plan
    deliver = [replace(d, recover=True) if d.info.uidl in uidls else d for d in plan.deliver]
    return replace(plan, deliver=deliver)
