"""A distributed worker's poll jobs in process, full polls against the idle probe:
``python -m bench.worker_jobs [--accounts 400] [--at-once 16]`` (issue 16).

The poll job as procrastinate runs it (``DistributedWorker.poll_account``: claim, poll, release), without
procrastinate, against the instant POP3 server (tests/servers/instant_pop3.py, a process of its own: every
maildrop empty, every poll idle) and a fresh PostgreSQL database (the one the tests use). Each account is
made due, then polled once, by a worker whose probe tries no account (every job a full poll, as before the
probe) and by one with the idle probe; jobs one after another (the probe then reads and writes the ledger
for one account at a time) and ``--at-once`` at a time (as many as a worker's ``max_workers``: the probe's
batches). Reports the CPU per poll job of this process (user + system, all its threads; the server's is
not counted). Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, update

from connector.config import Account, load_config
from connector.ledger.database import open_database
from connector.ledger.models import AccountRow
from connector.ledger.records import utcnow
from connector.poll.probe import IdleProbe
from connector.service.distributed import ensure_queue_schema, sync_accounts
from connector.service.distributed.worker import DistributedWorker
from tests.distributed_setup import fresh_database


class _Refusing(IdleProbe):
    """Tries no account: every job is a full poll."""

    def refusal(self, account: Account) -> str | None:
        return "measured in full"


def _config(path: Path, database: str, port: int, accounts: int, at_once: int) -> None:
    tables = [
        f'[[accounts]]\nname = "u{index}"\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\n'
        f'username = "u{index}"\npassword = "p"\ndestination = "d"\n'
        for index in range(accounts)
    ]
    path.write_text(
        f'[service]\nmode = "distributed"\ndatabase = "{database}"\nmax_workers = {at_once}\n'
        '[defaults]\npoll_interval = "5m"\npoll_jitter = 0\n'
        '[[destinations]]\nname = "d"\ntype = "imap"\nhost = "127.0.0.1"\nport = 9\ntls = "none"\n'
        'username = "u"\npassword = "p"\n' + "\n".join(tables)
    )


def _due(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(update(AccountRow).values(next_poll_at=utcnow() - timedelta(seconds=1)))


def _jobs(worker: DistributedWorker, names: list[str], at_once: int) -> float:
    """Each account's poll job once; CPU seconds of this process per job."""
    start = time.process_time()
    if at_once == 1:
        results = [worker.poll_account(name) for name in names]
    else:
        with ThreadPoolExecutor(at_once) as jobs:
            results = list(jobs.map(worker.poll_account, names))
    cpu = time.process_time() - start
    if set(results) != {"ok"}:
        raise SystemExit(f"polls failed: {sorted(set(results))}")
    return cpu / len(names)


def run(accounts: int, at_once: int, rounds: int) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.instant_pop3", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().strip().rsplit(":", 1)[1])
        with tempfile.TemporaryDirectory(prefix="bench-jobs-") as directory, fresh_database() as url:
            path = Path(directory) / "config.toml"
            _config(path, url, port, accounts, at_once)
            engine = open_database(url)
            try:
                ensure_queue_schema(engine)
                config = load_config(path)
                sync_accounts(engine, config.accounts)
                names = [account.name for account in config.accounts]
                for label, probe_type in (("full polls", _Refusing), ("idle probe", IdleProbe)):
                    worker = DistributedWorker(config, engine, probe_type=probe_type)
                    _due(engine)
                    _jobs(worker, names, at_once)  # warm-up: each account's first poll
                    for jobs_at_once in (1, at_once):
                        best = float("inf")
                        for _ in range(rounds):
                            _due(engine)
                            best = min(best, _jobs(worker, names, jobs_at_once))
                        per_job = f"{best * 1000:.2f} ms CPU per poll job"
                        print(f"{label}, {jobs_at_once:2d} job(s) at once: {per_job}", flush=True)
                    worker.stop.set()  # its probe's thread ends
            finally:
                engine.dispose()
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--accounts", type=int, default=400)
    parser.add_argument("--at-once", type=int, default=16, help="jobs at once (the worker's max_workers)")
    parser.add_argument("--rounds", type=int, default=2, help="the best of this many rounds is reported")
    args = parser.parse_args()
    run(args.accounts, args.at_once, args.rounds)


if __name__ == "__main__":
    main()
