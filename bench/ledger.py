"""The ledger's per-message writes alone: ``python -m bench.ledger [--messages N] [--directory DIR]``.

What one delivered message costs the ledger (``record_pending``, then ``record_delivered`` with its
journal row deferred into the next message's transaction: one commit per message; and without the journal,
to show what it costs), against the same two statements and one commit
per message written with the bare ``sqlite3`` module in the same run. Reports wall and CPU time per
message and the ratio (baseline CPU / connector CPU; above 1 means the connector is cheaper).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from connector.ledger.database import open_database
from connector.ledger.records import JournalEntry
from connector.ledger.store import Ledger


def _timed(run: Callable[[], None], count: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - wall) / count * 1000, (time.process_time() - cpu) / count * 1000


def connector_run(path: Path, count: int, *, journal: bool = True) -> Callable[[], None]:
    """As a poll writes: with ``journal``, each delivery also gets its journal row and totals update
    (connector/ledger/journal.py), in the same transaction."""
    ledger = Ledger(open_database(f"sqlite:///{path}"))
    account = ledger.account_id("bench")
    assert account is not None
    started = datetime.now(UTC)

    def run() -> None:
        for n in range(count):
            uidl = f"uidl-{n}"
            ledger.record_pending(
                account, uidl, pop_size=5120, size=5120, message_id=f"<{n}@bench>", sha256="0" * 64
            )
            ref = f"imap:INBOX;UID={n}"
            entry = JournalEntry(uidl, f"<{n}@bench>", 5120, "0" * 64, ref, started) if journal else None
            ledger.record_delivered(account, uidl, ref, defer=True, journal=entry)
        ledger.flush(account)

    return run


def baseline_run(path: Path, count: int) -> Callable[[], None]:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute(
        "CREATE TABLE messages (uidl TEXT PRIMARY KEY, state TEXT, attempts INTEGER, size INTEGER, "
        "message_id TEXT, sha256 TEXT, ref TEXT, updated_at TEXT)"
    )

    def run() -> None:
        previous = None
        for n in range(count):
            now = datetime.now(UTC).isoformat()
            connection.execute("BEGIN IMMEDIATE")
            if previous is not None:
                connection.execute(
                    "UPDATE messages SET state = 'delivered', ref = ?, updated_at = ? WHERE uidl = ?",
                    (f"imap:INBOX;UID={n - 1}", now, previous),
                )
            connection.execute(
                "INSERT INTO messages VALUES (?, 'pending', 1, 5120, ?, ?, NULL, ?) ON CONFLICT (uidl) DO "
                "UPDATE SET attempts = attempts + 1 RETURNING attempts",
                (f"uidl-{n}", f"<{n}@bench>", "0" * 64, now),
            ).fetchone()
            connection.execute("COMMIT")
            previous = f"uidl-{n}"

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument(
        "--directory", type=Path, default=None, help="where the SQLite files go (e.g. /dev/shm)"
    )
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=options.directory) as work:
        base_wall, base_cpu = _timed(baseline_run(Path(work) / "bare.db", options.messages), options.messages)
        wall, cpu = _timed(connector_run(Path(work) / "ledger.db", options.messages), options.messages)
        bare_run = connector_run(Path(work) / "unjournaled.db", options.messages, journal=False)
        plain_wall, plain_cpu = _timed(bare_run, options.messages)
    print(f"{options.messages} messages, per message:")
    print(f"  connector ledger: {wall:.3f} ms wall, {cpu:.3f} ms CPU (with the delivery journal)")
    print(f"  without journal:  {plain_wall:.3f} ms wall, {plain_cpu:.3f} ms CPU")
    print(f"  bare sqlite3:     {base_wall:.3f} ms wall, {base_cpu:.3f} ms CPU")
    print(f"  ratio (bare CPU / connector CPU): {base_cpu / cpu:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
