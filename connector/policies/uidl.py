"""UIDL trouble: identifying messages when the server's unique-ids cannot be trusted. Pure functions.

* No UIDL at all, or one UIDL listed for several messages: such messages are identified by a hash of their
  header section (``TOP n 0``) instead: ``hdr:<sha256>``, or ``<uidl>/hdr:<sha256>`` for a duplicated UIDL.
  Once a UIDL was seen duplicated, it keeps being identified that way (the ledger has ``<uidl>/hdr:`` rows),
  so the message left alone later is not taken for a new one.
* All UIDLs changing at once (the host migrated): most of the UIDLs the ledger expects on the server have
  vanished while about as many unknown ones appeared. Known messages are re-matched to the new UIDLs by
  header hash (and size, to tell identical headers apart) instead of being delivered again.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat

from connector.ledger.models import MessageState
from connector.ledger.store import KnownMessage, KnownMessages
from connector.pop3 import MessageInfo

HASH_PREFIX = "hdr:"
_DUPLICATE_SEPARATOR = "/"
# A migration is only assumed when this many expected messages vanished: a handful of messages removed by
# a webmail user while others arrived is normal life, not a migration.
MIGRATION_MIN_VANISHED = 3
MIGRATION_VANISHED_SHARE = 0.8
# States whose messages are expected to still be on the server (``deleted`` ones legitimately vanish).
_EXPECTED_ON_SERVER = frozenset(
    {MessageState.DELIVERED, MessageState.PENDING, MessageState.FAILED, MessageState.SEEN}
)


def header_section(data: bytes) -> bytes:
    """The header section of a message (through the blank line), or all of it when it has no blank line."""
    if data.startswith(b"\r\n"):
        return data[:2]
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 4]


def header_hash(data: bytes) -> str:
    """SHA-256 of the header section: the same for ``TOP n 0`` and for the start of ``RETR`` (whose NUL
    bytes the spool has already removed, see policies.repair)."""
    return hashlib.sha256(header_section(data).replace(b"\0", b"")).hexdigest()


def hash_identity(digest: str, uidl: str | None = None) -> str:
    return f"{uidl}{_DUPLICATE_SEPARATOR}{HASH_PREFIX}{digest}" if uidl else f"{HASH_PREFIX}{digest}"


def duplicated_uidls(uidls: Sequence[str]) -> set[str]:
    """The UIDLs listed more than once (counted only when there are any: a set's size tells)."""
    if len(set(uidls)) == len(uidls):
        return set()
    return {uidl for uidl, count in Counter(uidls).items() if count > 1}


def needs_header_hash(listing: Sequence[MessageInfo], known: Collection[str]) -> list[MessageInfo]:
    """The listed messages whose UIDL alone does not identify them: duplicated in this listing, or a
    UIDL the ledger already knows only in its ``<uidl>/hdr:`` form."""
    doubtful = duplicated_uidls([info.uidl for info in listing]) | _hashed_uidls(known)
    if not doubtful:
        return []
    return [info for info in listing if info.uidl in doubtful]


def _hashed_uidls(known: Collection[str]) -> set[str]:
    """The UIDLs that the ledger knows in their ``<uidl>/hdr:`` form."""
    marker = _DUPLICATE_SEPARATOR + HASH_PREFIX
    # Looked for without Python code per UIDL first: nearly every ledger has none, and may know 100,000.
    if not any(map(str.__contains__, known, repeat(marker))):
        return set()
    return {key.split(marker, 1)[0] for key in known if marker in key}


@dataclass(frozen=True)
class UidlChange:
    """Known messages re-matched to new UIDLs (old -> new) and the new UIDLs that matched nothing."""

    rematched: dict[str, str]
    unmatched: list[str]
    vanished: int


def suspect_migration(listing: Sequence[MessageInfo], known: KnownMessages) -> list[str]:
    """The new UIDLs to re-match when the listing looks like a migrated host, else an empty list."""
    listed = {info.uidl for info in listing}
    expected = [uidl for uidl, row in known.rows.items() if row.state in _EXPECTED_ON_SERVER]
    # Kept messages are delivered ones, expected on the server too; counted with set operations.
    vanished = len(known.kept - listed) + sum(1 for uidl in expected if uidl not in listed)
    if vanished < max(MIGRATION_MIN_VANISHED, MIGRATION_VANISHED_SHARE * (len(expected) + len(known.kept))):
        return []
    appeared = [info.uidl for info in listing if info.uidl not in known]
    if len(appeared) < MIGRATION_VANISHED_SHARE * vanished:
        return []
    return appeared


def rematch(
    appeared: Sequence[MessageInfo], hashes: Mapping[str, str], known: Mapping[str, KnownMessage]
) -> UidlChange:
    """Pair each appeared message (``hashes``: new UIDL -> header hash) with the one vanished known
    message of the same header hash (and, when several share it, the same size). Ambiguous or unknown
    ones stay unmatched."""
    listed = {info.uidl for info in appeared}
    by_hash: dict[str, list[KnownMessage]] = {}
    vanished = 0
    for uidl, row in known.items():
        if row.state in _EXPECTED_ON_SERVER and uidl not in listed:
            vanished += 1
            if row.header_hash:
                by_hash.setdefault(row.header_hash, []).append(row)
    rematched: dict[str, str] = {}
    unmatched: list[str] = []
    for info in appeared:
        candidates = by_hash.get(hashes.get(info.uidl, ""), [])
        if len(candidates) > 1:
            candidates = [row for row in candidates if info.size in (row.pop_size, row.size)]
        if len(candidates) == 1 and candidates[0].uidl not in rematched:
            rematched[candidates[0].uidl] = info.uidl
        else:
            unmatched.append(info.uidl)
    return UidlChange(rematched=rematched, unmatched=unmatched, vanished=vanished)


def rekeyed(known: Mapping[str, KnownMessage], mapping: Mapping[str, str]) -> dict[str, KnownMessage]:
    """``known`` as it reads after the rows in ``mapping`` (old -> new UIDL) were re-keyed."""
    result = {uidl: row for uidl, row in known.items() if uidl not in mapping}
    for old, new in mapping.items():
        result[new] = known[old]._replace(uidl=new)
    return result
