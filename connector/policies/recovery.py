"""Is a copy found in the destination the message we are about to deliver again? (crash recovery)

After a crash, a timeout or a reset, a message recorded ``pending`` may or may not be in the destination.
Destinations do not all store the bytes they are given: Exchange Online's IMAP converts every message,
pymap re-wraps long headers, filters and proxies add a header. So size and SHA-256 cannot be what decides.

What survives rewriting is a header. Every message the connector fetches gets, as its first line,
``X-Pop-Connector-Id: <32 hex digits>``: a hash of the account (name, POP3 host, user), of the header
section as the POP3 server sent it and of the Message-ID (the one the connector adds to a message without
one is made from the UIDL). The same message fetched again gets the same stamp, also under a new
UIDL (a host migration); two different messages get different ones even when they share a Message-ID and
a date, because their header sections differ (Received: lines, list headers, Subject); the same message
fetched by two accounts into one folder gets two. The UIDL is left out on purpose: after a host migration
the same message comes back under a new one, and must still be found. Byte-identical header sections (one
message listed twice by a broken server) share a stamp, as they shared size and SHA-256 before. So:

* a stored copy that carries stamps is ours exactly when one of them is our stamp (the server may have
  changed everything else);
* a stored copy without a stamp (delivered before stamps existed, or by someone else) is ours only when
  its bytes are the ones such a delivery stored: same size, then same SHA-256 (a server that keeps bytes).

The INTERNALDATE the connector sets is not used to decide: a message without Received:/Date: gets the
fetch time, which differs when it is fetched again, and two different messages often share one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import Enum

STAMP_HEADER = "X-Pop-Connector-Id"
# What a destination error during a lookup adds: the poll stops, the message is not delivered again.
LOOKUP_FAILED = "the lookup for an earlier delivery got no answer, so the message is not delivered again now"
_STAMP_RE = re.compile(rb"^X-Pop-Connector-Id:[ \t]*([0-9a-f]{32})(?![0-9a-f])", re.IGNORECASE | re.MULTILINE)
_FOLD_RE = re.compile(rb"\r?\n(?=[ \t])")


def delivery_stamp(key: str, message_id: str, header_sha256: str) -> str:
    """The stamp of one fetched message: ``key`` names the account (``message.stamp_key``),
    ``message_id`` is the one it is delivered with (the added one is made from the UIDL, which tells
    apart messages whose header sections are alike for want of headers), ``header_sha256`` the hash of
    its header section as received (of all of it when it never ends)."""
    return hashlib.sha256(f"{key}\0{message_id}\0{header_sha256}".encode()).hexdigest()[:32]


def stamp_header_line(stamp: str) -> bytes:
    return f"{STAMP_HEADER}: {stamp}\r\n".encode("ascii")


def stamps_in(header_fields: bytes) -> tuple[str, ...]:
    """The stamps in a stored copy's ``X-Pop-Connector-Id`` fields (as FETCH BODY[HEADER.FIELDS] gives
    them): folded lines joined, any line ending, each value's leading 32 hex digits (a server may have
    folded a following continuation line into our header)."""
    unfolded = _FOLD_RE.sub(b"", header_fields)
    return tuple(match.group(1).decode("ascii").lower() for match in _STAMP_RE.finditer(unfolded))


@dataclass(frozen=True)
class Wanted:
    """The message looked for: its stamp (None for a message without one) and the size of the bytes a
    delivery without the stamp line stored."""

    stamp: str | None
    unstamped_size: int


@dataclass(frozen=True)
class Stored:
    """What the destination says about one copy with our Message-ID (or our stamp)."""

    stamps: tuple[str, ...]
    size: int | None


class Verdict(Enum):
    SAME = "same"  # our message: record it delivered, do not deliver again
    OTHER = "other"  # another message (or the same one, delivered for another account)
    COMPARE_BYTES = "compare bytes"  # no stamp and the size fits: its SHA-256 decides (``by_bytes``)


def judge(wanted: Wanted, stored: Stored) -> Verdict:
    if stored.stamps:
        return Verdict.SAME if wanted.stamp in stored.stamps else Verdict.OTHER
    if stored.size != wanted.unstamped_size:
        return Verdict.OTHER
    return Verdict.COMPARE_BYTES


def by_bytes(unstamped_sha256: str, stored_sha256: str | None) -> Verdict:
    """The verdict on an unstamped copy of the right size: the SHA-256 of our message without its stamp
    line against that of its stored bytes (None: it was expunged while we looked)."""
    return Verdict.SAME if stored_sha256 == unstamped_sha256 else Verdict.OTHER
