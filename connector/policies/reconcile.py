"""Is every journaled delivery still in its destination, once? (``pop-connector reconcile``). Pure.

The journal (connector/ledger/journal.py) says what was delivered; the destination's inventory (every
copy in the target folder, read in batches: ``Inventory`` in connector/destinations/base.py) says what is
there. A copy is a delivery's when (as for the recovery lookup, policies/recovery.py):

* it carries the delivery's stamp (``X-Pop-Connector-Id``), which survives servers that rewrite messages;
* or it carries the SHA-256 of what was delivered as a property of its own (EWS stores one per item).

A copy with neither is not counted: a Message-ID alone cannot tell our copy from someone else's copy of
the same mail (journal rows exist only for deliveries made since stamps exist).

Deliveries that share a key (the same message delivered to the same folder by two accounts has two
stamps, but byte-identical messages listed twice by a broken server share one) are counted together: a key
journaled twice must be found twice. Fewer copies than deliveries: **missing** (deleted by hand, expunged
by a retention policy of the destination); more: **duplicated** (a copy added by hand, or delivered
twice). Copies that match no delivery are someone else's mail and are not reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from connector.ledger.records import JournalEntry


@dataclass(frozen=True)
class StoredCopy:
    """One message in a destination folder, as far as an inventory reads it."""

    stamps: tuple[str, ...] = ()
    message_id: str | None = None
    size: int | None = None
    # A SHA-256 the destination keeps with the item (EWS's named property), when it keeps one.
    sha256: str | None = None


@dataclass(frozen=True)
class Discrepancy:
    entry: JournalEntry
    expected: int
    found: int

    @property
    def missing(self) -> bool:
        return self.found < self.expected

    def describe(self) -> str:
        what = "missing" if self.missing else "duplicated"
        message = self.entry.message_id or "(no Message-ID)"
        return (
            f"{what}: {message} (UIDL {self.entry.uidl!r}, {self.entry.size} bytes, delivered as "
            f"{self.entry.ref}): journaled {self.expected}, found {self.found}"
        )


def _key(entry: JournalEntry) -> tuple[str, str]:
    if entry.stamp is not None:
        return ("stamp", entry.stamp)
    return ("sha256", entry.sha256)


def reconcile(entries: Sequence[JournalEntry], copies: Iterable[StoredCopy]) -> list[Discrepancy]:
    """Every journaled delivery (``entries``, one folder's) whose copies are too few or too many."""
    expected = Counter(_key(entry) for entry in entries)
    by_sha256 = {entry.sha256: _key(entry) for entry in entries}
    found: Counter[tuple[str, str]] = Counter()
    for copy in copies:
        keys = {("stamp", stamp) for stamp in copy.stamps} & expected.keys()
        if copy.sha256 is not None and copy.sha256 in by_sha256:
            keys.add(by_sha256[copy.sha256])
        for key in keys:
            found[key] += 1
    reported: set[tuple[str, str]] = set()
    discrepancies = []
    for entry in entries:
        key = _key(entry)
        if key in reported or found[key] == expected[key]:
            continue
        reported.add(key)
        discrepancies.append(Discrepancy(entry, expected[key], found[key]))
    return discrepancies
