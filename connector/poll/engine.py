"""The sync engine: one poll of one account.

connect -> UIDL (+LIST) -> plan (server minus ledger) -> for each message, oldest first:
RETR -> record ``pending`` (commit) -> deliver -> record ``delivered`` -> queue the DELE if retention says
so -> ... -> commit, send the queued DELEs -> QUIT -> record ``deleted`` for what the server confirmed.

Crash safety comes from that order: a message is DELEted only after its delivery is committed, and the
POP3 server only deletes after QUIT; a ``pending`` row found by a later poll means "maybe delivered", so
the destination is searched (Message-ID, size, SHA-256) before delivering again.

Speed: whole messages are RETRed ahead by a fetch thread (pipeline.py) while this thread records and
delivers them; the ``delivered`` update commits with the next message's ``pending`` (one transaction per
message) and always before any DELE. Headers-only fetches (TOP) and servers that delete whatever was
retrieved at QUIT (EXPIRE 0) take the simple path: one message fetched, then delivered, at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import NamedTuple, TypeVar

from connector.config import Account, Config
from connector.connections import Connections
from connector.destinations.base import DestinationSession, look_up
from connector.errors import (
    AuthenticationError,
    ConnectorError,
    DestinationError,
    DestinationRejectedError,
    DestinationTooLargeError,
    LedgerError,
    SourceLoginDelayError,
    SourceMessageError,
    SourceReplyTooLongError,
    SourceShortReplyError,
)
from connector.ledger.lease import LeaseLostError, PollLease
from connector.ledger.models import MessageState
from connector.ledger.store import Clock, KnownMessage, KnownMessages, Ledger, PollOutcome, utcnow
from connector.message import FetchedMessage
from connector.ops.logs import log_context
from connector.ops.poll_log import PollLog
from connector.ops.protocol_log import protocol_note, recording
from connector.policies.blame import Blame, DropWitness, Verdict, blame
from connector.policies.lease import LeaseHeld
from connector.policies.limits import Limits, needs_baseline
from connector.policies.listing import Forgetting, listed_last_time
from connector.policies.retention import deletable_until, should_delete
from connector.policies.retry import failure_delay, should_suspend, success_delay
from connector.policies.server_limits import deletes_retrieved, login_delay, retention_conflict
from connector.policies.uidl import UidlChange, rekeyed, suspect_migration
from connector.poll.batched import BatchedDelivery, batchable
from connector.poll.deletions import DeleQueue
from connector.poll.events import Finished, Observers, Planned, PollObserver, Started
from connector.poll.fetch import fetch, spool_for
from connector.poll.identity import Identified, baseline_entries, identify, migration
from connector.poll.multidrop import DestinationPool, RoutedDelivery
from connector.poll.pipeline import BATCH_BYTES, Fetched, Prefetcher, with_sizes
from connector.poll.plan import (
    Delivery,
    PollPlan,
    plan_poll,
    with_identities_checked,
    with_recovery,
    within_ceiling,
)
from connector.poll.recheck import not_the_recorded
from connector.poll.result import PollResult
from connector.pop3 import MessageInfo, Pop3Client

log = logging.getLogger("connector.poll.engine")

# Problems kept in the account's identity note (shown by `status`); more are counted, not quoted.
_NOTED_PROBLEMS = 5


_DestinationAction = Callable[[DestinationSession], "str | None"]
_T = TypeVar("_T")


def _quit_quietly(pop: Pop3Client) -> None:
    try:
        pop.quit()
    except Exception:
        pop.close()


def _seen(info: MessageInfo) -> KnownMessage:
    return KnownMessage(info.uidl, MessageState.SEEN, 0, None, None, None, None, pop_size=info.size)


class _DestinationDown(Exception):
    """The destination cannot take more mail in this poll; the POP3 session still ends cleanly."""


class _Listing(NamedTuple):
    listing: list[MessageInfo]
    known: KnownMessages
    # To look for in the destination before delivering them (identity in doubt).
    suspects: set[str]
    # The time the plan is made for: the ledger was read for the retention at this time.
    now: datetime
    # False: from UIDL alone, every size 0 (see identity.Identified.sized).
    sized: bool = True


class SyncEngine:
    """Polls accounts; every poll reports what it does to ``observers`` (connector/poll/events.py)."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        connections: Connections | None = None,
        *,
        clock: Clock = utcnow,
        observers: Iterable[PollObserver] = (),
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.connections = connections or Connections()
        self.clock = clock
        self.observers = Observers([PollLog(), *observers])  # the per-message log lines, for every run mode

    def poll(
        self, account: Account, *, dry_run: bool = False, stop: threading.Event | None = None
    ) -> PollResult:
        with log_context(account.name), recording(self.config, account):
            run = _Poll(self, account, stop or threading.Event())
            if dry_run:  # changes nothing, reports nothing
                return run.dry_run()
            started = time.monotonic()
            self.observers.emit(Started(account.name))
            result = run.run()
            self.observers.emit(Finished(account.name, result, time.monotonic() - started, run.planned_count))
            return result

    def planned(self, account: Account, plan: PollPlan) -> None:
        self.observers.emit(
            Planned(
                account.name,
                len(plan.deliver),
                sum(delivery.info.size for delivery in plan.deliver),
                len(plan.delete),
            )
        )


class _Poll(RoutedDelivery, BatchedDelivery):
    """The state of one poll; methods are the steps (those of catch-all delivery in ``RoutedDelivery``,
    of several messages in one command in ``BatchedDelivery``)."""

    def __init__(self, engine: SyncEngine, account: Account, stop: threading.Event) -> None:
        self.engine = engine
        self.ledger = engine.ledger
        self.account = account
        self.stop = stop
        self.result = PollResult(account=account.name)
        self.destinations = DestinationPool(self._open_destination)
        self.drops = DropWitness()
        self.to_delete: list[str] = []
        # Only a successful flush of the ledger releases these (see connector/poll/deletions.py).
        self.dele_queue = DeleQueue(lambda: self.ledger.flush(self.account_id))
        self.account_id = 0
        self.pop: Pop3Client | None = None
        # LOGIN-DELAY: the next poll must not come sooner than this.
        self.server_delay: timedelta | None = None
        # Retrieved in this session and not (yet) delivered: what an EXPIRE 0 server would lose at QUIT.
        self.undelivered: set[str] = set()
        # Delivered as headers only: the POP3 server keeps the one whole copy, whatever the retention.
        self.keep_on_server: set[str] = set()
        # The account's identity note as the ledger had it when the poll started (see _suspended).
        self.identity_note: str | None = None
        # One poll per account across processes: every ledger write of this poll is fenced by it.
        self.lease: PollLease | None = None
        # How the listing was identified, and the note of a UIDL change found in it (see _listing).
        self.identified = Identified([])
        self.uidl_change_note: str | None = None
        # Messages the plan fetches and delivers; None until the plan is made (see events.Finished).
        self.planned_count: int | None = None

    # --- whole poll ----------------------------------------------------------------------------------

    def run(self) -> PollResult:
        try:
            return self._run()
        finally:
            if self.lease is not None:  # however the poll ended: stop renewing; release unless done
                self.lease.close()

    def _run(self) -> PollResult:
        try:
            account_id = self.ledger.account_id(self.account.name)
            assert account_id is not None
            self.account_id = account_id
            if self._suspended() or not self._leased():
                return self.result
            self.ledger.poll_started(account_id, defer=True)  # committed with the poll's first write
            self._session()
        except ConnectorError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug must cost one account's poll, not the whole run
            log.exception("account %s: internal error during the poll", self.account.name)
            self._fail(ConnectorError(f"internal error: {exc.__class__.__name__}: {exc}"))
        self._finish()
        return self.result

    def _leased(self) -> bool:
        """Take the account's lease; False (status ``busy``, not a failure) when another poll holds it:
        this one is skipped and tried again after ``poll_interval``."""
        ttl = self.engine.config.service.lease_ttl
        taken = self.ledger.leases.take_for_poll(self.account_id, self.account.name, ttl)
        if isinstance(taken, LeaseHeld):
            self.result.status = "busy"
            self.result.error = taken.describe(self.account.name)
            self.result.next_poll_at = self.engine.clock() + self.account.poll_interval
            log.warning("%s", self.result.error)
            return False
        self.lease = taken
        return True

    def _suspended(self) -> bool:
        """A suspended account is not polled at all; it is looked at again after ``poll_interval`` so
        that the service notices ``pop-connector resume``."""
        state = self.ledger.account_state(self.account_id)
        self.identity_note = state.identity_note
        if state.suspension is None:
            return False
        since, reason = state.suspension
        self.result.status = "suspended"
        self.result.error = (
            f"suspended since {since.isoformat(timespec='seconds')}: {reason}; "
            f"run `pop-connector resume {self.account.name}` once the cause is fixed"
        )
        self.result.next_poll_at = self.engine.clock() + self.account.poll_interval
        self.ledger.set_next_poll(self.account_id, self.result.next_poll_at)
        return True

    def dry_run(self) -> PollResult:
        try:
            account_id = self.ledger.account_id(self.account.name, create=False)
            self.account_id = account_id or 0
            with self.engine.connections.open_source(self.account) as pop:
                listed = self._listing(pop, apply=False)
                self.result.plan = self._plan_of(listed, listed.listing)
        except ConnectorError as exc:
            self._fail(exc)
        return self.result

    def _session(self) -> None:
        pop = self.pop = self.engine.connections.open_source(self.account)
        self.server_delay = login_delay(pop.capabilities)
        conflict = retention_conflict(pop.capabilities, self.account.retention)
        if conflict is not None:
            log.warning("account %s: %s", self.account.name, conflict)
        try:
            plan = self._plan(pop)
            self._deliver_all(pop, plan)
            for info in plan.delete:
                self._dele(info)
            self._send_deles()
            if self.to_delete and self.lease is not None:
                self.lease.confirm()  # QUIT carries the DELEs out: only while this poll holds the account
        except BaseException as exc:
            if isinstance(exc, LeaseLostError):
                # Another poll has the account: no DELE, no QUIT, so that the server deletes nothing.
                pop.close()
                self._close_destination()
                raise
            # Queued DELEs go out only once the deliveries they follow are committed (a failed flush drops
            # them), so letting QUIT apply them is safe.
            if isinstance(exc, Exception) and pop.usable:
                with contextlib.suppress(ConnectorError):
                    self._send_deles()
            self._end_session(pop, clean=False)
            self._close_destination()
            raise
        self._close_destination()
        if self._end_session(pop, clean=True):
            # Only now has the server removed them (RFC 1939 §6).
            self.ledger.record_deleted(self.account_id, self.to_delete)
            self.result.deleted = len(self.to_delete)

    def _end_session(self, pop: Pop3Client, *, clean: bool) -> bool:
        """QUIT, which carries out the DELEs (all of them follow committed deliveries, so this is safe even
        after an error), unless QUIT would also remove undelivered mail. True when QUIT was confirmed."""
        if self.undelivered and deletes_retrieved(pop.capabilities):
            pop.close()
            self._problem(
                f"the server deletes every retrieved message at QUIT (CAPA EXPIRE 0): ended the session "
                f"without QUIT so that {len(self.undelivered)} undelivered message(s) stay on it; "
                "deletions of delivered ones are repeated at the next poll"
            )
            return False
        if not clean:
            _quit_quietly(pop)
            return False
        pop.quit()
        return True

    def _plan_of(self, listed: _Listing, listing: list[MessageInfo]) -> PollPlan:
        limits = Limits.of(self.account)
        forgetting = Forgetting.of(self.account)
        plan = plan_poll(listing, listed.known, self.account.retention, listed.now, limits, forgetting)
        return with_recovery(plan, listed.suspects)

    def _plan(self, pop: Pop3Client) -> PollPlan:
        listed = self._listing(pop)
        listing, plan = listed.listing, self._plan_of(listed, listed.listing)
        if not listed.sized:
            listing, plan = with_sizes(pop, listing, plan, lambda sized: self._plan_of(listed, sized))
            plan = within_ceiling(plan, Limits.of(self.account))
        # A UIDL may have been given to another message since its row was written (policies.listing).
        sized = listed.sized or listing is not listed.listing  # with_sizes may have listed them all
        others = not_the_recorded(pop, plan.delete, listed.known.rows, sized=sized)
        plan = with_identities_checked(plan, others, Limits.of(self.account))
        for info in others:
            log.info(
                "account %s: message %s is not the one delivered under that UIDL (headers or size "
                "differ): delivering it as new, after looking for it in the destination",
                self.account.name,
                info.uidl,
            )
        self.planned_count = len(plan.deliver)
        self.engine.planned(self.account, plan)
        self._left_unidentified(pop, listing, plan)
        # A message left out of a malformed listing may still be on the server: such a listing forgets
        # nothing and counts no row missing.
        self._record_listing(plan, believed=not pop.unlisted)
        for info in plan.oversize:
            self._quarantine_unfetched(info.uidl, info.size, Limits.of(self.account).skip_reason(info.size))
        log.info(
            "account %s: %d on server, %d to deliver (%d new, %d left for later polls), %d to delete, "
            "%d quarantined",
            self.account.name,
            len(listing),
            len(plan.deliver),
            plan.new_count,
            plan.deferred,
            len(plan.delete),
            plan.quarantined,
        )
        return plan

    def _record_listing(self, plan: PollPlan, *, believed: bool) -> None:
        """What the listing says about known messages: rows to forget, missing, or back again. A listing
        not ``believed`` (malformed lines left messages out of it) forgets nothing and counts nothing."""
        if plan.gone and believed:
            self.ledger.prune(self.account_id, plan.gone)
        if plan.sudden_loss is not None:
            self._problem(plan.sudden_loss)
            when = self.engine.clock().isoformat(timespec="seconds")
            self.ledger.set_listing_note(self.account_id, f"{when}: {plan.sudden_loss}")
        self.ledger.record_missing(
            self.account_id, plan.missing, counted=plan.sudden_loss is None and believed
        )
        self.ledger.record_listed_again(self.account_id, plan.listed_again)

    def _listing(self, pop: Pop3Client, *, apply: bool = True) -> _Listing:
        """The listing with trustworthy identities, the ledger's view of it (after a baseline or a UIDL
        re-match), and the messages to look for in the destination before delivering them. With
        ``apply=False`` (dry run) the ledger is only read."""
        now = self.engine.clock()
        known = self._known(now)
        baseline = self._needs_baseline(known)
        # UIDL alone is enough unless sizes decide something: a limit, or a baseline recording them.
        quick = apply and not baseline and self.account.max_message_size is None
        identified = self.identified = identify(pop, known, quick=quick)
        listing = identified.listing
        if baseline:
            known = KnownMessages(
                self._baseline(pop, listing) if apply else {i.uidl: _seen(i) for i in listing}
            )
        change, known = self._rematched(pop, identified, known)
        if apply:
            self.uidl_change_note = self._uidl_change_note(change)  # written with the identity note
            if change is not None:
                self.ledger.rekey(self.account_id, change.rematched)
        suspects = set(change.unmatched) if change is not None else set()
        return _Listing(listing, known, suspects, now, identified.sized)

    def _known(self, now: datetime) -> KnownMessages:
        if not self.account_id:
            return KnownMessages()
        return self.ledger.known_to_plan(self.account_id, deletable_until(self.account.retention, now))

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
        rows = self.ledger.known_messages(self.account_id) if known.kept else known.rows
        change = migration(pop, listing, rows, appeared)
        return change, KnownMessages(rekeyed(rows, change.rematched))

    def _left_unidentified(self, pop: Pop3Client, listing: Sequence[MessageInfo], plan: PollPlan) -> None:
        """Report the messages left on the server because they cannot be identified, and record the
        account's identity note. Reported as problems by the poll that first finds them (the note changes);
        the polls after it log them and `status` shows the note: the server keeps listing them that way,
        which is no failure of the account to be reported at every poll. The note names no message number
        (they shift as other messages are deleted), so that it stays the same while nothing new happens."""
        identified = self.identified
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
            if note != self.identity_note:
                self._problem(text)
            else:
                log.warning("account %s: %s", self.account.name, text)
        duplicates = set(plan.duplicates)
        copies = sum(1 for info in listing if info.uidl in duplicates) if duplicates else 0
        self.result.unidentified = copies + identified.unidentified + len(pop.unlisted)
        if self.uidl_change_note is not None or note != self.identity_note:  # else a write for nothing
            self.ledger.set_uidl_notes(self.account_id, note, self.uidl_change_note, defer=True)

    def _needs_baseline(self, known: KnownMessages) -> bool:
        if self.account.start != "new":  # spares a query at every poll
            return False
        taken = bool(self.account_id) and self.ledger.baseline_taken(self.account_id)
        return needs_baseline(self.account.start, taken, known)

    def _baseline(self, pop: Pop3Client, listing: list[MessageInfo]) -> dict[str, KnownMessage]:
        count = self.ledger.record_seen(self.account_id, baseline_entries(pop, listing, {}))
        log.info(
            'account %s: start = "new": %d messages on the server recorded as seen', self.account.name, count
        )
        return self.ledger.known_messages(self.account_id)

    def _uidl_change_note(self, change: UidlChange | None) -> str | None:
        if change is None:
            return None
        note = (
            f"{self.engine.clock().isoformat(timespec='seconds')}: the server's UIDLs changed at once "
            f"({change.vanished} known ones vanished; a host migration?): {len(change.rematched)} re-matched "
            f"by header hash and size, {len(change.unmatched)} unmatched looked up in the destination before "
            "delivery"
        )
        self._problem(note)
        return note

    def _quarantine_unfetched(self, uidl: str, pop_size: int, reason: str) -> None:
        """Quarantine a message that has no complete copy here (over max_message_size, or a runaway
        reply); it may have no ledger row yet."""
        self.ledger.record_skipped(self.account_id, uidl, pop_size, reason)
        self.result.quarantined += 1
        self._problem(f"message {uidl!r}: quarantined: {reason}")

    def _deliver_all(self, pop: Pop3Client, plan: PollPlan) -> None:
        # Whatever a server with EXPIRE 0 has sent is gone at QUIT: it gets nothing fetched ahead.
        simple_only = deletes_retrieved(pop.capabilities)
        for simple, group in itertools.groupby(plan.deliver, lambda d: simple_only or d.headers_only):
            deliveries = list(group)
            go_on = (
                self._deliver_simply(pop, deliveries) if simple else self._deliver_overlapped(pop, deliveries)
            )
            if not go_on:
                return

    def _deliver_overlapped(self, pop: Pop3Client, deliveries: Sequence[Delivery]) -> bool:
        """The next messages are fetched while this thread records and delivers (see pipeline.py); what
        has been fetched meanwhile goes in one batch where the destination takes batches.
        False when the poll must stop delivering."""
        spool = partial(spool_for, self.account)
        with Prefetcher(pop, deliveries, spool, ceiling=self.account.message_size_ceiling) as prefetcher:
            for item in prefetcher:
                first = item.message.size if item.message is not None else 0
                batch = [item, *prefetcher.ready(self._batch_room() - 1, BATCH_BYTES - first)]
                with contextlib.ExitStack() as spools:
                    for fetched in batch:
                        spools.enter_context(fetched)
                    if self._stop_requested() or not self._deliver_fetched(batch):
                        return False
        return True

    def _batch_room(self) -> int:
        """Messages the next delivery may carry: known once the destination session is open."""
        session = self.destinations.opened(None) if self.account.routing is None else None
        return session.max_batch() if session is not None else 1

    def _deliver_fetched(self, items: Sequence[Fetched]) -> bool:
        """Deliver ``items`` in order, runs of plain new messages together; False when the poll must stop."""
        for together, group in itertools.groupby(items, lambda item: batchable(item, self.account)):
            run = list(group)
            if together and len(run) > 1:
                if not self._guarded(partial(self._deliver_together, run)):
                    return False
            elif not all(self._deliver_guarded(item) for item in run):  # stops at the first that fails
                return False
        return True

    def _deliver_simply(self, pop: Pop3Client, deliveries: Sequence[Delivery]) -> bool:
        """One message fetched (RETR, or TOP for headers only), then delivered, at a time."""
        for delivery in deliveries:
            if self._stop_requested():
                return False
            with self._fetch_now(pop, delivery) as item:
                if not self._deliver_guarded(item):
                    return False
        return True

    def _fetch_now(self, pop: Pop3Client, delivery: Delivery) -> Fetched:
        try:
            message = fetch(pop, self.account, delivery.info, headers_only=delivery.headers_only)
        except SourceMessageError as exc:
            return Fetched(delivery, error=exc)
        return Fetched(delivery, message=message)

    def _stop_requested(self) -> bool:
        if not self.stop.is_set():
            return False
        self.result.status = "stopped"
        log.info("account %s: stop requested; ending the poll after the current message", self.account.name)
        return True

    def _deliver_guarded(self, item: Fetched) -> bool:
        return self._guarded(partial(self._deliver_one, item))

    def _guarded(self, step: Callable[[], None]) -> bool:
        """Run a delivery step; False when the destination is down and the poll must stop delivering."""
        try:
            step()
        except _DestinationDown:
            return False
        return True

    # --- one message ---------------------------------------------------------------------------------

    def _deliver_one(self, item: Fetched) -> None:
        info, delivery = item.delivery.info, item.delivery
        if item.message is None:
            assert item.error is not None
            if isinstance(item.error, SourceShortReplyError):
                self._short_reply(info, item.error)
                return
            self.result.skipped += 1
            self._problem(f"message {info.uidl!r}: cannot retrieve it: {item.error.message}")
            return
        if delivery.replaces_row:
            # Only now: a crash before this message is recorded leaves the row, and the next poll again
            # looks for the message in the destination first.
            self.ledger.prune(self.account_id, [info.uidl])
        self.undelivered.add(info.uidl)
        if delivery.headers_only:
            self.keep_on_server.add(info.uidl)
        fetched = item.message
        if self.account.routing is not None:
            self._deliver_routed(fetched, delivery)
            return
        if delivery.recover and self._recovered(fetched, info, delivery.attempts):
            return
        self._deliver_new(fetched, info, headers_only=delivery.headers_only)

    def _short_reply(self, info: MessageInfo, exc: SourceShortReplyError) -> None:
        """A RETR far shorter than LIST said is not the message (a store hiccup): nothing is delivered or
        deleted; the attempt counts, and once they run out the message is quarantined (on the server)."""
        # Retrieved all the same: a server that deletes what was retrieved (EXPIRE 0) must not get QUIT.
        self.undelivered.add(info.uidl)
        state = self.ledger.record_fetch_failure(
            self.account_id, info.uidl, info.size, exc.message, max_attempts=self.account.retry.max_attempts
        )
        self.result.failed += 1
        self.result.short_retrs += 1
        if state is MessageState.FAILED:
            self.result.quarantined += 1
            self._problem(f"message {info.uidl!r}: quarantined, out of attempts: {exc.message}")
        else:
            self._problem(f"message {info.uidl!r}: {exc.message}; retried at the next poll")

    def _recovered(self, fetched: FetchedMessage, info: MessageInfo, attempts: int) -> bool:
        """A previous attempt may have reached the destination: look before delivering again."""
        ref = self._call_destination(fetched, partial(look_up, message=fetched), counted=False, pending=False)
        if ref is not None and info.uidl in self.identified.doubtful:
            # What was found may be an identical copy's delivery: recording this copy delivered could lose
            # it, delivering it again could make a duplicate. It stays on the server for a person to judge.
            self._quarantine(
                info,
                f"an identical copy listed under the same UIDL is in the destination ({ref}), so it cannot "
                "be told whether this copy was delivered before the interruption; left on the server",
            )
            return True
        if ref is not None:
            log.info(
                "account %s: message %s was already delivered (%s); recorded it",
                self.account.name,
                info.uidl,
                ref,
            )
            self._record_pending(fetched, info, headers_only=info.uidl in self.keep_on_server)
            self._delivered(info, ref)
            self.result.recovered += 1
            return True
        if attempts >= self.account.retry.max_attempts:
            self._quarantine(info, f"gave up after {attempts} attempts; the last one did not finish")
            return True
        return False

    def _quarantine(self, info: MessageInfo, reason: str) -> None:
        self.ledger.record_quarantined(self.account_id, info.uidl, reason)
        self.result.quarantined += 1
        self._problem(f"message {info.uidl!r}: quarantined: {reason}")

    def _count(self, *, recovered: bool) -> None:
        if recovered:
            self.result.recovered += 1
        else:
            self.result.delivered += 1

    def _record_pending(self, fetched: FetchedMessage, info: MessageInfo, *, headers_only: bool) -> None:
        self.ledger.record_pending(
            self.account_id,
            info.uidl,
            pop_size=info.size,
            size=fetched.size,
            message_id=fetched.message_id,
            sha256=fetched.sha256,
            headers_only=headers_only,
            header_hash=fetched.header_sha256,
            repairs=fetched.repairs,
        )
        if fetched.repairs:
            log.info("account %s: message %s repaired: %s", self.account.name, info.uidl, fetched.repairs)

    def _deliver_new(self, fetched: FetchedMessage, info: MessageInfo, *, headers_only: bool) -> None:
        self._record_pending(fetched, info, headers_only=headers_only)
        self._deliver_recorded(fetched, info)

    def _deliver_recorded(self, fetched: FetchedMessage, info: MessageInfo) -> None:
        """Deliver a message already recorded ``pending``."""
        ref = self._call_destination(fetched, lambda dest: dest.deliver(fetched), counted=True, pending=True)
        if ref is not None:
            self._delivered_new(fetched, info, ref)

    def _delivered_new(self, fetched: FetchedMessage, info: MessageInfo, ref: str) -> None:
        self._delivered(info, ref)
        self.result.delivered += 1
        protocol_note("delivered %s: %d bytes, sha256 %s -> %s", info.uidl, fetched.size, fetched.sha256, ref)
        log.info(
            "account %s: message %s delivered (%d bytes) to %s",
            self.account.name,
            info.uidl,
            fetched.size,
            ref,
        )

    def _delivered(self, info: MessageInfo, ref: str) -> None:
        # Committed with the next message's "pending" (one transaction per message), and always before
        # the DELE is sent (_send_deles flushes).
        delivered_at = self.ledger.record_delivered(self.account_id, info.uidl, ref, defer=True)
        self.undelivered.discard(info.uidl)
        # Retention for the messages delivered now is applied in the same session: the DELE is safe
        # because it is sent after the delivery is committed, and it only takes effect at QUIT.
        if info.uidl in self.keep_on_server:
            return
        if should_delete(self.account.retention, delivered_at, self.engine.clock()):
            self._dele(info)

    # --- destination ---------------------------------------------------------------------------------

    def _open_destination(self, mailbox: str | None) -> DestinationSession:
        """The account's own destination session, or (catch-all) one into a recipient's ``mailbox``."""
        destination = self.engine.config.destination_for(self.account)
        if mailbox is None:
            return self.engine.connections.open_destination(destination, self.account)
        return self.engine.connections.open_recipient(destination, self.account, mailbox)

    def _call_destination(
        self,
        fetched: FetchedMessage,
        action: _DestinationAction,
        *,
        counted: bool,
        pending: bool,
        mailbox: str | None = None,
    ) -> str | None:
        """Run ``action`` against the destination, translating failures into ledger state.

        Permanent failures (the message was refused) count against the message and the mailbox goes on;
        so do a connection dropped in one message's delivery and a catch-all recipient that cannot take mail
        (``_not_the_destination``); anything else means the destination is not usable now: the poll stops
        delivering.
        """
        return self._call_destination_for(
            [fetched], action, counted=counted, pending=pending, mailbox=mailbox
        )

    def _call_destination_for(
        self,
        messages: Sequence[FetchedMessage],
        action: Callable[[DestinationSession], _T],
        *,
        counted: bool,
        pending: bool,
        mailbox: str | None = None,
    ) -> _T | None:
        """As ``_call_destination`` for an action on several messages: a failure is each one's."""
        try:
            result = action(self.destinations.get(mailbox))
        except DestinationRejectedError as exc:
            # Refused; the destination itself is fine: go on with the next message.
            final = isinstance(exc, DestinationTooLargeError)
            for fetched in messages:
                self._message_failed(
                    fetched, exc, counted=counted, pending=pending, final=final, mailbox=mailbox
                )
            return None
        except DestinationError as exc:
            if self._not_the_destination(messages, exc, delivering=counted, pending=pending, mailbox=mailbox):
                return None
            # Full, unreachable, TLS or login trouble: not the message's fault, and no use trying more.
            for fetched in messages:
                self._message_failed(fetched, exc, counted=False, pending=pending, mailbox=mailbox)
            self._close_destination()
            raise _DestinationDown from exc
        except LedgerError:
            raise
        except Exception as exc:  # a bug or an unexpected driver error: quarantine-count it, go on
            uidls = ", ".join(fetched.uidl for fetched in messages)
            log.exception("account %s: unexpected error delivering message %s", self.account.name, uidls)
            for fetched in messages:
                self._message_failed(fetched, exc, counted=counted, pending=pending, mailbox=mailbox)
            self._close_destination()
            return None
        if counted and result:  # a delivery: the destination takes mail (see connector/policies/blame.py)
            for uidl, error in self.drops.took(mailbox):
                self._charge_drop(uidl, error)
        return result

    def _not_the_destination(
        self,
        messages: Sequence[FetchedMessage],
        exc: DestinationError,
        *,
        delivering: bool,
        pending: bool,
        mailbox: str | None,
    ) -> bool:
        """Handle a failure that is one recipient mailbox's or one message's (connector/policies/blame.py);
        True when it was and the poll goes on, False when it is the destination's."""
        fault = blame(
            exc,
            in_session=self.destinations.opened(mailbox) is not None,
            delivering_one=delivering and len(messages) == 1,
            routed=mailbox is not None,
        )
        if fault is Blame.DESTINATION:
            return False
        [fetched] = messages
        charge = False
        if fault is Blame.MESSAGE:
            verdict = self.drops.dropped(mailbox, fetched.uidl, exc.message)
            if verdict is Verdict.DOWN and mailbox is None:
                return False  # the account's own destination drops whatever it is sent: as if it were down
            self.destinations.discard(mailbox)  # the connection is gone; the next delivery opens another
            charge = verdict is Verdict.COUNT
            if verdict is Verdict.DOWN:  # a recipient's mailbox that drops whatever it is sent
                fault = Blame.RECIPIENT
        if fault is Blame.RECIPIENT:
            assert mailbox is not None
            self.destinations.hold(mailbox)
        # A drop still fails the poll (the destination hung up, the account backs off a little), but nothing
        # confined to one catch-all recipient does: one mailbox must not back off or suspend a whole domain.
        failed = fault is Blame.MESSAGE and mailbox is None
        self._message_failed(fetched, exc, counted=False, pending=pending, mailbox=mailbox, fails_poll=failed)
        if charge:
            self._charge_drop(fetched.uidl, exc.message)
        return True

    def _charge_drop(self, uidl: str, error: str) -> None:
        """Count the attempt that a dropped connection was given back: the destination took other mail."""
        reason = (
            f"the destination dropped the connection while this message was being delivered, and took other "
            f"messages in the same poll (counted as a failed attempt): {error}"
        )
        state = self.ledger.count_failed_attempt(
            self.account_id, uidl, reason, max_attempts=self.account.retry.max_attempts
        )
        if state is MessageState.FAILED:
            self.result.quarantined += 1
            self._problem(
                f"message {uidl!r}: quarantined after {self.account.retry.max_attempts} attempts: {reason}"
            )

    def _message_failed(
        self,
        fetched: FetchedMessage,
        exc: BaseException,
        *,
        counted: bool,
        pending: bool,
        final: bool = False,
        mailbox: str | None = None,
        fails_poll: bool = True,
    ) -> None:
        # The error may already name the message (ConnectorError.__str__); the problem line adds it once.
        text = (exc.message if isinstance(exc, ConnectorError) else str(exc)) or exc.__class__.__name__
        if pending and final:
            self.ledger.record_quarantined(self.account_id, fetched.uidl, text)
            self.result.quarantined += 1
        elif pending:
            state = self.ledger.record_failure(
                self.account_id,
                fetched.uidl,
                text,
                counted=counted,
                max_attempts=self.account.retry.max_attempts,
            )
            if state is MessageState.FAILED:
                self.result.quarantined += 1
        self.result.failed += 1
        if fails_poll and isinstance(exc, ConnectorError) and not isinstance(exc, DestinationRejectedError):
            self.result.status = "auth_error" if isinstance(exc, AuthenticationError) else "error"
            self.result.error = self.result.error or text
        recipient = f" for {mailbox}" if mailbox is not None else ""
        self._problem(f"message {fetched.uidl!r}{recipient}: {text}")

    def _close_destination(self) -> None:
        self.destinations.close_all()

    # --- deletion and bookkeeping --------------------------------------------------------------------

    def _dele(self, info: MessageInfo) -> None:
        # Queued, not sent: the connection may be busy fetching. Sent (pipelined) before QUIT.
        self.dele_queue.add(info)

    def _send_deles(self) -> None:
        # An idle poll or one that keeps its mail flushes nothing here: its deferred writes commit with the
        # poll's result, one commit (one fsync) fewer.
        infos = self.dele_queue.release()
        if not infos:
            return
        assert self.pop is not None
        self.pop.dele_many([info.number for info in infos])
        self.to_delete.extend(info.uidl for info in infos)

    def _fail(self, exc: ConnectorError) -> None:
        if exc.account is None:
            exc.account = self.account.name
        self.result.status = "auth_error" if isinstance(exc, AuthenticationError) else "error"
        if isinstance(exc, LeaseLostError):
            self.result.status = "lease_lost"
        self.result.error = str(exc)
        if isinstance(exc, SourceLoginDelayError) and exc.login_delay:
            self.server_delay = timedelta(seconds=exc.login_delay)
        if isinstance(exc, SourceReplyTooLongError) and exc.uidl is not None and self.account_id:
            self._quarantine_runaway(exc, exc.uidl)
        log.error("%s", exc)

    def _quarantine_runaway(self, exc: SourceReplyTooLongError, uidl: str) -> None:
        """The session is lost, but the next poll must get past this message instead of failing on it
        for ever: quarantine it (it stays on the server; `quarantine retry` after a fix)."""
        reason = f"the server sent far more than the {exc.pop_size} bytes LIST gave: {exc.message}"
        try:
            self._quarantine_unfetched(uidl, exc.pop_size, reason)
        except LedgerError as ledger_exc:
            log.error("account %s: %s", self.account.name, ledger_exc)

    def _problem(self, text: str) -> None:
        self.result.problems.append(text)
        log.warning("account %s: %s", self.account.name, text)

    def _finish(self) -> None:
        now = self.engine.clock()
        failures = 0
        if self.result.status == "lease_lost":
            # The poll that took the account over records the result: this one writes nothing more.
            self.result.next_poll_at = now + self.account.poll_interval
            return
        if self.result.ok:
            delay = success_delay(
                self.account.poll_interval, self.account.poll_jitter, server_delay=self.server_delay
            )
        else:
            failures = self.ledger.consecutive_failures(self.account_id) + 1 if self.account_id else 1
            delay = failure_delay(
                self.account.retry,
                failures,
                auth_failure=self.result.status == "auth_error",
                server_delay=self.server_delay,
            )
        self.result.next_poll_at = now + delay
        if not self.account_id:
            return
        outcome = PollOutcome(
            result=self.result.status,
            error=self.result.error,
            delivered=self.result.delivered + self.result.recovered,
            failed=self.result.failed,
            deleted=self.result.deleted,
            next_poll_at=self.result.next_poll_at,
        )
        try:
            if self.lease is not None:
                # The lease is released in the same transaction as the result.
                self.lease.end_with(partial(self.ledger.poll_finished, self.account_id, outcome))
            else:
                self.ledger.poll_finished(self.account_id, outcome)
            if should_suspend(self.account.retry, failures):
                self._suspend(failures)
        except LedgerError as exc:
            log.error("account %s: %s", self.account.name, exc)

    def _suspend(self, failures: int) -> None:
        reason = f"{failures} consecutive failed polls, the last: {self.result.error or self.result.status}"
        self.ledger.suspend(self.account_id, reason)
        log.error(
            "account %s: suspended after %s; run `pop-connector resume %s` once the cause is fixed",
            self.account.name,
            reason,
            self.account.name,
        )
