"""UIDL trouble: identifying messages when the server's unique-ids cannot be trusted. Pure functions.

* No UIDL at all, or one UIDL listed for several messages: such messages are identified by a hash of their
  header section (``TOP n 0``) instead: ``hdr:<sha256>``, or ``<uidl>/hdr:<sha256>`` for a duplicated UIDL.
  Once a UIDL was seen duplicated, it keeps being identified that way (the ledger has ``<uidl>/hdr:`` rows),
  so the message left alone later is not taken for a new one.
* Identical copies (one such identity listed several times with one size, as popa3d's content-hash UIDLs
  list a message delivered twice): each copy gets a key of its own, ``<identity> #<k>`` for further copies,
  matched to the ledger's rows by count at every poll (``key_twins``).
* A message recorded under its plain UIDL before that UIDL was listed twice keeps that row: the copy whose
  header hash is the row's is that message (``key_twins``). A row with no header hash (written before they
  were recorded) cannot tell which copy it is: every copy listed under that UIDL stays on the server.
* All UIDLs changing at once (the host migrated): most of the UIDLs the ledger expects on the server have
  vanished while about as many unknown ones appeared. Known messages are re-matched to the new UIDLs by
  header hash (and size, to tell identical headers apart) instead of being delivered again.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from itertools import repeat

from connector.ledger.records import KnownMessage, KnownMessages, MessageState
from connector.message import header_section
from connector.pop3 import MessageInfo, uidl_set_of, uidls_not_in, uidls_of

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


def header_hash(data: bytes) -> str:
    """SHA-256 of the header section: the same for ``TOP n 0`` and for the start of ``RETR`` (whose NUL
    bytes the spool has already removed, see policies.repair). Unbounded, so that no hash the ledger
    already holds changes (``TOP n 0`` is bounded on the wire)."""
    return hashlib.sha256(header_section(data, limit=None).replace(b"\0", b"")).hexdigest()


def hash_identity(digest: str, uidl: str | None = None) -> str:
    return f"{uidl}{_DUPLICATE_SEPARATOR}{HASH_PREFIX}{digest}" if uidl else f"{HASH_PREFIX}{digest}"


def duplicated_uidls(uidls: Sequence[str]) -> set[str]:
    """The UIDLs listed more than once (counted only when there are any: a set's size tells)."""
    if len(set(uidls)) == len(uidls):
        return set()
    return {uidl for uidl, count in Counter(uidls).items() if count > 1}


def _duplicated_in(listing: Sequence[MessageInfo]) -> set[str]:
    """``duplicated_uidls`` of a listing (for a ``MessageList``, from its columns: no MessageInfo built)."""
    if len(uidl_set_of(listing)) == len(listing):
        return set()
    return duplicated_uidls(uidls_of(listing))


def needs_header_hash(
    listing: Sequence[MessageInfo], known: Collection[str], *, hashed: Set[str] | None = None
) -> list[MessageInfo]:
    """The listed messages whose UIDL alone does not identify them: duplicated in this listing, or a
    UIDL the ledger already knows only in its ``<uidl>/hdr:`` form. ``hashed``: ``hashed_uidls(known)``,
    when worked out already (a poll does it while the server prepares the listing)."""
    doubtful = _duplicated_in(listing) | (hashed_uidls(known) if hashed is None else hashed)
    if not doubtful:
        return []
    return [info for info in listing if info.uidl in doubtful]


def hashed_uidls(known: Collection[str]) -> Set[str]:
    """The UIDLs that the ledger knows in their ``<uidl>/hdr:`` form."""
    marker = _DUPLICATE_SEPARATOR + HASH_PREFIX
    # Looked for in one string first: nearly every ledger has none, and may know 100,000 (one search in
    # the joined UIDLs is a sixth of a call per UIDL), in the string the ledger read them as when it did
    # (joining them again cost more than the search). The marker has no line break, so no match spans two.
    joined = known.joined if isinstance(known, KnownMessages) else None
    if marker not in (joined if joined is not None else "\n".join(known)):
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
    listed = uidl_set_of(listing)
    expected = [uidl for uidl, row in known.rows.items() if row.state in _EXPECTED_ON_SERVER]
    # Kept messages are delivered ones, expected on the server too. Those listed are the listed UIDLs less
    # those not kept: one set difference, shared with the plan (plan.plan_poll).
    kept_listed = len(listed) - len(uidls_not_in(listing, known.kept))
    vanished = len(known.kept) - kept_listed + sum(1 for uidl in expected if uidl not in listed)
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


# --- identical copies under one identity ------------------------------------------------------------------

# Joins an identity and a copy number: a space never occurs in a UIDL (RFC 1939: 0x21-0x7E) nor in
# "hdr:<hex>", so a copy's key can never be a real UIDL or another message's identity.
TWIN_SEPARATOR = " #"
# When more ledger rows than listed copies remain (copies removed by someone else), the rows kept for the
# copies left: the ones that need nothing done first, so that no copy is delivered again.
_TWIN_KEEP_ORDER = {
    MessageState.DELIVERED: 0,
    MessageState.PENDING: 1,
    MessageState.FAILED: 2,
    MessageState.SEEN: 3,
}
# A pending copy's recovery lookup may find one of these siblings' content instead of its own.
_IN_DESTINATION = frozenset({MessageState.DELIVERED, MessageState.DELETED, MessageState.PENDING})


def twin_key(identity: str, copy: int) -> str:
    """The ledger key of the ``copy``-th (1-based) identical copy of ``identity``: the first one keeps it."""
    return identity if copy == 1 else f"{identity}{TWIN_SEPARATOR}{copy}"


def is_hashed(identity: str) -> bool:
    """An identity made from a header hash (``hdr:…`` or ``<uidl>/hdr:…``): the only ones twins can have."""
    return identity.startswith(HASH_PREFIX) or _DUPLICATE_SEPARATOR + HASH_PREFIX in identity


@dataclass(frozen=True)
class Twins:
    """The listing with identical copies keyed apart (see ``key_twins``)."""

    listing: list[MessageInfo]
    # Listed copies beyond the first of identical messages: each is delivered once, under its own key.
    copies: int = 0
    # Messages listed under one identity whose sizes differ: nothing tells them apart; left on the server.
    unresolved: int = 0
    # Messages listed under a duplicated UIDL whose row has no header hash: which one the row is about is
    # unknown; all listed under their plain UIDL, so that the plan leaves them on the server.
    ambiguous: int = 0
    # Keys of pending copies whose recovery lookup could find an identical sibling's delivery instead.
    doubtful: frozenset[str] = frozenset()


@dataclass
class _Member:
    key: str
    copy: int  # 0: the plain UIDL the message had before it was identified by header hash
    state: MessageState | None  # None: no ledger row, a copy new to the connector


def key_twins(
    listing: Sequence[MessageInfo], known: KnownMessages, recorded: Mapping[str, KnownMessage] | None = None
) -> Twins:
    """Give each listed copy of identical messages (one header-hash identity listed several times with one
    size: one UIDL, equal headers, equal size) a key of its own, so that each is delivered exactly once.

    Copies are byte-identical, so which copy is which does not matter, only how many there are: the
    ledger rows of an identity (its key, ``<identity> #k`` for further copies, and the plain UIDL it had
    before it was hashed) are matched to the listed copies by count, every poll. A ``deleted`` row is a copy
    the server confirmed removed, so it matches no listed copy. Rows still expected on the server are given
    to the copies in listing order, delivered ones first, so that no copy is delivered twice; copies left
    over are new and get fresh keys (never the key of a ``deleted`` row, which would be taken for a deletion
    to repeat); rows left over belong to copies someone else removed and are forgotten as usual.

    ``recorded``: the rows in full of plain UIDLs that ``known`` has by UIDL only (kept ones, see
    ``plain_uidls_kept``), whose header hashes tell which listed message each row is about.
    """
    groups: dict[str, list[MessageInfo]] = {}
    for info in listing:
        if is_hashed(info.uidl):
            groups.setdefault(info.uidl, []).append(info)
    members, ambiguous = _members(groups, listing, known, recorded or {})
    replaced: dict[int, MessageInfo] = {}
    copies = unresolved = 0
    doubtful: set[str] = set()
    for identity, infos in groups.items():
        plain = _plain_uidl(identity)
        if plain in ambiguous:
            # Listed under the plain UIDL again, more than once: the plan leaves them all on the server.
            replaced.update((info.number, info._replace(uidl=plain)) for info in infos)
            continue
        rows = members.get(identity, [])
        if len(infos) == 1 and not rows:
            continue
        if len({info.size for info in infos}) > 1:
            unresolved += len(infos)
            continue
        copies += len(infos) - 1
        for info, member in zip(infos, _matched(identity, rows, len(infos)), strict=True):
            replaced[info.number] = info._replace(uidl=member.key)
            if member.state is MessageState.PENDING and _doubtful(member, rows):
                doubtful.add(member.key)
    if not replaced:
        return Twins(list(listing), unresolved=unresolved)
    keyed = [replaced.get(info.number, info) for info in listing]
    left = sum(1 for info in keyed if info.uidl in ambiguous)
    return Twins(keyed, copies, unresolved, ambiguous=left, doubtful=frozenset(doubtful))


def plain_uidls_kept(doubtful: Iterable[MessageInfo], known: KnownMessages) -> set[str]:
    """The UIDLs of the ``doubtful`` messages (see ``needs_header_hash``) that ``known`` has by UIDL only
    (kept): their rows are read in full for ``key_twins``, which needs their header hashes."""
    if not known.kept:
        return set()
    return {info.uidl for info in doubtful if info.uidl in known.kept}


def _plain_uidl(identity: str) -> str:
    """The UIDL of a ``<uidl>/hdr:`` identity ("" for ``hdr:``, whose server has no UIDL)."""
    plain, separator, _ = identity.partition(_DUPLICATE_SEPARATOR + HASH_PREFIX)
    return plain if separator else ""


def _members(
    groups: Mapping[str, list[MessageInfo]],
    listing: Sequence[MessageInfo],
    known: KnownMessages,
    recorded: Mapping[str, KnownMessage],
) -> tuple[dict[str, list[_Member]], set[str]]:
    """The ledger rows of each identity in ``groups``: its own key, its further copies' keys and the plain
    UIDL it had before it was hashed, when that row is about this message. And the plain UIDLs whose row
    cannot tell which of the different messages listed under it is its own (``ambiguous``)."""
    members: dict[str, list[_Member]] = {}

    def add(identity: str, key: str, copy: int) -> None:
        row = known.rows.get(key)
        if row is not None:
            members.setdefault(identity, []).append(_Member(key, copy, row.state))
        elif key in known.kept:
            members.setdefault(identity, []).append(_Member(key, copy, MessageState.DELIVERED))

    for identity in groups:
        add(identity, identity, 1)
    if any(map(str.__contains__, known, repeat(TWIN_SEPARATOR))):
        for key in known:
            identity, separator, copy = key.rpartition(TWIN_SEPARATOR)
            if separator and identity in groups and copy.isdigit():
                add(identity, key, int(copy))
    plain_identities: dict[str, set[str]] = {}
    for info in listing:
        if plain := _plain_uidl(info.uidl):
            plain_identities.setdefault(plain, set()).add(info.uidl)
    ambiguous: set[str] = set()
    for plain, identities in plain_identities.items():
        row = known.rows.get(plain) or recorded.get(plain)
        if row is None and plain not in known.kept:
            continue  # no row under the plain UIDL
        digest = row.header_hash if row is not None else None
        if digest is not None:
            # The row's header hash says which listed message it is about, if any (the delivered one may be
            # gone and every copy new): it joins that identity alone.
            if (identity := hash_identity(digest, plain)) in identities:
                add(identity, plain, 0)
        elif len(identities) == 1:
            # Every copy listed under the UIDL has one identity (one message, or identical copies of it).
            add(next(iter(identities)), plain, 0)
        elif row is None or row.state in _EXPECTED_ON_SERVER:
            # Different messages under the UIDL, and nothing says which one the row is about: delivering
            # them all would deliver that one twice, and a size is no identity (the row's message may be
            # gone and a new one of the same size listed). Left on the server for a person to judge.
            ambiguous.add(plain)
    return members, ambiguous


def _doubtful(member: _Member, rows: Sequence[_Member]) -> bool:
    """Whether a pending copy's recovery lookup could find an identical sibling's delivery instead of its
    own: a sibling row says so, and so does a further copy's key (its siblings' rows may be forgotten, once
    they were deleted from the server; their deliveries stay in the destination)."""
    return member.copy >= 2 or any(row.key != member.key and row.state in _IN_DESTINATION for row in rows)


def _matched(identity: str, rows: Sequence[_Member], count: int) -> list[_Member]:
    """The rows for ``count`` listed copies: the rows still expected on the server, delivered ones first,
    then new members with fresh keys."""
    expected = sorted(
        (row for row in rows if row.state in _TWIN_KEEP_ORDER),
        key=lambda row: (_TWIN_KEEP_ORDER.get(row.state, 0) if row.state else 0, row.copy),
    )
    matched = expected[:count]
    used = {row.copy for row in rows}
    copy = 1
    while len(matched) < count:
        if copy not in used:
            matched.append(_Member(twin_key(identity, copy), copy, None))
            used.add(copy)
        copy += 1
    return matched
