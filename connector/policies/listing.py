"""The listing as evidence. Pure functions.

A UIDL is unique only among the messages that exist (RFC 1939 §7): once a message is gone, a server that
numbers by position, or whose counter was reset, may give its UIDL to a new one. And one listing can be
wrong for a moment (a locked or half-mounted maildrop lists nothing, or a few). So:

* A known row decides a DELE only when the listed message is still the one it is about: same header hash
  (``TOP n 0``) when the row has one, else same LIST size (``same_message``). A row whose message has left
  the server (``deleted`` after QUIT, or missing long enough to be forgotten) decides nothing: a message
  listed under its UIDL is delivered as new, looked up in the destination first (``retired``).
* A row missing from the listing is forgotten only after ``Forgetting.polls`` polls *and*
  ``Forgetting.after`` time (``forgotten``); it is deleted from the ledger only long after that
  (``FORGOTTEN_ROWS_KEPT``), so that a message coming back later is still looked up before delivery.
* A listing that suddenly lacks most of what the ledger expects on the server (``sudden_loss``) is not
  evidence: it forgets nothing and counts no poll, and the poll reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from connector.config import Account
from connector.ledger.records import KnownMessage, KnownMessages, MessageState
from connector.pop3 import MessageInfo

# A listing lacking more than this share of the known maildrop at once, of at least SUDDEN_LOSS_MIN
# messages, is taken for a glitch of the server rather than mail removed by someone.
SUDDEN_LOSS_SHARE = 0.5
SUDDEN_LOSS_MIN = 4
# Forgotten rows stay this long (from when their message went missing) before they are deleted: a
# message that comes back within it is looked up in the destination instead of being delivered again.
FORGOTTEN_ROWS_KEPT = timedelta(days=30)
# States of rows whose messages are expected on the server (a ``deleted`` one has left it).
EXPECTED_ON_SERVER = frozenset(
    {MessageState.DELIVERED, MessageState.PENDING, MessageState.FAILED, MessageState.SEEN}
)


@dataclass(frozen=True)
class Forgetting:
    """When a row missing from the listing is forgotten: after both (``forget_missing_after_polls``,
    ``forget_missing_after``)."""

    polls: int = 3
    after: timedelta = timedelta(hours=24)

    @classmethod
    def of(cls, account: Account) -> Forgetting:
        return cls(account.forget_missing_after_polls, account.forget_missing_after)


def forgotten(row: KnownMessage, now: datetime, forgetting: Forgetting) -> bool:
    """Missing for long enough, in polls and in time, to be no longer trusted by UIDL."""
    return (
        row.missing_since is not None
        and row.missing_polls >= forgetting.polls
        and now - row.missing_since >= forgetting.after
    )


def to_delete_from_ledger(row: KnownMessage, now: datetime, forgetting: Forgetting) -> bool:
    """A row not listed that the ledger may delete now: ``deleted`` ones at once (the server confirmed it
    removed them), forgotten ones once ``FORGOTTEN_ROWS_KEPT`` has passed too."""
    if row.state is MessageState.DELETED:
        return True
    return (
        forgotten(row, now, forgetting)
        and row.missing_since is not None
        and now - row.missing_since >= max(forgetting.after, FORGOTTEN_ROWS_KEPT)
    )


def retired(row: KnownMessage, now: datetime, forgetting: Forgetting) -> bool:
    """A listed message under this row's UIDL may be another one: the row's message was deleted at our
    QUIT, or was missing until it was forgotten. Its row no longer decides anything (``seen`` ones
    excepted: mail from before a baseline is left alone whatever happens)."""
    if row.state is MessageState.DELETED:
        return True
    return row.state is not MessageState.SEEN and forgotten(row, now, forgetting)


def sudden_loss(expected: int, lost: int, listed: int) -> bool:
    """``lost`` of the ``expected`` rows (expected on the server and listed at the last poll) are missing
    from a listing of ``listed`` messages: true when that is too much at once to be believed (an empty
    listing where mail was expected, or more than half of at least four)."""
    if lost == 0:
        return False
    if listed == 0:
        return True
    return expected >= SUDDEN_LOSS_MIN and lost > SUDDEN_LOSS_SHARE * expected


def same_message(info: MessageInfo, row: KnownMessage, header_hash: str | None) -> bool:
    """Whether the listed message (``info`` with its LIST size; ``header_hash`` from ``TOP n 0``, None
    when the server refused it) is the one ``row`` recorded under that UIDL.

    The header hash decides when both are known (Received lines, Date and Message-ID differ between two
    messages; a size may not, and a host migration re-matched by header hash may report sizes its own
    way); else the LIST size. A row that records neither is never taken as proof."""
    if row.header_hash is not None and header_hash is not None:
        return header_hash == row.header_hash
    return row.pop_size is not None and info.size == row.pop_size


def lost_report(expected: int, lost: int, listed: int) -> str:
    return (
        f"the server listed {listed} message(s), and {lost} of the {expected} the ledger expects there "
        "are missing from it at once (a locked or half-mounted maildrop?): nothing is forgotten in this "
        "poll; mail removed on purpose is forgotten once later listings confirm it"
    )


def listed_last_time(known: KnownMessages) -> KnownMessages:
    """``known`` without the rows already missing from the last listing: what can vanish "at once" (a host
    migration, policies.uidl) is only what was there at the last poll."""
    if not any(row.missing_since is not None for row in known.rows.values()):
        return known
    rows = {uidl: row for uidl, row in known.rows.items() if row.missing_since is None}
    return KnownMessages(rows, known.kept, joined=known.joined)
