"""policies/reconcile.py: journaled deliveries against what a destination holds."""

from __future__ import annotations

from connector.ledger.records import JournalEntry
from connector.policies.reconcile import StoredCopy, reconcile


def entry(n: int, *, stamp: str | None = None) -> JournalEntry:
    return JournalEntry(f"u{n}", f"<m{n}@x>", 100 + n, f"{n:064x}", f"imap:INBOX;UID={n}", None, stamp=stamp)


def test_each_delivery_found_once_is_no_discrepancy() -> None:
    entries = [entry(1, stamp="a" * 32), entry(2, stamp="b" * 32)]
    copies = [
        StoredCopy(stamps=("a" * 32,)),
        StoredCopy(stamps=("b" * 32,)),
        StoredCopy(message_id="<other>"),
    ]
    assert reconcile(entries, copies) == []


def test_missing_and_duplicated_are_told_apart() -> None:
    entries = [entry(1, stamp="a" * 32), entry(2, stamp="b" * 32)]
    found = reconcile(entries, [StoredCopy(stamps=("b" * 32,)), StoredCopy(stamps=("b" * 32,))])
    assert [(d.entry.uidl, d.missing, d.expected, d.found) for d in found] == [
        ("u1", True, 1, 0),
        ("u2", False, 1, 2),
    ]
    assert found[0].describe().startswith("missing: <m1@x> (UIDL 'u1'")


def test_a_key_journaled_twice_must_be_found_twice() -> None:
    twins = [entry(1, stamp="c" * 32), entry(1, stamp="c" * 32)]
    assert reconcile(twins, [StoredCopy(stamps=("c" * 32,)), StoredCopy(stamps=("c" * 32,))]) == []
    [short] = reconcile(twins, [StoredCopy(stamps=("c" * 32,))])
    assert (short.expected, short.found) == (2, 1)


def test_an_exchange_item_matches_by_its_sha256_property() -> None:
    delivered = entry(3, stamp="d" * 32)
    assert reconcile([delivered], [StoredCopy(message_id="<m3@x>", sha256=delivered.sha256)]) == []
    # The same Message-ID without our property is someone else's copy: the delivery is missing.
    [gone] = reconcile([delivered], [StoredCopy(message_id="<m3@x>")])
    assert gone.missing
