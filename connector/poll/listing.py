"""The first phase of a poll: what is on the server, which known message each listed one is, and the plan.

    UIDL (+ LIST, or TOP n 0 where UIDLs cannot be trusted: identity.py) -> the ledger's view
    (``start = "new"`` baseline, re-matched UIDLs after a host migration) -> the plan (plan.py, pure) ->
    sizes for what is fetched (pipeline.with_sizes) -> is each message a DELE would remove still the one
    delivered under its UIDL (recheck.py) -> record what the listing says (rows to forget, missing, back).

The result is the ``PollPlan`` the delivery phase carries out. Problems (a UIDL change, messages that
cannot be identified, a listing that suddenly lost messages) go to the poll's ``Recorder``; the notes that
``status`` shows are written to the account's row.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from connector.config import Account
from connector.ledger.records import Clock, KnownMessage, KnownMessages, MessageState
from connector.ledger.store import Ledger
from connector.policies.limits import Limits, needs_baseline
from connector.policies.listing import Forgetting, listed_last_time
from connector.policies.retention import deletable_until
from connector.policies.uidl import UidlChange, rekeyed, suspect_migration
from connector.poll.identity import Identified, baseline_entries, identify, migration
from connector.poll.pipeline import with_sizes
from connector.poll.plan import PollPlan, plan_poll, with_identities_checked, with_recovery, within_ceiling
from connector.poll.recheck import not_the_recorded
from connector.poll.recorder import Recorder
from connector.pop3 import MessageInfo, Pop3Client

log = logging.getLogger("connector.poll.listing")

# Problems kept in the account's identity note (shown by `status`); more are counted, not quoted.
_NOTED_PROBLEMS = 5


@dataclass(frozen=True)
class Listed:
    """The listing with trustworthy identities and the ledger's view of it."""

    listing: Sequence[MessageInfo]
    known: KnownMessages
    # To look for in the destination before delivering them (identity in doubt).
    suspects: set[str]
    # The time the plan is made for: the ledger was read for the retention at this time.
    now: datetime
    identified: Identified
    # How the server's UIDLs changed at once (a host migration), if they did.
    change: UidlChange | None

    @property
    def sized(self) -> bool:
        """False: from UIDL alone, every size 0 (see identity.Identified.sized)."""
        return self.identified.sized


class Listing:
    """Reads the listing and makes the plan for one poll of ``account`` (``account_id`` 0: not in the
    ledger yet, dry run only)."""

    def __init__(self, ledger: Ledger, account: Account, account_id: int, clock: Clock) -> None:
        self._ledger = ledger
        self._account = account
        self._account_id = account_id
        self._clock = clock
        self._limits = Limits.of(account)

    def dry_plan(self, pop: Pop3Client) -> PollPlan:
        """The plan without writing anything (``sync --dry-run``)."""
        listed = self._read(pop, apply=False)
        return self._plan_of(listed, listed.listing)

    def plan(
        self, pop: Pop3Client, recorder: Recorder, identity_note: str | None
    ) -> tuple[PollPlan, frozenset[str]]:
        """The plan, and the UIDLs listed for identical copies that nothing tells apart (popa3d twins:
        a copy found in the destination may be a sibling's). The ledger learns what the listing says.
        ``identity_note``: the account's note as the poll found it, so that unchanged problems are logged,
        not reported again."""
        listed = self._read(pop, apply=True)
        change_note = self._uidl_change_note(listed.change, recorder)
        listing, plan = listed.listing, self._plan_of(listed, listed.listing)
        if not listed.sized:
            listing, plan = with_sizes(pop, listing, plan, lambda sized: self._plan_of(listed, sized))
            plan = within_ceiling(plan, self._limits)
        # A UIDL may have been given to another message since its row was written (policies.listing).
        sized = listed.sized or listing is not listed.listing  # with_sizes may have listed them all
        others = not_the_recorded(pop, plan.delete, listed.known.rows, sized=sized)
        plan = with_identities_checked(plan, others, self._limits)
        for info in others:
            log.info(
                "account %s: message %s is not the one delivered under that UIDL (headers or size "
                "differ): delivering it as new, after looking for it in the destination",
                self._account.name,
                info.uidl,
            )
        self._left_unidentified(pop, listing, plan, listed.identified, recorder, identity_note, change_note)
        # A message left out of a malformed listing may still be on the server: such a listing forgets
        # nothing and counts no row missing.
        self._record_listing(plan, recorder, believed=not pop.unlisted)
        for info in plan.oversize:
            recorder.quarantine_unfetched(info.uidl, info.size, self._limits.skip_reason(info.size))
        # A poll with nothing to do says so at DEBUG (see ``PollResult.idle``).
        busy = plan.deliver or plan.delete or plan.deferred or plan.quarantined
        log.log(
            logging.INFO if busy else logging.DEBUG,
            "account %s: %d on server, %d to deliver (%d new, %d left for later polls), %d to delete, "
            "%d quarantined",
            self._account.name,
            len(listing),
            len(plan.deliver),
            plan.new_count,
            plan.deferred,
            len(plan.delete),
            plan.quarantined,
        )
        return plan, frozenset(listed.identified.doubtful)

    def _plan_of(self, listed: Listed, listing: Sequence[MessageInfo]) -> PollPlan:
        forgetting = Forgetting.of(self._account)
        retention = self._account.retention
        plan = plan_poll(listing, listed.known, retention, listed.now, self._limits, forgetting)
        return with_recovery(plan, listed.suspects)

    def _read(self, pop: Pop3Client, *, apply: bool) -> Listed:
        """The listing with trustworthy identities, the ledger's view of it (after a baseline or a UIDL
        re-match), and the messages to look for in the destination before delivering them. With
        ``apply=False`` (dry run) the ledger is only read."""
        now = self._clock()
        taken = self._baseline_taken()
        # UIDL alone is enough unless sizes decide something: a limit, or a baseline recording them.
        sizes = not apply or self._account.max_message_size is not None
        requested = None
        if taken is not False:
            # No baseline is due, so the listing to ask for is known before the ledger is read: it is read
            # while the server prepares the listing, which for a maildrop of 100,000 messages takes longer
            # than the whole ledger read (docs/benchmarks.md, issue 16).
            requested = pop.request_listing(sizes=sizes)
        known = self._known(now)
        baseline = taken is False and needs_baseline(self._account.start, taken, known)
        identified = identify(
            pop, known, quick=not (sizes or baseline), requested=requested, read_rows=self._rows_of
        )
        listing = identified.listing
        if baseline:
            known = KnownMessages(
                self._baseline(pop, listing) if apply else {i.uidl: _seen(i) for i in listing}
            )
        change, known = self._rematched(pop, identified, known)
        if apply and change is not None:
            self._ledger.rekey(self._account_id, change.rematched)
        suspects = set(change.unmatched) if change is not None else set()
        return Listed(listing, known, suspects, now, identified, change)

    def _known(self, now: datetime) -> KnownMessages:
        if not self._account_id:
            return KnownMessages()
        return self._ledger.known_to_plan(self._account_id, deletable_until(self._account.retention, now))

    def _rows_of(self, uidls: Collection[str]) -> dict[str, KnownMessage]:
        return self._ledger.rows_of(self._account_id, uidls) if self._account_id else {}

    def _baseline_taken(self) -> bool | None:
        """Whether the ``start = "new"`` baseline was taken; None when the account has no such start."""
        if self._account.start != "new":  # spares a query at every poll
            return None
        return bool(self._account_id) and self._ledger.baseline_taken(self._account_id)

    def _baseline(self, pop: Pop3Client, listing: Sequence[MessageInfo]) -> dict[str, KnownMessage]:
        count = self._ledger.record_seen(self._account_id, baseline_entries(pop, listing, {}))
        log.info(
            'account %s: start = "new": %d messages on the server recorded as seen', self._account.name, count
        )
        return self._ledger.known_messages(self._account_id)

    def _rematched(
        self, pop: Pop3Client, identified: Identified, known: KnownMessages
    ) -> tuple[UidlChange | None, KnownMessages]:
        """When the UIDLs look like they all changed (a host migration), the new ones re-matched to known
        messages, and the ledger as it reads once re-keyed; (None, ``known``) when they did not."""
        listing = identified.listing
        appeared = [] if identified.migration_checked else suspect_migration(listing, listed_last_time(known))
        if not appeared:
            return None, known
        # Re-matching compares header hashes of every known row, the kept ones too (read before re-keying).
        rows = self._ledger.known_messages(self._account_id) if known.kept else known.rows
        change = migration(pop, listing, rows, appeared)
        return change, KnownMessages(rekeyed(rows, change.rematched))

    def _uidl_change_note(self, change: UidlChange | None, recorder: Recorder) -> str | None:
        if change is None:
            return None
        note = (
            f"{self._clock().isoformat(timespec='seconds')}: the server's UIDLs changed at once "
            f"({change.vanished} known ones vanished; a host migration?): {len(change.rematched)} re-matched "
            f"by header hash and size, {len(change.unmatched)} unmatched looked up in the destination before "
            "delivery"
        )
        recorder.problem(note)
        return note

    def _left_unidentified(
        self,
        pop: Pop3Client,
        listing: Sequence[MessageInfo],
        plan: PollPlan,
        identified: Identified,
        recorder: Recorder,
        identity_note: str | None,
        change_note: str | None,
    ) -> None:
        """Report the messages left on the server because they cannot be identified, and record the
        account's identity note. Reported as problems by the poll that first finds them (the note changes);
        the polls after it log them and `status` shows the note: the server keeps listing them that way,
        which is no failure of the account to be reported at every poll. The note names no message number
        (they shift as other messages are deleted), so that it stays the same while nothing new happens."""
        noted = [
            f"UIDL {uidl!r} is listed more than once by the server; left on the server"
            for uidl in plan.duplicates[:_NOTED_PROBLEMS]
        ]
        if len(plan.duplicates) > _NOTED_PROBLEMS:
            noted.append(f"{len(plan.duplicates) - _NOTED_PROBLEMS} more UIDL(s) listed more than once")
        if identified.unidentified:
            noted.append(
                f"{identified.unidentified} message(s) have no UIDL and TOP failed; left on the server"
            )
        # Each malformed line is reported with its message number and text; the note only counts them.
        texts = [*noted, *(f"left on the server: {entry.reason}" for entry in pop.unlisted)]
        if pop.unlisted:
            noted.append(
                f"{len(pop.unlisted)} line(s) of the UIDL or LIST listing malformed; their messages left on "
                "the server (each poll logs which)"
            )
        note = "; ".join(filter(None, [identified.note, *noted])) or None
        for text in texts:
            if note != identity_note:
                recorder.problem(text)
            else:
                log.warning("account %s: %s", self._account.name, text)
        duplicates = set(plan.duplicates)
        copies = sum(1 for info in listing if info.uidl in duplicates) if duplicates else 0
        recorder.result.unidentified = copies + identified.unidentified + len(pop.unlisted)
        recorder.result.listed = len(listing) + len(pop.unlisted)
        if change_note is not None or note != identity_note:  # else a write for nothing
            self._ledger.set_uidl_notes(self._account_id, note, change_note, defer=True)

    def _record_listing(self, plan: PollPlan, recorder: Recorder, *, believed: bool) -> None:
        """What the listing says about known messages: rows to forget, missing, or back again. A listing
        not ``believed`` (malformed lines left messages out of it) forgets nothing and counts nothing."""
        if plan.gone and believed:
            self._ledger.prune(self._account_id, plan.gone)
        if plan.sudden_loss is not None:
            recorder.problem(plan.sudden_loss)
            when = self._clock().isoformat(timespec="seconds")
            self._ledger.set_listing_note(self._account_id, f"{when}: {plan.sudden_loss}")
        self._ledger.record_missing(
            self._account_id, plan.missing, counted=plan.sudden_loss is None and believed
        )
        self._ledger.record_listed_again(self._account_id, plan.listed_again)


def _seen(info: MessageInfo) -> KnownMessage:
    return KnownMessage(info.uidl, MessageState.SEEN, 0, None, None, None, None, pop_size=info.size)
