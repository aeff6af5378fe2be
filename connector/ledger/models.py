"""Ledger tables: one row per account, one row per (account, UIDL) message.

A message row moves ``pending`` (fetched, delivery under way or to be retried) -> ``delivered`` (the
destination has it: from here on it is never delivered again) -> ``deleted`` (the POP3 server confirmed the
deletion with +OK to QUIT), or to ``failed`` (quarantined after too many attempts; left on the server).
``seen`` rows were on the server before the account's baseline and are left alone. The states are
``MessageState`` and ``RecipientState`` in ``connector/ledger/records.py``, with the other plain records
that pure code reads without importing SQLAlchemy; a row's ``state`` column holds their values.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, also on SQLite, which keeps no time zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class AccountRow(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_poll_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_poll_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # ok | error | auth_error | stopped
    last_result: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_delivered: Mapped[int] = mapped_column(Integer, default=0)
    last_failed: Mapped[int] = mapped_column(Integer, default=0)
    last_deleted: Mapped[int] = mapped_column(Integer, default=0)
    # Distributed mode: the worker that took the account's latest poll, and whether the dispatcher
    # polls it at all (false once it left the configuration or was disabled; its rows are kept).
    last_worker: Mapped[str | None] = mapped_column(String(200))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # Set after retry.max_consecutive_failures failed polls; only `pop-connector resume` clears it.
    suspended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    suspended_reason: Mapped[str | None] = mapped_column(Text)
    # When what was on the server was recorded as already seen (start = "new" or `baseline`).
    baseline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # How the last poll identified messages when UIDLs could not be trusted (None: by UIDL).
    identity_note: Mapped[str | None] = mapped_column(Text)
    # The last time all UIDLs changed at once (a host migration) and what was done about it.
    uidl_change_note: Mapped[str | None] = mapped_column(Text)
    # The last time a listing lacked most of the known maildrop at once, and what was done about it.
    listing_note: Mapped[str | None] = mapped_column(Text)
    # Messages on the POP3 server at the last poll's listing (None: no poll has listed it yet).
    last_listed: Mapped[int | None] = mapped_column(Integer)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("account_id", "uidl", name="uq_messages_account_uidl"),
        Index("ix_messages_account_state", "account_id", "state"),
        # Partial: only rows missing from the last listing (few), so that the planner never prefers it for
        # the per-state reads of every poll. On PostgreSQL it is partial too (migration 0005 creates it
        # with postgresql_where; test_ledger checks it), but not declared so here: a postgresql_ option
        # loads SQLAlchemy's PostgreSQL dialect to check it, in every process, also on SQLite (120 M
        # instructions of `status`, issue 16). These models create no tables (the migrations do), and
        # Alembic's comparison does not look at an index's WHERE.
        Index("ix_messages_account_missing", "account_id", sqlite_where=text("missing_since IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    # RFC 1939 caps a UIDL at 70 characters; leave room for servers that do not.
    uidl: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16))
    pop_size: Mapped[int | None] = mapped_column(BigInteger)
    size: Mapped[int | None] = mapped_column(BigInteger)
    message_id: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    destination_ref: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Only the header section was delivered (oversize = "headers_only"): never deleted from the server.
    headers_only: Mapped[bool] = mapped_column(Boolean, default=False)
    # SHA-256 of the header section as the POP3 server sent it: identity when UIDLs fail.
    header_hash: Mapped[str | None] = mapped_column(String(64))
    # What was changed in the message on its way (policies.repair); None when nothing was.
    repairs: Mapped[str | None] = mapped_column(Text)
    # Missing from the server's listing since then, for this many polls in a row (None / 0: listed at the
    # last poll). A row is forgotten only after both limits (policies.listing), never at one short listing.
    missing_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    missing_polls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class RecipientRow(Base):
    """One (message, local mailbox) delivery of a catch-all account: a message goes to each mailbox once,
    and is ``delivered`` (may be DELEted) only when all of its recipients are."""

    __tablename__ = "recipients"
    __table_args__ = (UniqueConstraint("message_id", "mailbox", name="uq_recipients_message_mailbox"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    mailbox: Mapped[str] = mapped_column(String(320))
    state: Mapped[str] = mapped_column(String(16))
    destination_ref: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class LeaseRow(Base):
    """The poll lease of one account (connector/policies/lease.py): at most one poll at a time, across
    processes and machines. The row outlives its leases, so that ``generation`` (the fencing token) only
    ever grows."""

    __tablename__ = "leases"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)
    # host:pid:random, unique to one poll.
    holder: Mapped[str] = mapped_column(String(400))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Renewed by the poll's writes and a timer; set to the release time when the poll ends.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DeliveryRow(Base):
    """The delivery journal (connector/ledger/journal.py): one row per delivery, append-only, kept
    ``journal_retention`` whatever happens to the message rows."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_account_time", "account_id", "delivered_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    uidl: Mapped[str] = mapped_column(String(512))
    message_id: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # The X-Pop-Connector-Id the delivered copy carries (policies/recovery.py): how `reconcile` finds it.
    stamp: Mapped[str | None] = mapped_column(String(32))
    destination_ref: Mapped[str] = mapped_column(Text)
    # The recipient mailbox of a catch-all account's delivery.
    recipient: Mapped[str | None] = mapped_column(String(320))
    delivered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    poll_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Found already delivered by an earlier, interrupted attempt (not delivered by this one).
    recovered: Mapped[bool] = mapped_column(Boolean, default=False)


class AccountTotalsRow(Base):
    """Running totals per account, kept when journal rows are pruned."""

    __tablename__ = "account_totals"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    recovered: Mapped[int] = mapped_column(BigInteger, default=0)
    first_delivery_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_delivery_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    quarantined: Mapped[int] = mapped_column(BigInteger, default=0)
    failed_polls: Mapped[int] = mapped_column(BigInteger, default=0)
