"""Which message is which on the POP3 server when UIDLs cannot be trusted: the I/O half of
``policies.uidl`` (it sends ``TOP n 0`` where the policy says a header hash is needed)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from connector.errors import SourceMessageError, SourceNoUidlError
from connector.ledger.records import KnownMessage, KnownMessages
from connector.message import HEADER_PARSE_LIMIT
from connector.policies.uidl import (
    UidlChange,
    hash_identity,
    hashed_uidls,
    header_hash,
    key_twins,
    needs_header_hash,
    plain_uidls_kept,
    rematch,
    suspect_migration,
)
from connector.pop3 import MessageInfo, PendingListing, Pop3Client

log = logging.getLogger("connector.poll.identity")

# Reads the ledger's rows of some UIDLs in full (``Ledger.rows_of`` for one account).
RowReader = Callable[[Collection[str]], Mapping[str, KnownMessage]]


@dataclass(frozen=True)
class Identified:
    # A MessageList when it is the UIDL listing as the server gave it (no MessageInfo kept per message).
    listing: Sequence[MessageInfo]
    # For `status`: how messages were identified when UIDLs were not enough (None: by UIDL).
    note: str | None = None
    # Messages that could not be identified at all (no UIDL and TOP refused): left alone.
    unidentified: int = 0
    # False when only UIDL was asked (``quick``): every size is 0 until the caller asks for the ones it needs.
    sized: bool = True
    # True when policies.uidl.suspect_migration already found no migration for this listing and the
    # ledger as it was given (a quick listing is only kept then): no need to look again.
    migration_checked: bool = False
    # Messages listed under one identity that nothing tells apart (see policies.uidl.key_twins): left alone.
    unresolved: int = 0
    # Pending identical copies whose recovery lookup could find a sibling's delivery (policies.uidl.Twins).
    doubtful: frozenset[str] = frozenset()


def header_hash_of(pop: Pop3Client, number: int) -> str | None:
    """The header hash of message ``number`` from ``TOP n 0``; None when the server refuses TOP for it."""
    top = io.BytesIO()
    try:
        pop.top(number, 0, top, max_bytes=2 * HEADER_PARSE_LIMIT)
    except SourceMessageError as exc:
        log.warning("%s", exc)
        return None
    return header_hash(top.getvalue())


def identify(
    pop: Pop3Client,
    known: KnownMessages,
    *,
    quick: bool = False,
    requested: PendingListing | None = None,
    read_rows: RowReader | None = None,
) -> Identified:
    """The listing with every message given an identity the ledger can rely on. With ``quick``, UIDL
    alone when the UIDLs are trustworthy (see ``Identified.sized``). ``requested``: the listing already
    asked for (``Pop3Client.request_listing``, its ``sized`` instead of ``quick``), so that the caller
    could read ``known`` while the server prepared it. ``read_rows``: reads the rows that ``known`` has by
    UIDL only, when a duplicated UIDL needs its row's header hash (without it, such a row is taken as one
    without a header hash: its copies stay on the server)."""
    if requested is None:
        # UIDL alone (sizes 0): an idle poll sends this one listing command.
        requested = pop.request_listing(sizes=not quick)
    quick = not requested.sized
    # What depends on the ledger alone is worked out while the server prepares the listing.
    hashed = hashed_uidls(known)
    try:
        # The listed UIDLs that are not kept (the few new ones) are found while the listing arrives.
        listing = requested.read(apart_from=known.kept)
    except SourceNoUidlError:
        return _by_header_hash(pop, known)
    ambiguous = needs_header_hash(listing, known, hashed=hashed)
    if quick and (ambiguous or suspect_migration(listing, known)):
        # Telling these messages apart needs their sizes after all.
        return identify(pop, known, read_rows=read_rows)
    if not ambiguous:
        return Identified(listing, sized=not quick, migration_checked=quick)
    replaced: dict[int, MessageInfo] = {}
    for info in ambiguous:
        digest = header_hash_of(pop, info.number)
        if digest is not None:
            replaced[info.number] = MessageInfo(info.number, hash_identity(digest, info.uidl), info.size)
    uidls = len({info.uidl for info in ambiguous})
    note = (
        f"the server lists {uidls} UIDL(s) for more than one message; those messages are identified by "
        "UIDL plus a hash of their headers (TOP n 0)"
    )
    # A message delivered under its plain UIDL is told from the others listed under it by its row's header
    # hash, which the ledger gives a kept row only when asked (rare: a UIDL listed twice).
    kept = plain_uidls_kept(ambiguous, known)
    recorded = read_rows(kept) if kept and read_rows is not None else {}
    return _with_twins([replaced.get(info.number, info) for info in listing], known, note, recorded=recorded)


def _by_header_hash(pop: Pop3Client, known: KnownMessages) -> Identified:
    entries = pop.list_sizes()
    listing = []
    for entry in entries:
        digest = header_hash_of(pop, entry.number)
        if digest is not None:
            listing.append(MessageInfo(entry.number, hash_identity(digest), entry.size))
    note = "the server has no UIDL; messages are identified by a hash of their headers (TOP n 0)"
    return _with_twins(listing, known, note, len(entries) - len(listing))


def _with_twins(
    listing: list[MessageInfo],
    known: KnownMessages,
    note: str,
    unidentified: int = 0,
    recorded: Mapping[str, KnownMessage] | None = None,
) -> Identified:
    """``listing`` (identified by header hash where needed) with identical copies keyed apart.
    ``recorded``: kept rows in full (see ``policies.uidl.key_twins``)."""
    twins = key_twins(listing, known, recorded)
    if twins.copies:
        note += (
            f"; {twins.copies} identical cop(ies) of a listed message (same identity and size) are each "
            "delivered once"
        )
    if twins.unresolved:
        note += (
            f"; {twins.unresolved} message(s) have one UIDL and the same headers but different sizes: "
            "nothing tells them apart, they stay on the server"
        )
    if twins.ambiguous:
        note += (
            f"; {twins.ambiguous} different message(s) are listed under a UIDL whose ledger row has no "
            "header hash (recorded before they were): nothing tells which one the row is about, they stay on "
            "the server"
        )
    return Identified(twins.listing, note, unidentified, unresolved=twins.unresolved, doubtful=twins.doubtful)


def baseline_entries(
    pop: Pop3Client, listing: Sequence[MessageInfo], known: Mapping[str, object]
) -> list[tuple[str, int, str | None]]:
    """(UIDL, size, header hash) of every listed message the ledger does not know, for a baseline. The
    header hash (TOP n 0: headers only, the message itself is not downloaded) lets a later host migration
    re-match these messages too, instead of delivering mail that was deliberately left alone."""
    return [(i.uidl, i.size, header_hash_of(pop, i.number)) for i in listing if i.uidl not in known]


def migration(
    pop: Pop3Client,
    listing: Sequence[MessageInfo],
    known: Mapping[str, KnownMessage],
    appeared: Iterable[str],
) -> UidlChange:
    """Re-match the UIDLs that ``appeared`` when all UIDLs looked changed (a host migration: see
    ``policies.uidl.suspect_migration``) to the ``known`` messages (every row, in full) by header hash and
    size."""
    wanted = set(appeared)
    infos = [info for info in listing if info.uidl in wanted]
    hashes = {info.uidl: digest for info in infos if (digest := header_hash_of(pop, info.number))}
    return rematch(infos, hashes, known)
