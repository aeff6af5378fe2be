"""Gmail throughput per mailbox against the API's quota: ``python -m bench.gmail [--messages N]``.

Gmail allows 250 quota units per user per second and an import costs 25, so no client can import more
than 10 messages a second into one mailbox; the bound here is Google's quota, not a bare loop. The run
serves the Gmail API test server (tests/servers/gmail.py) with that quota enforced (a request over it is
answered 429, as Gmail does) and ``--latency`` ms added to each answer, imports ``--messages`` small
messages from a throwaway Dovecot into each of ``--mailboxes`` Workspace users at once (one account per
user, a poll each, in parallel), and reports messages/s per mailbox and the share of the quota's ceiling
reached. The 429s the server had to send are counted: the connector paces itself (a little under the
quota), so there should be none. Not a test: nothing asserts a figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from connector.config import load_config
from connector.destinations.gmail_tokens import GMAIL_SCOPES
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from tests.configs import write_tables
from tests.messages import simple
from tests.servers.dovecot import Dovecot
from tests.servers.gmail import GmailServer

IMPORT_UNITS = 25
QUOTA_UNITS_PER_SECOND = 250
CEILING = QUOTA_UNITS_PER_SECOND / IMPORT_UNITS  # imports per second per mailbox


def run(messages: int, mailboxes: int, latency_ms: float, work: Path) -> dict[str, float]:
    users = [f"user{n}@example.com" for n in range(mailboxes)]
    with (
        Dovecot() as dovecot,
        GmailServer(quota=QUOTA_UNITS_PER_SECOND, latency=latency_ms / 1000) as gmail,
    ):
        sources = [dovecot.new_user(f"src{n}") for n in range(mailboxes)]
        for source in sources:
            dovecot.seed(source.name, [simple(n) for n in range(messages)])
        for user in users:
            gmail.add_user(user)
        key = gmail.tokens.add_service_account(scopes=GMAIL_SCOPES, users=users).write_key(work / "key.json")
        destination = {
            "name": "gmail",
            "type": "gmail",
            "service_account_key": {"file": str(key)},
            "api_url": gmail.api_url,
            "ca_file": str(gmail.ca_file),
        }
        accounts = [
            {
                "name": f"box{n}",
                "host": dovecot.host,
                "port": dovecot.ports.pop3,
                "tls": "none",
                "username": source.name,
                "password": source.password,
                "destination": "gmail",
                "mailbox": user,
            }
            for n, (source, user) in enumerate(zip(sources, users, strict=True))
        ]
        database = f"sqlite:///{work / 'ledger.db'}"
        config = load_config(write_tables(work / "config.toml", database, [destination], accounts))
        engine = SyncEngine(config, Ledger(open_database(database)))
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=mailboxes) as pool:
            results = list(pool.map(engine.poll, config.accounts))
        elapsed = time.perf_counter() - started
        delivered = sum(result.delivered for result in results)
        throttled = sum(1 for request in gmail.requests if request.status == 429)
    per_mailbox = delivered / mailboxes / elapsed
    return {
        "delivered": delivered,
        "seconds": elapsed,
        "per_mailbox": per_mailbox,
        "of_ceiling": per_mailbox / CEILING,
        "throttled": throttled,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gmail", description=__doc__)
    parser.add_argument("--messages", type=int, default=100, help="messages per mailbox (default 100)")
    parser.add_argument(
        "--mailboxes", type=int, default=2, help="mailboxes imported into at once (default 2)"
    )
    parser.add_argument(
        "--latency", type=float, default=25.0, help="ms added to each API answer (default 25)"
    )
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        figures = run(options.messages, options.mailboxes, options.latency, Path(work))
    print(
        f"Gmail import, {options.mailboxes} mailbox(es) x {options.messages} messages, "
        f"+{options.latency:g} ms per answer:"
    )
    print(
        f"  {figures['per_mailbox']:.1f} messages/s per mailbox, {figures['of_ceiling']:.0%} of the quota's "
        f"ceiling ({CEILING:g}/s: {QUOTA_UNITS_PER_SECOND} units/s, {IMPORT_UNITS} per import); "
        f"{figures['delivered']:.0f} delivered in {figures['seconds']:.1f} s; "
        f"{figures['throttled']:.0f} answered 429"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
