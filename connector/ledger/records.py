"""The ledger's records: what it hands to the rest of the program and takes back from it, as plain values.

Pure (no database code), so that the poll's plan and the policies, which read them, import no SQLAlchemy:
``connector/ledger/store.py`` builds them from its rows.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from connector.policies.lease import LeaseRecord

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class MessageState(enum.StrEnum):
    """The state of a message's ledger row; how a row moves between them: ``connector/ledger/models.py``."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DELETED = "deleted"
    FAILED = "failed"
    # On the server before the account's baseline (start = "new", `pop-connector baseline`): never
    # fetched, never delivered, so never deleted by us either.
    SEEN = "seen"


class RecipientState(enum.StrEnum):
    """The state of one recipient's row of a catch-all message (``connector/ledger/recipients.py``)."""

    # The delivery into this mailbox started and may have reached it: look there before delivering again.
    PENDING = "pending"
    DELIVERED = "delivered"


class KnownMessage(NamedTuple):
    """What the ledger remembers of one UIDL, as the sync planner needs it (a tuple: cheap to build by
    the hundred thousand)."""

    uidl: str
    state: MessageState
    attempts: int
    delivered_at: datetime | None
    message_id: str | None
    size: int | None
    sha256: str | None
    headers_only: bool = False
    pop_size: int | None = None
    header_hash: str | None = None
    # Not in the server's listing since then, for this many polls in a row (policies.listing).
    missing_polls: int = 0
    missing_since: datetime | None = None


@dataclass(frozen=True)
class KnownMessages:
    """What the ledger knows of one account's messages, as a poll plans with it.

    ``kept`` names the delivered messages that the retention keeps at this poll: the plan has nothing to
    do with them but recognise them, so they come as UIDLs only, and a maildrop that keeps 100,000
    delivered messages costs no Python object per message (see ``Ledger.known_to_plan``). ``rows`` has
    every other message in full (kept ones missing from the listing too); with ``kept`` empty, it is
    everything the ledger knows.
    """

    rows: Mapping[str, KnownMessage] = field(default_factory=dict)
    kept: Set[str] = frozenset()
    # Every UIDL of ``rows`` and ``kept`` joined by line breaks, as the ledger read them (None: not read so):
    # a search for a marker in it spares joining 100,000 UIDLs again (policies.uidl.hashed_uidls).
    joined: str | None = field(default=None, compare=False, repr=False)

    def __contains__(self, uidl: object) -> bool:
        return uidl in self.kept or uidl in self.rows

    def __len__(self) -> int:
        return len(self.rows) + len(self.kept)

    def __iter__(self) -> Iterator[str]:
        """Every UIDL the ledger knows (``rows`` and ``kept`` never share one)."""
        return itertools.chain(self.rows, self.kept)


@dataclass(frozen=True)
class PendingMessage:
    """A fetched message about to be handed to the destination, as ``Ledger.record_pending`` records it."""

    uidl: str
    pop_size: int | None
    size: int
    message_id: str
    sha256: str
    headers_only: bool = False
    header_hash: str | None = None
    repairs: str | None = None


class AccountState(NamedTuple):
    """What a poll needs to know of its account row before it starts."""

    # (since, reason) when the account is suspended.
    suspension: tuple[datetime, str] | None
    identity_note: str | None
    # What ``Ledger.poll_start`` reads with them: the account's id, its consecutive failed polls, and its
    # lease row (None: it never had one), which the poll takes with its first write.
    account_id: int = 0
    failures: int = 0
    lease: LeaseRecord | None = None


@dataclass(frozen=True)
class PollOutcome:
    result: str
    error: str | None
    delivered: int
    failed: int
    deleted: int
    next_poll_at: datetime | None
    # Messages given up on in this poll, and on the server at its listing (None: it did not list).
    quarantined: int = 0
    listed: int | None = None
    # Journal rows of the account older than this are removed (None: kept for ever).
    journal_before: datetime | None = None


@dataclass(frozen=True)
class JournalEntry:
    """One delivery for the delivery journal (connector/ledger/journal.py): what was delivered, where, when.
    ``recipient``: the mailbox of a catch-all account's recipient; ``recovered``: found delivered by an
    earlier, interrupted attempt."""

    uidl: str
    message_id: str | None
    size: int
    sha256: str
    ref: str
    poll_started_at: datetime | None
    recipient: str | None = None
    recovered: bool = False
    stamp: str | None = None


@dataclass(frozen=True)
class AccountTotals:
    """An account's running totals since its first delivery (kept when journal rows are pruned)."""

    account: str
    messages: int
    bytes: int
    recovered: int
    first_delivery_at: datetime | None
    last_delivery_at: datetime | None
    quarantined: int
    failed_polls: int


@dataclass(frozen=True)
class AccountStatus:
    name: str
    last_poll_started_at: datetime | None
    last_poll_finished_at: datetime | None
    last_success_at: datetime | None
    last_result: str | None
    last_error: str | None
    consecutive_failures: int
    next_poll_at: datetime | None
    last_delivered: int
    last_failed: int
    last_deleted: int
    counts: dict[str, int]
    last_worker: str | None = None
    suspended_at: datetime | None = None
    suspended_reason: str | None = None
    identity_note: str | None = None
    uidl_change_note: str | None = None
    listing_note: str | None = None
    # Messages on the POP3 server at the last poll's listing (None: never listed).
    last_listed: int | None = None


@dataclass(frozen=True)
class QuarantinedMessage:
    """A message in state ``failed``: left on the POP3 server until a person retries it."""

    id: int
    account: str
    uidl: str
    attempts: int
    last_error: str | None
    size: int | None
    pop_size: int | None
    message_id: str | None
    updated_at: datetime


@dataclass(frozen=True)
class LedgerView:
    """What the idle probe's batch read found for one account (connector/ledger/idle.py), for the rules of
    connector/policies/idle.py."""

    account_id: int
    suspended: bool
    # The account's notes that a full poll may change (identity and UIDL-change notes).
    noted: bool
    consecutive_failures: int
    # Messages the last poll delivered: an account that just had mail is likely to have more.
    last_delivered: int
    baseline_taken: bool
    # Messages by state: delivered ones, and every other row but ``seen`` ones (pending, failed, deleted).
    delivered: int
    others: int
    # Rows missing from the last listing, and delivered ones with no delivery time.
    missing: int
    undated: int
    # The delivery time of the oldest delivered message the retention may delete (None: none).
    oldest_delivery: datetime | None
    # Every UIDL of the account joined by line breaks, as the ledger keeps them (None: none).
    joined: str | None
    # The lease row as read (None: none yet), which the probe's write must still find; whether the lease
    # policy (policies/lease.py) lets a poll take it now.
    lease: LeaseRecord | None
    lease_free: bool
    # Messages a baseline recorded as seen (start = "new"): left on the server, like kept ones.
    seen: int = 0
