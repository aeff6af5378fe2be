"""``pop-connector reconcile --account NAME``: is every journaled delivery still in its destination, once?

Read-only. The account's deliveries come from the delivery journal (connector/ledger/journal.py); what is
in each destination folder from the destination's inventory (``inventory()`` of the IMAP and EWS
sessions: the stamps, Message-IDs and SHA-256 properties of every message, read in batches, so that
100,000 messages cost a few hundred round trips, not 100,000). connector/policies/reconcile.py decides;
each message missing or duplicated is named by its Message-ID. Exit 1 when anything is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import Protocol, TextIO, runtime_checkable

from connector.config import Account, Config
from connector.connections import Connections
from connector.destinations.base import DestinationSession
from connector.errors import ConfigError
from connector.ledger.records import JournalEntry
from connector.ledger.store import Ledger
from connector.policies.reconcile import Discrepancy, StoredCopy, reconcile

# A progress line every this many messages read from a destination.
PROGRESS_EVERY = 5000


@runtime_checkable
class Inventoried(Protocol):
    """A destination session that can list what its folder holds (see the module doc)."""

    def inventory(self) -> Iterator[StoredCopy]: ...


def run(args: argparse.Namespace, config: Config, ledger: Ledger, connections: Connections) -> int:
    account = config.account(args.account)
    entries = [entry for entry, _ in ledger.journal.deliveries(account.name)]
    discrepancies = check(config, account, entries, connections, progress=sys.stderr)
    for discrepancy in discrepancies:
        print(f"{account.name}: {discrepancy.describe()}")
    missing = sum(1 for d in discrepancies if d.missing)
    print(
        f"{account.name}: {len(entries)} journaled deliveries checked: {missing} missing, "
        f"{len(discrepancies) - missing} duplicated"
    )
    return 1 if discrepancies else 0


def check(
    config: Config,
    account: Account,
    entries: Iterable[JournalEntry],
    connections: Connections,
    *,
    progress: TextIO | None = None,
) -> list[Discrepancy]:
    """The discrepancies of ``account``'s journaled deliveries, folder by folder (a catch-all account's
    recipients each have theirs)."""
    destination = config.destination_for(account)
    by_folder: dict[str | None, list[JournalEntry]] = {}
    for entry in entries:
        by_folder.setdefault(entry.recipient, []).append(entry)
    found: list[Discrepancy] = []
    for recipient, group in by_folder.items():
        if recipient is None:
            session = connections.open_destination(destination, account)
            name = account.name
        else:
            session = connections.open_recipient(destination, account, recipient)
            name = f"{account.name} ({recipient})"
        found += _folder(session, group, name, progress)
    return found


def _folder(
    session: DestinationSession, entries: list[JournalEntry], name: str, progress: TextIO | None
) -> list[Discrepancy]:
    try:
        if not isinstance(session, Inventoried):
            raise ConfigError(f"{name}: reconcile cannot list this destination type's folders yet")
        return reconcile(entries, _counted(session.inventory(), name, progress))
    finally:
        session.close()


def _counted(copies: Iterator[StoredCopy], name: str, progress: TextIO | None) -> Iterator[StoredCopy]:
    read = 0
    for copy in copies:
        read += 1
        if progress is not None and read % PROGRESS_EVERY == 0:
            print(f"{name}: {read} messages read from the destination", file=progress, flush=True)
        yield copy
    if progress is not None:
        print(f"{name}: {read} messages read from the destination", file=progress, flush=True)
