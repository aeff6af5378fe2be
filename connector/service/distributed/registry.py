"""The accounts table as the distributed workers' shared registry: which accounts exist, which are due.

``sync_accounts`` writes the configuration into it (start-up and ``accounts sync-config``); the
dispatcher reads due accounts from it; a poll job claims its account here. Rows are never deleted: an
account that leaves the configuration keeps its ledger (deleting it would deliver its kept mail again if
it came back) and is only marked inactive.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, case, false, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from connector.config import Account
from connector.errors import LedgerError
from connector.ledger.models import AccountRow
from connector.ledger.records import utcnow
from connector.service.distributed.queue_schema import QUEUE_SCHEMA

log = logging.getLogger(__name__)

# Two-key advisory locks: this class id and the account's row id. Held by a poll for its whole length
# on a connection of its own, so that even a job wrongly declared stalled (a live worker whose heartbeat
# was late) cannot poll the account a second time: PostgreSQL frees the lock only when the holder's
# connection ends, which a SIGKILL does at once.
_POLL_LOCK_CLASS = 0x504F50


_POLL_LOCK_PREFIX = "poll:"


def poll_lock_name(account: str) -> str:
    """procrastinate's ``lock`` and ``queueing_lock`` of an account's poll jobs."""
    return _POLL_LOCK_PREFIX + account


@dataclass(frozen=True)
class SyncSummary:
    added: int
    active: int
    inactive: int


def sync_accounts(engine: Engine, accounts: Sequence[Account], *, now: datetime | None = None) -> SyncSummary:
    """Make the registry match the configuration: add new accounts, (de)activate the others."""
    wanted = {account.name: account.enabled for account in accounts}
    created_at = now or utcnow()
    try:
        with engine.begin() as connection:
            existing = list(connection.scalars(select(AccountRow.name)))
            known = set(existing)
            new = [name for name in wanted if name not in known]
            if new:
                # Workers starting together all sync: a row another one just added is no error.
                dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
                connection.execute(
                    dialect.insert(AccountRow).on_conflict_do_nothing(index_elements=["name"]),
                    [_new_row(name, wanted[name], created_at) for name in new],
                )
            # Accounts gone from the configuration become inactive; the others follow `enabled`.
            for active in (True, False):
                names = [name for name in existing if wanted.get(name, False) is active]
                for chunk in _chunks(names, 1000):
                    connection.execute(
                        update(AccountRow)
                        .where(AccountRow.name.in_(chunk), AccountRow.active.isnot(active))
                        .values(active=active)
                    )
            inactive = connection.scalar(
                select(func.count()).select_from(AccountRow).where(AccountRow.active.is_(False))
            )
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot write the accounts into the database: {exc}") from exc
    return SyncSummary(added=len(new), active=sum(wanted.values()), inactive=int(inactive or 0))


def _new_row(name: str, active: bool, created_at: datetime) -> dict[str, object]:
    return {
        "name": name,
        "created_at": created_at,
        "active": active,
        "consecutive_failures": 0,
        "last_delivered": 0,
        "last_failed": 0,
        "last_deleted": 0,
    }


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Accounts whose poll job is queued (todo) or running (doing) are left out, so a backlog does not
# re-queue them every tick; each condition matches one of procrastinate's partial unique indexes.
_NO_JOB = text(
    f"""NOT EXISTS (SELECT 1 FROM {QUEUE_SCHEMA}.procrastinate_jobs j
                    WHERE j.queueing_lock = :lock_prefix || accounts.name AND j.status = 'todo')
    AND NOT EXISTS (SELECT 1 FROM {QUEUE_SCHEMA}.procrastinate_jobs j
                    WHERE j.lock = :lock_prefix || accounts.name AND j.status = 'doing')"""
).bindparams(lock_prefix=_POLL_LOCK_PREFIX)


def due_accounts(engine: Engine, now: datetime) -> list[str]:
    """Active accounts whose next poll time has come (or that were never polled) and have no job."""
    query = (
        select(AccountRow.name)
        .where(
            AccountRow.active.is_(True),
            or_(AccountRow.next_poll_at.is_(None), AccountRow.next_poll_at <= now),
            _NO_JOB,
        )
        .order_by(AccountRow.next_poll_at.asc().nulls_first())
    )
    try:
        with engine.connect() as connection:
            return list(connection.scalars(query))
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read the due accounts: {exc}") from exc


# A running poll holds its job in "doing"; procrastinate's partial unique index on (lock) finds it.
_NOT_RUNNING = text(
    f"""NOT EXISTS (SELECT 1 FROM {QUEUE_SCHEMA}.procrastinate_jobs j
                    WHERE j.lock = :lock_prefix || accounts.name AND j.status = 'doing')"""
).bindparams(lock_prefix=_POLL_LOCK_PREFIX)


def _due_at() -> ColumnElement[datetime]:
    """When an account is due: its next poll time, or when it was added if it was never polled."""
    return func.coalesce(AccountRow.next_poll_at, AccountRow.created_at)


def count_overdue(engine: Engine, now: datetime, grace: timedelta) -> int:
    """Active accounts due more than ``grace`` before ``now`` whose poll has not started (a queued job
    still waiting counts: the workers are too few or stuck). The same figure on every worker."""
    query = (
        select(func.count())
        .select_from(AccountRow)
        .where(AccountRow.active.is_(True), _due_at() < now - grace, _NOT_RUNNING)
    )
    try:
        with engine.connect() as connection:
            return int(connection.scalar(query) or 0)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot count the overdue accounts: {exc}") from exc


@dataclass(frozen=True)
class Claim:
    """What a poll job learnt while claiming its account; ``reason`` says why it must not poll.
    ``due_at``: when the account was due (for the scheduling lag)."""

    account_id: int | None
    reason: str | None
    due_at: datetime | None = None


@contextmanager
def claimed(engine: Engine, account: str, worker: str, now: datetime) -> Iterator[Claim]:
    """Hold the account's poll lock for the ``with`` block when the account is still due and active.

    The due test is repeated under the lock: a job retried after a stall, or queued while a poll was
    running, finds the account polled already and steps aside.
    """
    try:
        connection = engine.connect()
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot claim account {account!r}: {exc}") from exc
    locked_id: int | None = None
    try:
        claim, locked_id = _claim(connection, account, worker, now)
        yield claim
    finally:
        _release(connection, locked_id)


def _claim(connection: Connection, account: str, worker: str, now: datetime) -> tuple[Claim, int | None]:
    # One transaction, one commit: every poll of every worker pays this, and commits are what the
    # database's disk limits. The lock is a session lock: it outlives the commit, held until _release.
    try:
        row = connection.execute(
            select(
                AccountRow.id,
                AccountRow.active,
                _due_at().label("due_at"),
                # CASE evaluates only its chosen branch: an inactive account is never locked.
                case(
                    (AccountRow.active, func.pg_try_advisory_lock(_POLL_LOCK_CLASS, AccountRow.id)),
                    else_=false(),
                ).label("locked"),
            ).where(AccountRow.name == account)
        ).first()
        if row is None or not row.locked:
            connection.commit()
            if row is None:
                return Claim(None, "not in the database (run `pop-connector accounts sync-config`)"), None
            if not row.active:
                return Claim(row.id, "no longer active in the configuration"), None
            return Claim(row.id, "another worker is polling it"), None
        # Under the lock, the due test again: a poll that ended just before we locked has moved it on.
        taken = connection.execute(
            update(AccountRow)
            .where(
                AccountRow.id == row.id,
                or_(AccountRow.next_poll_at.is_(None), AccountRow.next_poll_at <= now),
            )
            .values(last_worker=worker)
        ).rowcount
        connection.commit()
        if not taken:
            return Claim(row.id, "not due any more (polled meanwhile)"), row.id
        return Claim(row.id, None, row.due_at), row.id
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot claim account {account!r}: {exc}") from exc


def _release(connection: Connection, locked_id: int | None) -> None:
    try:
        if locked_id is not None:
            connection.execute(
                text("SELECT pg_advisory_unlock(:cls, :id)"), {"cls": _POLL_LOCK_CLASS, "id": locked_id}
            )
            connection.commit()
    except SQLAlchemyError:
        # A broken connection took its locks with it; it must not go back to the pool.
        log.debug("releasing a poll lock failed; discarding the connection", exc_info=True)
        connection.invalidate()
    finally:
        connection.close()
