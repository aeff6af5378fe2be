"""What one poll will do, decided from the server's listing and the ledger alone. A pure function.

Kept apart from the engine so that ``sync --dry-run`` shows exactly the plan a real poll would follow, and
so that the rules (what is new, what is retried, what is deleted, what is forgotten) are unit-testable.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence, Set
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import compress

from connector.config import RetentionPolicy
from connector.ledger.records import KnownMessage, KnownMessages, MessageState
from connector.policies.limits import Limits
from connector.policies.listing import (
    EXPECTED_ON_SERVER,
    Forgetting,
    forgotten,
    lost_report,
    retired,
    sudden_loss,
    to_delete_from_ledger,
)
from connector.policies.retention import should_delete
from connector.policies.sizes import over_ceiling
from connector.policies.uidl import duplicated_uidls
from connector.pop3 import MessageInfo, uidl_set_of, uidls_not_in, uidls_of

# Up to this many messages to decide are looked for in the listing from its end (see _positions).
_SCAN_BACK = 1000


@dataclass(frozen=True)
class Delivery:
    """A message to fetch and deliver. ``recover`` means a previous try may have reached the destination:
    look for it there before delivering again."""

    info: MessageInfo
    recover: bool
    attempts: int
    headers_only: bool = False
    # The ledger's row under this UIDL is about another message (or about this one before it went
    # missing): it is deleted just before this message is recorded (policies.listing.retired).
    replaces_row: bool = False


@dataclass(frozen=True)
class PollPlan:
    deliver: list[Delivery] = field(default_factory=list)
    delete: list[MessageInfo] = field(default_factory=list)
    # Rows to delete from the ledger now, before anything is delivered (see policies.listing).
    gone: list[str] = field(default_factory=list)
    # Rows not in this listing, to count as missing; and rows that were missing and are listed again.
    missing: list[str] = field(default_factory=list)
    listed_again: list[str] = field(default_factory=list)
    # Set when the listing lacks most of the known maildrop at once: it is not evidence (forgets nothing,
    # counts no poll), and the poll reports this.
    sudden_loss: str | None = None
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
    # Listed under the UIDL of a row that no longer decides anything (policies.listing.retired).
    retired: list[str] = field(default_factory=list)
    # Of those, the ones quarantined over max_message_size: their rows go now.
    retired_oversize: list[str] = field(default_factory=list)


def plan_poll(
    listing: Sequence[MessageInfo],
    known: KnownMessages,
    retention: RetentionPolicy,
    now: datetime,
    limits: Limits = Limits(),  # noqa: B008 - frozen, so a shared default is safe
    forgetting: Forgetting = Forgetting(),  # noqa: B008 - frozen, so a shared default is safe
) -> PollPlan:
    """``listing`` is in server order (oldest first); the plan keeps that order.

    ``known.kept`` (delivered, and the retention keeps them) need nothing, so they are only set aside:
    the messages decided one by one are the others, which for a maildrop that keeps its mail are the
    few new ones.
    """
    listed = uidl_set_of(listing)
    # Duplicates cannot be told apart by UIDL: delivering one could deliver the wrong one twice.
    duplicates = duplicated_uidls(uidls_of(listing)) if len(listed) < len(listing) else set()
    # The messages to decide are the listed ones not kept (one set difference, shared with the identity
    # checks): for a maildrop that keeps 100,000, the 10 new ones. No Python code per kept message.
    fresh = uidls_not_in(listing, known.kept)
    undecided = _positions(uidls_of(listing), fresh - duplicates if duplicates else fresh)
    tally = _Tally()
    rows = known.rows
    for info in map(listing.__getitem__, undecided):
        row = rows.get(info.uidl)
        if row is not None and retired(row, now, forgetting):
            tally.retired.append(info.uidl)
            _deliver(tally, info, None, limits, recover=True, replaces_row=True)
        else:
            _decide(tally, info, row, retention, now, limits)
    limit = limits.max_messages_per_poll
    # Oldest first: what is over the limit waits for the next poll, in the same order.
    deliver = tally.deliver[:limit] if limit else tally.deliver
    absence = _absence(known, listed, fresh, len(listing), now, forgetting)
    return PollPlan(
        deliver=deliver,
        delete=tally.delete,
        gone=absence.gone + tally.retired_oversize,
        missing=absence.missing,
        listed_again=[uidl for uidl in absence.listed_again if uidl not in tally.retired],
        sudden_loss=absence.sudden_loss,
        duplicates=sorted(duplicates),
        quarantined=tally.quarantined,
        oversize=tally.oversize,
        deferred=len(tally.deliver) - len(deliver),
        seen=tally.seen,
    )


def _positions(uidls: Sequence[str], wanted: Set[str]) -> list[int]:
    """The positions in ``uidls`` of the ``wanted`` ones, each listed once, in order. Few are looked for
    from the end, where a maildrop's new messages are, stopping once all are found; many, in one pass."""
    if len(wanted) > _SCAN_BACK:
        return list(compress(range(len(uidls)), map(wanted.__contains__, uidls)))
    positions: list[int] = []
    last = len(uidls) - 1
    for back, uidl in enumerate(reversed(uidls)):
        if len(positions) == len(wanted):
            break
        if uidl in wanted:
            positions.append(last - back)
    positions.reverse()
    return positions


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
        _deliver(tally, info, row, limits, recover=row is not None)
    elif not row.headers_only and should_delete(retention, row.delivered_at, now):
        # DELIVERED (DELETED rows are retired before this). The engine compares the listed message with
        # the row before the DELE is sent (with_identities_checked). A headers-only delivery stays: the
        # POP3 server has the only whole copy.
        tally.delete.append(info)


def within_ceiling(plan: PollPlan, limits: Limits) -> PollPlan:
    """``plan`` with the deliveries over the hard size ceiling moved to ``oversize`` (quarantined, never
    downloaded): for a plan made before the sizes were known (see pipeline.with_sizes)."""
    over = [d.info for d in plan.deliver if over_ceiling(d.info.size, limits.ceiling)]
    if not over:
        return plan
    deliver = [d for d in plan.deliver if not over_ceiling(d.info.size, limits.ceiling)]
    return replace(plan, deliver=deliver, oversize=[*plan.oversize, *over])


def _deliver(
    tally: _Tally,
    info: MessageInfo,
    row: KnownMessage | None,
    limits: Limits,
    *,
    recover: bool,
    replaces_row: bool = False,
) -> None:
    action = limits.oversize_action(info.size)
    if action == "skip":
        tally.oversize.append(info)
        if replaces_row:
            tally.retired_oversize.append(info.uidl)
        return
    attempts = row.attempts if row is not None else 0
    headers_only = action == "headers_only"
    tally.deliver.append(
        Delivery(info, recover, attempts, headers_only=headers_only, replaces_row=replaces_row)
    )


@dataclass(frozen=True)
class _Absence:
    gone: list[str]
    missing: list[str]
    listed_again: list[str]
    sudden_loss: str | None


def _absence(
    known: KnownMessages,
    listed: Set[str],
    fresh: Set[str],
    listed_count: int,
    now: datetime,
    forgetting: Forgetting,
) -> _Absence:
    """What the listing says about the known messages it lacks (or lacked at the last poll). ``fresh``:
    the ``listed`` UIDLs that are not kept."""
    rows = known.rows
    # Every kept row was listed at the last poll (else it is in rows). Whether one is missing is told by
    # counting: the kept ones listed are the listed ones less ``fresh``.
    all_kept_listed = len(known.kept) == len(listed) - len(fresh)
    lost_kept = frozenset() if all_kept_listed else known.kept - listed
    not_listed = [row for uidl, row in rows.items() if uidl not in listed]
    expected = len(known.kept) + sum(1 for row in rows.values() if _counts_for_loss(row))
    lost = len(lost_kept) + sum(1 for row in not_listed if _counts_for_loss(row))
    sudden = sudden_loss(expected, lost, listed_count)
    gone: list[str] = []
    missing: list[str] = []
    for row in not_listed:
        if to_delete_from_ledger(row, now, forgetting):
            # A listing not to be believed forgets nothing (the server confirmed ``deleted`` ones).
            if not sudden or row.state is MessageState.DELETED:
                gone.append(row.uidl)
        elif row.state in EXPECTED_ON_SERVER and not forgotten(row, now, forgetting):
            missing.append(row.uidl)
    again = [uidl for uidl, row in rows.items() if row.missing_since is not None and uidl in listed]
    return _Absence(
        gone=gone,
        missing=missing + sorted(lost_kept),
        listed_again=again,
        sudden_loss=lost_report(expected, lost, listed_count) if sudden else None,
    )


def _counts_for_loss(row: KnownMessage) -> bool:
    """Whether a row's absence from the listing could make a loss sudden: it was listed at the last poll
    and the connector did not mean to delete it. A delivered row outside ``kept`` (``known_to_plan``) is due
    for deletion: missing, it is most likely gone by our own DELE, confirmed by a QUIT whose ``deleted``
    record a crash or a kill prevented. It is still only counted missing (``Forgetting`` applies), never
    taken for a glitch of the server that forgets nothing."""
    if row.state not in EXPECTED_ON_SERVER or row.missing_since is not None:
        return False
    return row.state is not MessageState.DELIVERED or row.headers_only


def with_identities_checked(
    plan: PollPlan,
    others: Collection[MessageInfo],
    limits: Limits = Limits(),  # noqa: B008 - frozen, so a shared default is safe
) -> PollPlan:
    """``plan`` once the messages it would delete were compared with their rows: ``others`` (with their
    LIST sizes) are not the messages their rows are about, but new ones under a UIDL used again. They
    are not deleted but delivered (within ``limits``), looked up in the destination first, and their
    rows are forgotten (see ``Delivery.replaces_row``)."""
    if not others:
        return plan
    numbers = {info.number for info in others}
    tally = _Tally()
    for info in others:
        _deliver(tally, info, None, limits, recover=True, replaces_row=True)
    deliver = sorted([*plan.deliver, *tally.deliver], key=lambda delivery: delivery.info.number)
    return replace(
        plan,
        deliver=deliver,
        oversize=[*plan.oversize, *tally.oversize],
        delete=[info for info in plan.delete if info.number not in numbers],
        gone=[*plan.gone, *tally.retired_oversize],
        listed_again=[uidl for uidl in plan.listed_again if uidl not in {info.uidl for info in others}],
    )


def with_recovery(plan: PollPlan, uidls: set[str]) -> PollPlan:
    """``plan`` with the deliveries of ``uidls`` turned into recoveries: looked for in the destination
    before being delivered (for messages whose identity is in doubt, e.g. after UIDLs changed)."""
    if not uidls:
        return plan
    deliver = [replace(d, recover=True) if d.info.uidl in uidls else d for d in plan.deliver]
    return replace(plan, deliver=deliver)
