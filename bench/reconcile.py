"""How long ``pop-connector reconcile`` takes for a big migration: ``python -m bench.reconcile``.

A throwaway Dovecot's IMAP folder is filled with N stamped messages (Maildir files written directly), the
journal entries of those deliveries are made up to match, and the reconcile check of connector/cli/
reconcile.py reads the folder's inventory (FETCH of 1,000 UIDs at a time) and compares. Reported: seconds,
messages per second, and that nothing was found missing or duplicated. Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from connector.cli.reconcile import check
from connector.config import load_config
from connector.connections import Connections
from connector.ledger.records import JournalEntry
from connector.policies.recovery import stamp_header_line
from tests.configs import write_tables
from tests.servers.dovecot import Dovecot


def run(count: int, work: Path) -> tuple[float, int]:
    with Dovecot() as dovecot:
        user = dovecot.new_user("reconcile")
        entries, messages = [], []
        for n in range(count):
            stamp = f"{n:032x}"
            message_id = f"<m{n}@bench.example>"
            body = (
                stamp_header_line(stamp) + f"Message-ID: {message_id}\r\nSubject: {n}\r\n\r\nx\r\n".encode()
            )
            messages.append(body)
            entries.append(
                JournalEntry(f"u{n}", message_id, len(body), "0" * 64, "imap:INBOX", None, stamp=stamp)
            )
        dovecot.seed(user.name, messages)
        destination = {
            "name": "dovecot",
            "type": "imap",
            "host": dovecot.host,
            "port": dovecot.ports.imap,
            "tls": "none",
            "username": user.name,
            "password": user.password,
        }
        account = {
            "name": "bench",
            "host": dovecot.host,
            "port": dovecot.ports.pop3,
            "tls": "none",
            "username": user.name,
            "password": user.password,
            "destination": "dovecot",
        }
        config = load_config(
            write_tables(work / "config.toml", f"sqlite:///{work / 'l.db'}", [destination], [account])
        )
        started = time.perf_counter()
        found = check(config, config.accounts[0], entries, Connections())
        return time.perf_counter() - started, len(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile", description=__doc__)
    parser.add_argument(
        "--messages", type=int, default=100_000, help="messages in the folder (default 100000)"
    )
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        seconds, discrepancies = run(options.messages, Path(work))
    print(
        f"reconcile of {options.messages} messages: {seconds:.1f} s "
        f"({options.messages / seconds:.0f} messages/s), {discrepancies} discrepancies"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
