"""The sync engine: one poll of one account.

connect -> UIDL+LIST -> plan (server minus ledger) -> for each message, oldest first:
RETR -> record ``pending`` (commit) -> deliver -> record ``delivered`` (commit) -> DELE if retention says
so -> ... -> QUIT -> record ``deleted`` for what the server confirmed.

Crash safety comes from that order: a message is DELEted only after its delivery is committed, and the
POP3 server only deletes after QUIT; a ``pending`` row found by a later poll means "maybe delivered", so
the destination is searched (Message-ID, size, SHA-256) before delivering again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from connector.config import Account, Config
from connector.connections import Connections
from connector.destinations.base import DestinationSession
from connector.errors import (
    AuthenticationError,
    ConnectorError,
    DestinationError,
    LedgerError,
    PermanentError,
)
from connector.ledger.models import MessageState
from connector.ledger.store import Clock, Ledger, PollOutcome, utcnow
from connector.message import FetchedMessage, MessageSpool, fallback_message_id
from connector.pipeline import Fetched, Prefetcher, plan_from_server
from connector.plan import PollPlan, plan_poll
from connector.policies.retention import should_delete
from connector.policies.retry import account_backoff, jittered_interval
from connector.pop3 import MessageInfo, Pop3Client

log = logging.getLogger("connector.engine")


@dataclass
class PollResult:
    account: str
    status: str = "ok"  # ok | error | auth_error | stopped
    error: str | None = None
    delivered: int = 0
    recovered: int = 0
    failed: int = 0
    quarantined: int = 0
    deleted: int = 0
    skipped: int = 0
    next_poll_at: datetime | None = None
    plan: PollPlan | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "stopped")


_DestinationAction = Callable[[DestinationSession], "str | None"]


def _quit_quietly(pop: Pop3Client) -> None:
    try:
        pop.quit()
    except Exception:
        pop.close()


class _DestinationDown(Exception):
    """The destination cannot take more mail in this poll; the POP3 session still ends cleanly."""


class SyncEngine:
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        connections: Connections | None = None,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.connections = connections or Connections()
        self.clock = clock

    def poll(
        self, account: Account, *, dry_run: bool = False, stop: threading.Event | None = None
    ) -> PollResult:
        run = _Poll(self, account, stop or threading.Event())
        return run.dry_run() if dry_run else run.run()


class _Poll:
    """The state of one poll; methods are the steps."""

    def __init__(self, engine: SyncEngine, account: Account, stop: threading.Event) -> None:
        self.engine = engine
        self.ledger = engine.ledger
        self.account = account
        self.stop = stop
        self.result = PollResult(account=account.name)
        self.destination: DestinationSession | None = None
        self.to_delete: list[str] = []
        self.dele_queue: list[MessageInfo] = []
        self.account_id = 0
        self.pop: Pop3Client | None = None

    # --- whole poll ----------------------------------------------------------------------------------

    def run(self) -> PollResult:
        try:
            account_id = self.ledger.account_id(self.account.name)
            assert account_id is not None
            self.account_id = account_id
            self.ledger.poll_started(account_id, defer=True)  # committed with the poll's first write
            self._session()
        except ConnectorError as exc:
            self._fail(exc)
        self._finish()
        return self.result

    def dry_run(self) -> PollResult:
        try:
            account_id = self.ledger.account_id(self.account.name, create=False)
            with self.engine.connections.open_source(self.account) as pop:
                listing = pop.listing()
                known = self.ledger.known_messages(account_id) if account_id is not None else {}
                self.result.plan = plan_poll(listing, known, self.account.retention, self.engine.clock())
        except ConnectorError as exc:
            self._fail(exc)
        return self.result

    def _session(self) -> None:
        pop = self.pop = self.engine.connections.open_source(self.account)
        try:
            plan = self._plan(pop)
            self._deliver_all(pop, plan)
            for info in plan.delete:
                self._dele(info)
            self._send_deles()
        except BaseException as exc:
            # Queued DELEs follow recorded deliveries, so letting QUIT apply them is safe.
            if isinstance(exc, Exception) and pop.usable:
                with contextlib.suppress(ConnectorError):
                    self._send_deles()
            _quit_quietly(pop)
            self._close_destination()
            raise
        self._close_destination()
        pop.quit()
        # Only now has the server removed them (RFC 1939 §6).
        self.ledger.record_deleted(self.account_id, self.to_delete)
        self.result.deleted = len(self.to_delete)

    def _plan(self, pop: Pop3Client) -> PollPlan:
        known = self.ledger.known_messages(self.account_id)
        listing, plan = plan_from_server(pop, known, self.account.retention, self.engine.clock())
        if plan.gone:
            self.ledger.prune(self.account_id, plan.gone)
        for uidl in plan.duplicates:
            self._problem(f"UIDL {uidl!r} is listed more than once by the server; left on the server")
        log.info(
            "account %s: %d on server, %d to deliver (%d new), %d to delete, %d quarantined",
            self.account.name,
            len(listing),
            len(plan.deliver),
            plan.new_count,
            len(plan.delete),
            plan.quarantined,
        )
        return plan

    def _deliver_all(self, pop: Pop3Client, plan: PollPlan) -> None:
        if not plan.deliver:
            return
        # The next messages are fetched while this thread records and delivers (see pipeline.py).
        with Prefetcher(pop, plan.deliver, self._spool) as fetched_messages:
            for fetched in fetched_messages:
                with fetched:
                    if self.stop.is_set():
                        self.result.status = "stopped"
                        log.info(
                            "account %s: stop requested; ending the poll after the current message",
                            self.account.name,
                        )
                        return
                    try:
                        self._deliver_one(fetched)
                    except _DestinationDown:
                        return

    # --- one message ---------------------------------------------------------------------------------

    def _deliver_one(self, item: Fetched) -> None:
        info, delivery = item.delivery.info, item.delivery
        if item.message is None:
            assert item.error is not None
            self.result.skipped += 1
            self._problem(f"message {info.uidl!r}: cannot retrieve it: {item.error.message}")
            return
        fetched = item.message
        if delivery.recover and self._recovered(fetched, info, delivery.attempts):
            return
        self._deliver_new(fetched, info)

    def _spool(self, info: MessageInfo) -> MessageSpool:
        fallback = fallback_message_id(self.account.name, self.account.host, self.account.username, info.uidl)
        return MessageSpool(info.uidl, fallback)

    def _recovered(self, fetched: FetchedMessage, info: MessageInfo, attempts: int) -> bool:
        """A previous attempt may have reached the destination: look before delivering again."""
        ref = self._call_destination(fetched, lambda dest: dest.find(fetched), counted=False, pending=False)
        if ref is not None:
            log.info(
                "account %s: message %s was already delivered (%s); recorded it",
                self.account.name,
                info.uidl,
                ref,
            )
            self._delivered(info, ref)
            self.result.recovered += 1
            return True
        if attempts >= self.account.retry.max_attempts:
            reason = f"gave up after {attempts} attempts; the last one did not finish"
            self.ledger.record_quarantined(self.account_id, info.uidl, reason)
            self.result.quarantined += 1
            self._problem(f"message {info.uidl!r}: quarantined: {reason}")
            return True
        return False

    def _deliver_new(self, fetched: FetchedMessage, info: MessageInfo) -> None:
        self.ledger.record_pending(
            self.account_id,
            info.uidl,
            pop_size=info.size,
            size=fetched.size,
            message_id=fetched.message_id,
            sha256=fetched.sha256,
        )
        ref = self._call_destination(fetched, lambda dest: dest.deliver(fetched), counted=True, pending=True)
        if ref is None:
            return
        self._delivered(info, ref)
        self.result.delivered += 1
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
        # Retention for the messages delivered now is applied in the same session: the DELE is safe
        # because the delivery is already committed, and it only takes effect at QUIT.
        if should_delete(self.account.retention, delivered_at, self.engine.clock()):
            self._dele(info)

    # --- destination ---------------------------------------------------------------------------------

    def _open_destination(self) -> DestinationSession:
        if self.destination is None:
            destination = self.engine.config.destination_for(self.account)
            self.destination = self.engine.connections.open_destination(destination, self.account)
        return self.destination

    def _call_destination(
        self,
        fetched: FetchedMessage,
        action: _DestinationAction,
        *,
        counted: bool,
        pending: bool,
    ) -> str | None:
        """Run ``action`` against the destination, translating failures into ledger state.

        Permanent failures (the message was refused) count against the message and the mailbox goes on;
        anything else means the destination is not usable now: the poll stops delivering.
        """
        try:
            return action(self._open_destination())
        except (PermanentError, DestinationError) as exc:
            permanent = isinstance(exc, PermanentError) and not isinstance(exc, AuthenticationError)
            self._message_failed(fetched, exc, counted=counted and permanent, pending=pending)
            if permanent and self.destination is not None:
                return None
            self._close_destination()
            raise _DestinationDown from exc
        except LedgerError:
            raise
        except Exception as exc:  # a bug or an unexpected driver error: quarantine-count it, go on
            log.exception(
                "account %s: unexpected error delivering message %s", self.account.name, fetched.uidl
            )
            self._message_failed(fetched, exc, counted=counted, pending=pending)
            self._close_destination()
            return None

    def _message_failed(
        self, fetched: FetchedMessage, exc: BaseException, *, counted: bool, pending: bool
    ) -> None:
        text = str(exc) or exc.__class__.__name__
        if pending:
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
        if isinstance(exc, ConnectorError) and not isinstance(exc, PermanentError):
            self.result.status = "auth_error" if isinstance(exc, AuthenticationError) else "error"
            self.result.error = self.result.error or text
        self._problem(f"message {fetched.uidl!r}: {text}")

    def _close_destination(self) -> None:
        if self.destination is not None:
            destination, self.destination = self.destination, None
            try:
                destination.close()
            except Exception:  # closing a broken connection must not hide the poll's real result
                log.debug("account %s: error closing destination", self.account.name, exc_info=True)

    # --- deletion and bookkeeping --------------------------------------------------------------------

    def _dele(self, info: MessageInfo) -> None:
        # Queued, not sent: the connection may be busy fetching. Sent (pipelined) before QUIT.
        self.dele_queue.append(info)

    def _send_deles(self) -> None:
        self.ledger.flush(self.account_id)
        infos, self.dele_queue = self.dele_queue, []
        if infos:
            assert self.pop is not None
            self.pop.dele_many([info.number for info in infos])
            self.to_delete.extend(info.uidl for info in infos)

    def _fail(self, exc: ConnectorError) -> None:
        if exc.account is None:
            exc.account = self.account.name
        self.result.status = "auth_error" if isinstance(exc, AuthenticationError) else "error"
        self.result.error = str(exc)
        log.error("%s", exc)

    def _problem(self, text: str) -> None:
        self.result.problems.append(text)
        log.warning("account %s: %s", self.account.name, text)

    def _finish(self) -> None:
        now = self.engine.clock()
        if self.result.ok:
            delay = jittered_interval(self.account.poll_interval, self.account.poll_jitter)
        else:
            failures = self.ledger.consecutive_failures(self.account_id) + 1 if self.account_id else 1
            delay = account_backoff(self.account.retry, failures)
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
            self.ledger.poll_finished(self.account_id, outcome)
        except LedgerError as exc:
            log.error("account %s: %s", self.account.name, exc)
