"""UIDL trouble policies: header hashes, duplicated UIDLs, host-migration detection and re-matching."""

from __future__ import annotations

from datetime import UTC, datetime

from connector.ledger.models import MessageState
from connector.ledger.store import KnownMessage, KnownMessages
from connector.message import MessageSpool, header_section
from connector.policies.uidl import (
    hash_identity,
    header_hash,
    needs_header_hash,
    rekeyed,
    rematch,
    suspect_migration,
)
from connector.pop3 import MessageInfo

NOW = datetime(2026, 11, 26, tzinfo=UTC)


def row(uidl: str, state: MessageState = MessageState.DELIVERED, **extra: object) -> KnownMessage:
    fields: dict[str, object] = {"pop_size": 100, "header_hash": f"h-{uidl}", **extra}
    size = fields["pop_size"]
    return KnownMessage(uidl, state, 1, NOW, f"<{uidl}@x>", size, "0" * 64, **fields)  # type: ignore[arg-type]


def infos(*uidls: str, size: int = 100) -> list[MessageInfo]:
    return [MessageInfo(n, uidl, size) for n, uidl in enumerate(uidls, 1)]


def test_header_hash_of_top_equals_the_one_recorded_from_retr() -> None:
    message = b"Subject: a\r\nMessage-ID: <a@x>\r\n\r\nbody\r\n"
    spool = MessageSpool("u", "<fallback@x>")
    spool.write(message)
    with spool.finish() as fetched:
        assert fetched.header_sha256 == header_hash(b"Subject: a\r\nMessage-ID: <a@x>\r\n\r\n")
    assert header_section(message) == b"Subject: a\r\nMessage-ID: <a@x>\r\n\r\n"
    # A message without Message-ID gets one added, but the hash is of what the server sent.
    spool = MessageSpool("u", "<fallback@x>")
    spool.write(b"Subject: b\r\n\r\nbody\r\n")
    with spool.finish() as fetched:
        assert fetched.message_id_added and fetched.header_sha256 == header_hash(b"Subject: b\r\n\r\n")


def test_identities() -> None:
    assert hash_identity("abc") == "hdr:abc"
    assert hash_identity("abc", "uid-1") == "uid-1/hdr:abc"


def test_duplicates_and_formerly_duplicated_uidls_need_a_hash() -> None:
    listing = infos("x", "x", "y", "z")
    assert [i.number for i in needs_header_hash(listing, {})] == [1, 2]
    # "z" was once listed twice: the ledger knows it only as "z/hdr:...", so it keeps that identity.
    assert [i.number for i in needs_header_hash(listing, {"z/hdr:abc": object()})] == [1, 2, 4]
    assert needs_header_hash(infos("a", "b"), {"a": object()}) == []
    kept = KnownMessages(kept=frozenset({"z/hdr:abc", "x"}))
    assert [i.number for i in needs_header_hash(listing, kept)] == [1, 2, 4]


def test_migration_needs_most_expected_uidls_gone_and_as_many_new() -> None:
    # The same ledger twice: all rows in full, or the delivered ones named only (retention = "keep").
    for known in (KnownMessages({u: row(u) for u in "abcde"}), KnownMessages(kept=frozenset("abcde"))):
        expected = ["A", "B", "C", "D", "E", "F"]
        assert suspect_migration(infos("A", "B", "C", "D", "E", "F"), known) == expected
        assert suspect_migration(infos("a", "b", "c", "D", "E"), known) == []  # only two vanished
        assert suspect_migration(infos("X"), known) == []  # mail was deleted, little arrived
    deleted = KnownMessages({u: row(u, MessageState.DELETED) for u in ("a", "b", "c", "d")})
    assert suspect_migration(infos("N1", "N2", "N3", "N4"), deleted) == []  # deleted ones vanish normally
    two = KnownMessages({"a": row("a")}, kept=frozenset({"b"}))
    assert suspect_migration(infos("A", "B"), two) == []  # too few to tell


def test_rematch_by_header_hash_then_size() -> None:
    known = {
        "a": row("a", header_hash="h1"),
        "b": row("b", header_hash="h2", pop_size=100),
        "c": row("c", header_hash="h2", pop_size=200),
        "d": row("d", header_hash="h3"),
        "e": row("e", header_hash=None),
    }
    appeared = [MessageInfo(1, "A", 100), MessageInfo(2, "B", 100), MessageInfo(3, "C", 200)]
    appeared += [MessageInfo(4, "N", 50)]
    change = rematch(appeared, {"A": "h1", "B": "h2", "C": "h2", "N": "h9"}, known)
    assert change.rematched == {"a": "A", "b": "B", "c": "C"}
    assert change.unmatched == ["N"] and change.vanished == 5
    moved = rekeyed(known, change.rematched)
    assert set(moved) == {"A", "B", "C", "d", "e"} and moved["A"].uidl == "A"
    assert moved["A"].state is MessageState.DELIVERED


def test_rematch_leaves_ambiguous_headers_unmatched() -> None:
    known = {"a": row("a", header_hash="h", pop_size=100), "b": row("b", header_hash="h", pop_size=100)}
    change = rematch([MessageInfo(1, "A", 100)], {"A": "h"}, known)
    assert change.rematched == {} and change.unmatched == ["A"]
