"""One measured run in a process of its own: ``python -m bench.worker JOB.json`` prints a JSON result.

A fresh process per run keeps runs apart (no warm caches, no shared threads) and makes peak RSS mean
something: ``idle_rss`` is read just before the timed part starts, ``peak_rss`` at the end.
"""

from __future__ import annotations

import cProfile
import importlib
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import baseline


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _connector(job: dict[str, Any]) -> Callable[[], int]:
    from connector.config import load_config
    from connector.ledger.database import open_database
    from connector.ledger.store import Ledger
    from connector.poll.engine import SyncEngine
    from connector.poll.rounds import poll_round

    config = load_config(Path(job["config"]))
    assert config.service.database is not None
    # The first delivery would import its destination's module and library inside the timed part
    # (exchangelib ~1 s, imapclient ~20 ms); imports are not timed (the bare loop's poplib and imaplib are
    # imported before it starts, and a service imports them once, not at every poll).
    for kind in {destination.type for destination in config.destinations}:
        importlib.import_module(f"connector.destinations.{kind}")  # "imap", "ews", "gmail"
    database = open_database(config.service.database, threads=config.service.max_workers)
    engine = SyncEngine(config, Ledger(database))

    def run() -> int:
        if len(config.accounts) == 1 or job.get("profile", "").endswith(".prof"):
            # In this thread, so that cProfile sees it (several accounts are then polled one at a time).
            results = [engine.poll(account) for account in config.accounts]
        else:
            # As `sync` polls them: idle ones found by the idle probe, the others polled in full.
            results = poll_round(engine, config.accounts, workers=config.service.max_workers)
        failed = [f"{r.account}: {r.error or r.problems}" for r in results if not r.ok or r.problems]
        if failed:
            raise SystemExit("connector poll failed: " + "; ".join(failed[:5]))
        return sum(r.delivered for r in results) if job.get("count") == "delivered" else len(results)

    return run


def _baseline(job: dict[str, Any]) -> Callable[[], int]:
    sources = [baseline.Endpoint(**source) for source in job["sources"]]
    destination = baseline.Endpoint(**job["destination"]) if job.get("destination") else None
    mode = job["mode"]
    if mode == "move":
        assert destination is not None
        return lambda: sum(baseline.move_all(source, destination) for source in sources)
    if mode == "new":
        assert destination is not None
        known = set(Path(job["known"]).read_bytes().split())
        return lambda: sum(baseline.move_new(source, destination, known) for source in sources)
    if mode == "idle":
        return lambda: sum(1 for source in sources if baseline.idle_poll(source) >= 0)
    raise SystemExit(f"unknown baseline mode {mode!r}")


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    run = _connector(job) if job["kind"] == "connector" else _baseline(job)
    idle_rss = _rss_kib("VmRSS")
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    profile = cProfile.Profile() if job.get("profile") else None
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    count = run()
    if profile is not None:
        profile.disable()
        profile.dump_stats(job["profile"])
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    result = {
        "seconds": seconds,
        "cpu": cpu,
        "count": count,
        "idle_rss_kib": idle_rss,
        "peak_rss_kib": _rss_kib("VmHWM"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
