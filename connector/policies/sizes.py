"""How far the POP3 server's sizes are trusted. Pure functions.

LIST gives a message's size before it is fetched; RETR then sends the message. The two legitimately differ
by a little: mbox servers count LF line endings where the wire has CRLF, GNU Mailutils adds an ``X-UIDL:``
header it did not count, Exchange gives an estimate, HP OpenMail rounded to 1024. A RETR *far* shorter than
LIST (a few header lines, an empty body, while LIST says 20 KB) is a store hiccup, not the message: it is
not delivered (see ``implausibly_short``). A LIST size beyond any real mail (18 digits) is not trusted to
bound the download: every message is bounded by a hard ceiling (``message_size_ceiling``). And a large
message goes to disk while it waits for delivery: the spool directory must have room for it first.
"""

from __future__ import annotations

from connector.message import SPOOL_MEMORY_LIMIT

# A RETR counts as short only when it is under half the LIST size AND this many bytes short of it: a small
# message may be estimated at twice its size (Exchange), rounding costs under 1 KB, and an added X-UIDL:
# header or uncounted CRs make RETR longer, not shorter. Only a gross shortfall trips it (or nothing at all
# for a message LIST says has content).
SHORT_RETR_MIN_GAP = 8 * 1024
# Messages up to this size stay in memory while they wait for delivery: no disk needed.
SPOOL_SPACE_CHECK_FROM = SPOOL_MEMORY_LIMIT
# Room left free beyond the message itself: the ledger, the logs and the other accounts' spools share the
# disk.
SPOOL_MARGIN = 64 * 1024 * 1024


def implausibly_short(list_size: int, retr_size: int) -> bool:
    """True when ``retr_size`` octets received for a message LIST gave as ``list_size`` octets cannot be
    the message: under half of it and more than ``SHORT_RETR_MIN_GAP`` short, or nothing at all."""
    if retr_size == 0:
        return list_size > 0
    return retr_size * 2 < list_size and list_size - retr_size > SHORT_RETR_MIN_GAP


def short_retr_reason(list_size: int, retr_size: int) -> str:
    return (
        f"RETR returned {retr_size} bytes but LIST gives {list_size} bytes: far too short to be the "
        "message (a server-side hiccup?); not delivered, left on the server"
    )


def over_ceiling(size: int, ceiling: int) -> bool:
    return size > ceiling


def ceiling_reason(size: int, ceiling: int) -> str:
    return (
        f"LIST gives {size} bytes, over message_size_ceiling ({ceiling}); not downloaded, left on the server"
    )


def spool_room_needed(size: int) -> int | None:
    """Free bytes the spool directory must have before a message of ``size`` octets is fetched; None when
    it stays in memory."""
    if size <= SPOOL_SPACE_CHECK_FROM:
        return None
    return size + SPOOL_MARGIN


def spool_shortfall(size: int, free: int) -> int | None:
    """The free bytes needed, when ``free`` is not enough for a message of ``size`` octets; else None."""
    needed = spool_room_needed(size)
    return needed if needed is not None and free < needed else None
