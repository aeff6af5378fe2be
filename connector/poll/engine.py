"""The sync engine: one poll of one account, as the order of its phases.

    lease + suspension -> connect -> listing.py (UIDL, identities, the plan) -> delivery.py (RETR ->
    record ``pending`` -> deliver -> record ``delivered``, per message, by single.py, batched.py or routed.py)
    -> the DELEs the plan and the retention allow (deletions.py, only after the ledger committed the
    deliveries) -> QUIT -> record ``deleted`` for what the server confirmed -> the poll's result.

Crash safety comes from that order: a message is DELEted only after its delivery is committed, and the
POP3 server only deletes after QUIT; a ``pending`` row found by a later poll means "maybe delivered", so
the destination is searched before delivering again. docs/architecture.md follows one message through.

What the poll does is reported as events (events.py) to the engine's observers; the ledger writes per
message, the result's counts and those events come from one place, the ``Recorder`` (recorder.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import partial

from connector.config import Account, Config
from connector.connections import Connections
from connector.destinations.base import DestinationSession
from connector.errors import (
    AuthenticationError,
    ConnectorError,
    LedgerError,
    SourceInUseError,
    SourceLoginDelayError,
    SourceReplyTooLongError,
)
from connector.ledger.lease import LeaseBusyError, LeaseLostError, PollLease
from connector.ledger.records import AccountState, Clock, PollOutcome, utcnow
from connector.ledger.store import Ledger
from connector.ops.logs import log_context
from connector.ops.poll_log import PollLog
from connector.ops.protocol_log import recording
from connector.policies.failures import backoff
from connector.policies.lease import LeaseHeld, LeaseRecord
from connector.policies.retry import failure_delay, should_suspend, success_delay
from connector.policies.server_limits import deletes_retrieved, login_delay, retention_conflict
from connector.poll.deletions import Deletions
from connector.poll.delivery import DeliveryPhase
from connector.poll.destination import DestinationPool, Destinations
from connector.poll.events import Deleted, Finished, Observers, Planned, PollObserver, Started
from connector.poll.listing import Listing
from connector.poll.recorder import Recorder
from connector.poll.result import PollResult
from connector.pop3 import Pop3Client

log = logging.getLogger("connector.poll.engine")

# Seconds before one more login after ``[IN-USE]``. A poll takes its lease only with its first write, so
# another process's poll of this account may be logged in without a trace in the ledger; an idle one is
# over within moments, and this pause outlasts it. A lock still held then is a temporary failure.
IN_USE_RETRY_AFTER = 2.0


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
            self.observers.emit(Finished(account.name, result, time.monotonic() - started, run.planned))
            return result


class _Poll:
    """One poll of one account: the phases in order, and the poll's outcome (``result``)."""

    def __init__(self, engine: SyncEngine, account: Account, stop: threading.Event) -> None:
        self.engine = engine
        self.ledger = engine.ledger
        self.account = account
        self.stop = stop
        self.result = PollResult(account=account.name)
        # Messages the plan fetches and delivers; None until the plan is made (see events.Finished).
        self.planned: int | None = None
        # LOGIN-DELAY: the next poll must not come sooner than this.
        self.server_delay: timedelta | None = None
        # One poll per account across processes: every ledger write of this poll is fenced by it.
        self.lease: PollLease | None = None

    def run(self) -> PollResult:
        try:
            return self._run()
        finally:
            if self.lease is not None:  # however the poll ended: stop renewing; release unless done
                self.lease.close()

    def _run(self) -> PollResult:
        # One read: the account, its failure count and its lease row. An idle poll then writes once, its
        # result, which also takes and releases the lease (connector/ledger/lease.py).
        account_id, failures = 0, 0
        try:
            state = self.ledger.poll_start(self.account.name)
            if state is None:  # the account's first poll
                state = AccountState(None, None, self.ledger.account_id(self.account.name) or 0)
            account_id, failures = state.account_id, state.failures
            if self._suspended(account_id, state) or not self._leased(account_id, state):
                return self.result
            self.ledger.poll_started(account_id, defer=True)  # committed with the poll's first write
            self._session(account_id, state.identity_note, state.lease)
        except ConnectorError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug must cost one account's poll, not the whole run
            log.exception("account %s: internal error during the poll", self.account.name)
            self._fail(ConnectorError(f"internal error: {exc.__class__.__name__}: {exc}"))
        self._finish(account_id, failures)  # releases the lease in the transaction of the poll's result
        return self.result

    def dry_run(self) -> PollResult:
        try:
            account_id = self.ledger.account_id(self.account.name, create=False) or 0
            with self.engine.connections.open_source(self.account) as pop:
                self.result.plan = Listing(self.ledger, self.account, account_id, self.engine.clock).dry_plan(
                    pop
                )
        except ConnectorError as exc:
            self._fail(exc)
        return self.result

    def _suspended(self, account_id: int, state: AccountState) -> bool:
        """A suspended account is not polled at all; it is looked at again after ``poll_interval`` so
        that the service notices ``pop-connector resume``."""
        if state.suspension is None:
            return False
        since, reason = state.suspension
        self.result.status = "suspended"
        self.result.error = (
            f"suspended since {since.isoformat(timespec='seconds')}: {reason}; "
            f"run `pop-connector resume {self.account.name}` once the cause is fixed"
        )
        self.result.next_poll_at = self.engine.clock() + self.account.poll_interval
        self.ledger.set_next_poll(account_id, self.result.next_poll_at)
        return True

    def _leased(self, account_id: int, state: AccountState) -> bool:
        """The account's lease, taken by the poll's first write; False (status ``busy``, not a failure)
        when another poll holds it: this one is skipped and tried again after ``poll_interval``. Another
        poll that takes it before this one's first write makes that write fail the same way."""
        ttl = self.engine.config.service.lease_ttl
        taken = self.ledger.leases.reserve_for_poll(account_id, self.account.name, ttl, state.lease)
        if isinstance(taken, LeaseHeld):
            self._busy(taken.describe(self.account.name))
            return False
        self.lease = taken
        return True

    def _busy(self, reason: str) -> None:
        self.result.status = "busy"
        self.result.error = reason
        self.result.next_poll_at = self.engine.clock() + self.account.poll_interval
        log.warning("%s", reason)

    def _session(self, account_id: int, identity_note: str | None, seen: LeaseRecord | None) -> None:
        engine, account = self.engine, self.account
        deletions = Deletions(account, partial(self.ledger.flush, account_id), engine.clock)
        recorder = Recorder(
            self.ledger, account, account_id, self.result, engine.observers, deletions, engine.clock()
        )
        pop = self._open_source(account_id, seen)
        self.server_delay = login_delay(pop.capabilities)
        conflict = retention_conflict(pop.capabilities, account.retention)
        if conflict is not None:
            log.warning("account %s: %s", account.name, conflict)
        destinations = Destinations(DestinationPool(self._open_destination), recorder)
        try:
            plan, doubtful = Listing(self.ledger, account, account_id, engine.clock).plan(
                pop, recorder, identity_note
            )
            self.planned = len(plan.deliver)
            size = sum(delivery.info.size for delivery in plan.deliver)
            engine.observers.emit(Planned(account.name, self.planned, size, len(plan.delete)))
            phase = DeliveryPhase(
                account, recorder, destinations, deletions, engine.observers, self.stop, doubtful=doubtful
            )
            phase.deliver_all(pop, plan.deliver)
            for info in plan.delete:
                deletions.dele(info)
            deletions.send(pop)
            if deletions.sent and self.lease is not None:
                self.lease.confirm()  # QUIT carries the DELEs out: only while this poll holds the account
        except BaseException as exc:
            destinations.close()
            if isinstance(exc, LeaseLostError):
                pop.close()  # another poll has the account: no DELE, no QUIT, so the server deletes nothing
                raise
            # Queued DELEs go out only once the deliveries they follow are committed (a failed flush drops
            # them), so letting QUIT apply them is safe.
            if isinstance(exc, Exception) and pop.usable:
                with contextlib.suppress(ConnectorError):
                    deletions.send(pop)
            if isinstance(exc, SourceReplyTooLongError) and exc.uidl is not None:
                _quarantine_runaway(recorder, exc, exc.uidl)
            _end_session(pop, deletions, recorder, clean=False)
            raise
        destinations.close()
        if _end_session(pop, deletions, recorder, clean=True) and deletions.sent:
            # Only now has the server removed them (RFC 1939 §6).
            self.ledger.record_deleted(account_id, deletions.sent)
            self.result.deleted = len(deletions.sent)
            engine.observers.emit(Deleted(account.name, tuple(deletions.sent)))

    def _open_source(self, account_id: int, seen: LeaseRecord | None) -> Pop3Client:
        """The logged-in POP3 session; after ``[IN-USE]``, one more try once ``IN_USE_RETRY_AFTER`` has
        passed, unless a poll of another process has taken the account's lease meanwhile (this poll is
        then ``busy``, not failed: the other one polls the account)."""
        try:
            return self.engine.connections.open_source(self.account)
        except SourceInUseError as exc:
            log.info(
                "account %s: %s; logging in once more in %.0f s",
                self.account.name,
                exc.message,
                IN_USE_RETRY_AFTER,
            )
            if self.stop.wait(IN_USE_RETRY_AFTER):
                raise
            if account_id and self.ledger.leases.current(account_id) != seen:
                raise LeaseBusyError(
                    f"account {self.account.name}: the maildrop was locked ({exc.message}) and another "
                    "process's poll has taken the account since; skipped, as busy"
                ) from exc
            return self.engine.connections.open_source(self.account)

    def _open_destination(self, mailbox: str | None) -> DestinationSession:
        """The account's own destination session, or (catch-all) one into a recipient's ``mailbox``."""
        connections, destination = self.engine.connections, self.engine.config.destination_for(self.account)
        if mailbox is None:
            return connections.open_destination(destination, self.account)
        return connections.open_recipient(destination, self.account, mailbox)

    def _fail(self, exc: ConnectorError) -> None:
        if isinstance(exc, LeaseBusyError):  # it wrote nothing: skipped, as if busy at its start
            self._busy(exc.message)
            return
        if exc.account is None:
            exc.account = self.account.name
        self.result.status = "auth_error" if isinstance(exc, AuthenticationError) else "error"
        if isinstance(exc, LeaseLostError):
            self.result.status = "lease_lost"
        self.result.error = str(exc)
        self.result.backoff = backoff(exc)
        if isinstance(exc, SourceLoginDelayError) and exc.login_delay:
            self.server_delay = timedelta(seconds=exc.login_delay)
        log.error("%s", exc)

    def _finish(self, account_id: int, failed_before: int) -> None:
        """The next poll's time and the poll's result in the ledger (with the lease's release).
        ``failed_before``: the account's consecutive failed polls, read at the start (only a poll holding
        the lease changes it, and the write below fails if another poll took it meanwhile)."""
        result, account = self.result, self.account
        now = self.engine.clock()
        if result.status in ("lease_lost", "busy"):
            # The poll that holds the account records the result: this one writes nothing (more), and
            # what it deferred goes too, so that no later poll of this process applies it late (a lost
            # "delivered" record is safe: the row stays ``pending``).
            result.next_poll_at = result.next_poll_at or now + account.poll_interval
            if account_id:
                self.ledger.discard_deferred(account_id)
            return
        failures = 0
        if result.ok:
            delay = success_delay(account.poll_interval, account.poll_jitter, server_delay=self.server_delay)
        else:
            failures = failed_before + 1
            delay = failure_delay(
                account.retry, failures, backoff=result.backoff, server_delay=self.server_delay
            )
        result.next_poll_at = now + delay
        if not account_id:
            return
        outcome = PollOutcome(
            result=result.status,
            error=result.error,
            delivered=result.delivered + result.recovered,
            failed=result.failed,
            deleted=result.deleted,
            next_poll_at=result.next_poll_at,
            quarantined=result.quarantined,
            listed=result.listed,
            # Pruned by polls that journal something: an idle poll pays no query for it.
            journal_before=journal_before(self.engine.config.service.journal_retention, now)
            if result.delivered + result.recovered
            else None,
        )
        try:
            if self.lease is not None:
                # The lease is released in the same transaction as the result.
                self.lease.end_with(partial(self.ledger.poll_finished, account_id, outcome))
            else:
                self.ledger.poll_finished(account_id, outcome)
            if should_suspend(account.retry, failures):
                reason = f"{failures} consecutive failed polls, the last: {result.error or result.status}"
                self.ledger.suspensions.suspend(account_id, reason)
                log.error(
                    "account %s: suspended after %s; run `pop-connector resume %s` once the cause is fixed",
                    account.name, reason, account.name,
                )  # fmt: skip
        except LeaseBusyError as exc:  # taken by another poll since this one's start: it wrote nothing
            self._busy(exc.message)
        except LedgerError as exc:
            log.error("account %s: %s", account.name, exc)


def journal_before(retention: timedelta, now: datetime) -> datetime | None:
    """Journal rows older than this are pruned (None: ``journal_retention = 0``, kept for ever)."""
    return now - retention if retention > timedelta(0) else None


def _end_session(pop: Pop3Client, deletions: Deletions, recorder: Recorder, *, clean: bool) -> bool:
    """QUIT, which carries out the DELEs (all of them follow committed deliveries, so this is safe even
    after an error), unless QUIT would also remove undelivered mail. True when QUIT confirmed the DELEs;
    a session that sent none does not wait for QUIT's reply."""
    if deletions.undelivered and deletes_retrieved(pop.capabilities):
        pop.close()
        recorder.problem(
            f"the server deletes every retrieved message at QUIT (CAPA EXPIRE 0): ended the session "
            f"without QUIT so that {deletions.undelivered} undelivered message(s) stay on it; "
            "deletions of delivered ones are repeated at the next poll"
        )
        return False
    if not clean:
        try:
            pop.quit()
        except Exception:
            pop.close()
        return False
    if not deletions.sent:
        # Nothing is at stake in the reply: no deletion to confirm, nothing recorded from it.
        pop.quit_unawaited()
        return False
    pop.quit()
    return True


def _quarantine_runaway(recorder: Recorder, exc: SourceReplyTooLongError, uidl: str) -> None:
    """The session is lost, but the next poll must get past this message instead of failing on it for
    ever: quarantine it (it stays on the server; `quarantine retry` after a fix)."""
    reason = f"the server sent far more than the {exc.pop_size} bytes LIST gave: {exc.message}"
    try:
        recorder.quarantine_unfetched(uidl, exc.pop_size, reason)
    except LedgerError as ledger_exc:
        log.error("account %s: %s", recorder.account.name, ledger_exc)
