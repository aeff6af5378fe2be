"""Distributed-mode benchmark: accounts polled per second with 1, 2 and 4 worker processes, and what the
database does per poll.

    python -m bench.distributed [--accounts 400] [--workers 1 2 4] [--rounds 2] [--max-workers 8]
    python -m bench.distributed --db-cost [--accounts 200]
    python -m bench.distributed --scale 100000 [--workers 1 2] [--window 60] [--due-rate 0]

``--scale``: 100,000 synthetic accounts against an instant POP3 server and a throwaway PostgreSQL cluster,
with CPU, statements, rows and WAL per poll (bench/distributed_scale.py says how).

Everything runs on this machine: the Dovecot test fixture (plain POP3/IMAP on loopback) and the local
PostgreSQL, one fresh database per measurement. Mailboxes are mostly idle: one account in 20 has a new
message each round, the rest answer an empty listing, as most mailboxes do at a 5-minute interval.

Scaling: all accounts are written into the database inactive, the workers start and register, then every
account is switched active at once; the rate is accounts / (last poll finished - first poll started),
from the ledger's own timestamps. Ratios are against one worker.

Database cost (--db-cost): one worker in this process; a SQLAlchemy event listener counts the ledger's
statements and rows, a wrapper counts procrastinate's queries by name, and PostgreSQL's table statistics
give rows inserted/updated/deleted per table. Everything is divided by the number of polls.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from sqlalchemy import Engine, create_engine, event, text

from bench import distributed_scale
from tests.distributed_setup import (
    Fleet,
    cli,
    config_text,
    fresh_database,
    make_fleet,
    message,
    start_worker,
)
from tests.servers.dovecot import Dovecot

BUSY_EVERY = 20  # one account in this many gets a new message per round


def _reseed(fleet: Fleet) -> None:
    for index, user in enumerate(fleet.sources):
        if index % BUSY_EVERY == 0:
            fleet.dovecot.seed(user.name, [message(user.name, int(time.time() * 1000) % 100000)])


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _scalar(engine: Engine, query: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(query)).scalar()


def measure_rate(fleet: Fleet, workers: int, max_workers: int, work_dir: Path) -> float:
    """Accounts polled per second by ``workers`` processes, all accounts due at the same moment."""
    _reseed(fleet)
    with fresh_database("pop_connector_bench") as database:
        config = work_dir / f"bench-{workers}.toml"
        config.write_text(config_text(fleet, database, max_workers=max_workers, stalled_after="10s"))
        for command in (("db", "upgrade"), ("accounts", "sync-config")):
            result = cli("--config", str(config), *command)
            assert result.returncode == 0, result.stderr
        engine = create_engine(database)
        try:
            with engine.begin() as connection:
                connection.execute(text("UPDATE accounts SET active = false"))
            processes = [start_worker(config, f"bench{workers}-{n}", work_dir) for n in range(workers)]
            try:
                _wait(
                    lambda: (
                        _scalar(engine, "SELECT count(*) FROM procrastinate.procrastinate_workers") == workers
                    ),
                    60,
                    "workers to register",
                )
                with engine.begin() as connection:
                    connection.execute(text("UPDATE accounts SET active = true"))
                total = len(fleet.sources)
                _wait(
                    lambda: (
                        _scalar(
                            engine, "SELECT count(*) FROM accounts WHERE last_poll_finished_at IS NOT NULL"
                        )
                        == total
                    ),
                    300,
                    "every account to be polled",
                )
                seconds = _scalar(
                    engine,
                    "SELECT EXTRACT(EPOCH FROM max(last_poll_finished_at) - min(last_poll_started_at)) "
                    "FROM accounts",
                )
            finally:
                for process in processes:
                    process.stop()
        finally:
            engine.dispose()
    return total / float(seconds)


def scaling(args: argparse.Namespace, dovecot: Dovecot) -> None:
    fleet = make_fleet(dovecot, args.accounts, lambda index: 0)
    rates: dict[int, list[float]] = {}
    with TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for workers in args.workers:
                rate = measure_rate(fleet, workers, args.max_workers, Path(work))
                rates.setdefault(workers, []).append(rate)
                print(f"  {workers} worker(s): {rate:.1f} accounts/s")
    base = statistics.median(rates[args.workers[0]])
    print(
        f"\n{args.accounts} accounts, 1 in {BUSY_EVERY} with a new message, "
        f"max_workers={args.max_workers}, {os.cpu_count()} CPUs; median of {args.rounds}"
    )
    print("workers  accounts/s  ratio")
    for workers, values in rates.items():
        median = statistics.median(values)
        print(f"{workers:>7}  {median:>10.1f}  {median / base:>5.2f}")


# --- database cost ---------------------------------------------------------------------------------------


class StatementCounter:
    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()

    def attach(self, engine: Engine) -> None:
        event.listen(engine, "after_cursor_execute", self._after)

    def _after(self, _conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        kind = statement.lstrip().split(None, 1)[0].upper()
        if kind == "SELECT" and "pg_" in statement and "advisory" in statement:
            kind = "SELECT (advisory lock)"
        self.statements[kind] += 1
        self.rows[kind] += max(cursor.rowcount, 0)


@contextmanager
def counting_procrastinate() -> Iterator[Counter[str]]:
    from procrastinate import PsycopgConnector, sql

    names = {query: name for name, query in sql.queries.items()}
    counts: Counter[str] = Counter()
    originals = {}
    for method in ("execute_query_async", "execute_query_one_async", "execute_query_all_async"):
        original = getattr(PsycopgConnector, method)
        originals[method] = original

        def wrapper(self: Any, query: str, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            counts[names.get(query, "other")] += 1
            return _original(self, query, *args, **kwargs)

        setattr(PsycopgConnector, method, wrapper)
    try:
        yield counts
    finally:
        for method, original in originals.items():
            setattr(PsycopgConnector, method, original)


_TABLE_STATS = (
    "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
    "WHERE schemaname IN ('public', 'procrastinate')"
)


def _table_stats(engine: Engine) -> dict[str, tuple[int, int, int]]:
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_stat_clear_snapshot()"))
        return {row[0]: (row[1], row[2], row[3]) for row in connection.execute(text(_TABLE_STATS))}


def db_cost(args: argparse.Namespace, dovecot: Dovecot) -> None:
    from connector.config import load_config
    from connector.ledger.database import upgrade
    from connector.service.distributed import ensure_queue_schema, sync_accounts
    from connector.service.distributed.worker import DistributedWorker, worker_engine

    fleet = make_fleet(dovecot, args.accounts, lambda index: 0)
    _reseed(fleet)
    with TemporaryDirectory() as work, fresh_database("pop_connector_bench") as database:
        path = Path(work) / "config.toml"
        path.write_text(config_text(fleet, database, max_workers=args.max_workers, dispatch_interval="1s"))
        config = load_config(path)
        engine = worker_engine(database, args.max_workers)
        upgrade(engine)
        ensure_queue_schema(engine)
        sync_accounts(engine, config.accounts)
        observer = create_engine(database)  # the watcher's queries must not be counted
        engine.dispose()  # a backend reports its table statistics when it ends
        time.sleep(0.5)
        before = _table_stats(observer)
        ledger = StatementCounter()
        ledger.attach(engine)
        total = len(fleet.sources)

        def stop_when_done() -> None:
            _wait(
                lambda: (
                    _scalar(observer, "SELECT count(*) FROM accounts WHERE last_poll_finished_at IS NOT NULL")
                    == total
                ),
                300,
                "every account to be polled",
            )
            os.kill(os.getpid(), signal.SIGTERM)

        watcher = threading.Thread(target=stop_when_done, daemon=True)
        with counting_procrastinate() as queue:
            watcher.start()
            cpu, wall = time.process_time(), time.monotonic()
            DistributedWorker(config, engine).run()
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        watcher.join()
        time.sleep(1.5)  # PostgreSQL flushes table statistics about once a second
        after = _table_stats(observer)
        engine.dispose()
        observer.dispose()
    busy = (total + BUSY_EVERY - 1) // BUSY_EVERY
    print(f"{total} polls ({busy} delivered one message, the rest idle); per poll, including the dispatch")
    print(f"worker CPU time: {cpu / total * 1000:.1f} ms per poll ({wall:.1f} s wall for all)")
    print("ledger (SQLAlchemy) statements and rows:")
    for kind, count in ledger.statements.most_common():
        print(f"  {kind:<24} {count / total:6.2f} statements  {ledger.rows[kind] / total:6.2f} rows")
    print(f"  {'total':<24} {sum(ledger.statements.values()) / total:6.2f} statements")
    print("procrastinate queries:")
    for name, count in queue.most_common():
        print(f"  {name:<32} {count / total:6.2f}")
    print(f"  {'total':<32} {sum(queue.values()) / total:6.2f}")
    print("rows written per table (inserted / updated / deleted):")
    for table in sorted(after):
        ins, upd, dele = (a - b for a, b in zip(after[table], before.get(table, (0, 0, 0)), strict=True))
        if ins or upd or dele:
            print(f"  {table:<34} {ins / total:5.2f} / {upd / total:5.2f} / {dele / total:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default 1 2 4; --scale: 1 2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-workers", type=int, help="polls at once per worker (default 8; --scale: 16)")
    parser.add_argument("--db-cost", action="store_true", help="measure statements and rows per poll")
    distributed_scale.add_arguments(parser)
    args = parser.parse_args()
    if args.scale:
        args.workers = args.workers or [1, 2]
        args.max_workers = args.max_workers or 16
        distributed_scale.run(args)
        return
    args.workers = args.workers or [1, 2, 4]
    args.max_workers = args.max_workers or 8
    with Dovecot() as dovecot:
        db_cost(args, dovecot) if args.db_cost else scaling(args, dovecot)


if __name__ == "__main__":
    main()
