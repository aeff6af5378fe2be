"""Where an idle poll's CPU goes, part by part: ``python -m bench.idle_parts`` (issue 16, scenario 5).

One throwaway Dovecot (processes reused, as scenario 5's), ``--accounts`` maildrops with one message each
and a SQLite ledger that knows it as delivered. Each part below is run once per account, one after another
in this thread (no pool: no GIL hand-offs), twice, and its CPU per poll reported (user + system of this
process; the server's is not counted):

- poplib: the bare loop's idle poll (bench/baseline.py: connect, USER, PASS, UIDL, QUIT);
- poplib + CAPA: the same with the round trip the connector needs for CAPA;
- the connector's POP3 session alone (``open_source``: connect, CAPA, USER, PASS; UIDL; QUIT);
- sqlite3, the least a ledger can do: one read and one write with its commit, through the driver, with and
  without the commit's fsync (synchronous FULL / NORMAL), alone and around poplib's poll (the floor of a
  poller in Python that keeps a ledger);
- the connector's ledger part: the start read, the listing's read, the result written with the lease;
- the connector's whole idle poll (``SyncEngine.poll``);
- the connector's idle probe (connector/poll/probe.py): a batch of accounts, ``max_workers`` sessions in
  flight in this one thread, one ledger read and one write per batch.

Not a test: nothing asserts a time. ``--tls`` measures POP3S instead.
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from bench import baseline
from bench.setup import connector_config, endpoint, idle_maildrops
from tests.servers.dovecot import Dovecot

_T = TypeVar("_T")


def measure(
    label: str, part: Callable[[_T], object], items: Sequence[_T], rounds: int = 2, polls: int = 0
) -> None:
    """``part`` of each item, ``rounds`` times; the best CPU per poll (``polls``: how many polls the items
    are, when an item is several)."""
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        start = time.process_time()
        for item in items:
            part(item)
        best = min(best, (time.process_time() - start) / (polls or len(items)))
    print(f"  {label:58s} {best * 1000:6.3f} ms CPU/poll", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_parts", description=__doc__)
    parser.add_argument("--accounts", type=int, default=300)
    parser.add_argument("--tls", action="store_true", help="POP3S (implicit TLS) instead of plain POP3")
    args = parser.parse_args(argv)

    from connector.config import Account, load_config
    from connector.connections import open_source
    from connector.ledger.database import open_database
    from connector.ledger.idle import BATCH
    from connector.ledger.lease import PollLease
    from connector.ledger.records import PollOutcome
    from connector.ledger.store import Ledger
    from connector.poll.engine import SyncEngine
    from connector.poll.probe import IdleProbe

    work = Path(tempfile.mkdtemp(prefix="idle-parts-"))
    with Dovecot(reuse_processes=True) as dovecot:
        database = work / "ledger.sqlite3"
        users = idle_maildrops(dovecot, args.accounts, f"sqlite:///{database}")
        config_file = connector_config(
            work / "c.toml",
            f"sqlite:///{database}",
            dovecot,
            users,
            dovecot.new_user("dst"),
            retention="keep",
            tls=args.tls,
        )
        config = load_config(config_file)
        ledger = Ledger(open_database(f"sqlite:///{database}"))
        engine = SyncEngine(config, ledger)
        accounts = config.accounts
        for account in accounts:  # every lease row exists, every maildrop indexed
            engine.poll(account)
        endpoints = [endpoint(dovecot, user, tls=args.tls) for user in users]
        print(f"{len(accounts)} idle accounts, {'POP3S' if args.tls else 'POP3'}, one poll after another:")

        measure("poplib: connect, USER, PASS, UIDL, QUIT", baseline.idle_poll, endpoints)

        def with_capa(source: baseline.Endpoint) -> None:
            pop = baseline._pop(source)
            pop.capa()
            pop.uidl()
            pop.quit()

        measure("poplib + CAPA", with_capa, endpoints)

        def session(account: Account) -> None:
            pop = open_source(account)
            pop.uidl()
            pop.quit()

        measure("connector POP3 session: connect, CAPA, USER, PASS, UIDL, QUIT", session, accounts)

        names = [account.name for account in accounts]
        ids = [state.account_id for state in map(ledger.poll_start, names) if state is not None]
        driver = sqlite3.connect(database, isolation_level=None)
        driver.execute("PRAGMA journal_mode=WAL")
        for sync in ("FULL", "NORMAL"):
            driver.execute(f"PRAGMA synchronous={sync}")

            def least_read(account_id: int) -> None:
                driver.execute("BEGIN")
                driver.execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchall()
                driver.execute("COMMIT")

            def least_write(account_id: int) -> None:
                driver.execute("BEGIN IMMEDIATE")
                now = datetime.now(UTC).isoformat(" ")
                driver.execute(
                    "UPDATE accounts SET last_poll_finished_at = ? WHERE id = ?", (now, account_id)
                )
                driver.execute("COMMIT")

            def least(account_id: int) -> None:
                least_read(account_id)
                least_write(account_id)

            def bare_with_least(pair: tuple[baseline.Endpoint, int]) -> None:
                # As a poll interleaves them: the caches are cold again after each wait for the server.
                least_read(pair[1])
                baseline.idle_poll(pair[0])
                least_write(pair[1])

            measure(f"sqlite3: one read, one write and its commit ({sync})", least, ids)
            measure(
                f"poplib + that sqlite3 read before, write after ({sync})",
                bare_with_least,
                list(zip(endpoints, ids, strict=True)),
            )
        driver.close()

        ttl = timedelta(minutes=2)

        def ledger_part(account: tuple[str, int]) -> None:
            name, account_id = account
            state = ledger.poll_start(name)
            assert state is not None
            lease = ledger.leases.reserve_for_poll(account_id, name, ttl, state.lease)
            assert isinstance(lease, PollLease)
            ledger.known_to_plan(account_id, None)
            ledger.poll_started(account_id, defer=True)
            outcome = PollOutcome("ok", None, 0, 0, 0, datetime.now(UTC), listed=1)
            lease.end_with(lambda: ledger.poll_finished(account_id, outcome))
            lease.close()

        measure(
            "connector ledger: start read, listing's read, result + lease",
            ledger_part,
            list(zip(names, ids, strict=True)),
        )
        measure("connector idle poll (SyncEngine.poll)", engine.poll, accounts)

        probe = IdleProbe(engine, at_once=config.service.max_workers)

        def probed(batch: Sequence[Account]) -> None:
            outcome = probe.run(batch)
            assert not outcome.full, f"{len(outcome.full)} handed to the full poll"

        batches = [accounts[start : start + BATCH] for start in range(0, len(accounts), BATCH)]
        label = f"connector idle probe ({config.service.max_workers} at once, batches of {BATCH})"
        measure(label, probed, batches, polls=len(accounts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
