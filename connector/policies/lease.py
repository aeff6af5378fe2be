"""The poll lease: who may poll an account now. Pure rules; the ledger (connector/ledger/lease.py) applies
them inside one write transaction.

One row per account holds the current (or last) lease: its holder, the host and process it runs in, when
it was taken and until when it holds. A poll takes it when there is none or the last one has expired, and
each take increases the ``generation``: the fencing token. Every ledger write of the poll checks, in the
same transaction, that the row still carries its generation and holder; a poll whose lease was taken over
(it stalled for longer than the lease's time to live) finds another generation there and stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# The poll renews its lease this often (as a fraction of its time to live): two renewals may fail (a
# database briefly out of reach) before another process may take the account over.
RENEW_FRACTION = 1 / 3


@dataclass(frozen=True)
class LeaseRecord:
    """The lease row of one account as the ledger keeps it."""

    account_id: int
    generation: int
    holder: str
    host: str
    pid: int
    acquired_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Claimant:
    """Who asks for a lease: ``holder`` is unique to one poll (host:pid:random)."""

    holder: str
    host: str
    pid: int


@dataclass(frozen=True)
class LeaseHeld:
    """The account is being polled by someone else: what to tell the person who asked."""

    holder: str
    host: str
    pid: int
    since: datetime
    expires_at: datetime

    def describe(self, account: str) -> str:
        since = self.since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (
            f"account {account} is being polled by PID {self.pid} on host {self.host} since {since}; skipped"
        )


def holder_name(host: str, pid: int, token: str) -> str:
    """The holder of one poll: the host and process, and a random part so that two polls of one process
    (one after the other) are told apart."""
    return f"{host}:{pid}:{token}"


def expired(record: LeaseRecord, now: datetime) -> bool:
    """An expired lease belongs to nobody: its holder died, or stalled for longer than its time to live."""
    return record.expires_at <= now


def take(
    current: LeaseRecord | None,
    account_id: int,
    claimant: Claimant,
    now: datetime,
    ttl: timedelta,
    *,
    holder_gone: bool = False,
) -> LeaseRecord | LeaseHeld:
    """The lease ``claimant`` gets (the next generation), or who holds it when it has not expired.

    ``holder_gone``: the holder's process is known not to exist any more (it ran on this host and its
    PID is gone): its lease is over without waiting for the expiry. A lease is never taken twice by the
    same holder: each poll has a holder of its own, so a live lease is busy whoever asks."""
    if current is not None and not holder_gone and not expired(current, now):
        return LeaseHeld(current.holder, current.host, current.pid, current.acquired_at, current.expires_at)
    generation = (current.generation if current is not None else 0) + 1
    return LeaseRecord(account_id, generation, claimant.holder, claimant.host, claimant.pid, now, now + ttl)


def renewed_until(now: datetime, ttl: timedelta) -> datetime:
    """Where a renewal (any write of the poll, or the renewer's timer) moves the expiry."""
    return now + ttl


def renew_every(ttl: timedelta) -> timedelta:
    return ttl * RENEW_FRACTION
