"""Scheduling benchmark (issue 16): the real ``run`` service with many idle accounts for a few intervals.

    python -m bench.schedule [--accounts 300] [--interval 10] [--intervals 3] [--max-workers 8]
                             [--code LABEL=DIR ...]

One throwaway Dovecot (plain POP3 on loopback) serves ``--accounts`` empty maildrops, so every poll is an
idle one (connect, log in, UIDL, nothing new, QUIT). For each ``--code`` tree (default: this checkout) a
fresh process runs that tree's ``Service`` (``connector/service/scheduler.py``) with that tree's
``SyncEngine`` and a fresh SQLite ledger, every account never polled, for ``--intervals`` poll intervals,
then stops it. Only the ``Service`` API is used (constructor, ``start``, ``shutdown``, ``on_lag``,
``on_result``), so an older checkout runs the same measurement: before and after in one run::

    git worktree add /tmp/before 3565ec2
    python -m bench.schedule --code before=/tmp/before --code after=.

Reported per tree: polls per second needed (accounts / interval) against done (polls finished / time
run); the scheduling lag (due to started, the values the service gives ``on_lag``, which feed the
``pop_connector_scheduling_lag_seconds`` histogram): median, 95th percentile, maximum, for the first
interval and for the rest; how bunched the starts are: the most polls started in any one-second window
of the first interval against the average the interval needs; CPU seconds per poll of the service
process. Benchmarks are not tests: nothing here asserts a duration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# --- the service process (runs the tree under test; imports nothing of this checkout's connector) -------


def _child(job: dict[str, Any]) -> dict[str, Any]:
    # The tree under test comes first, so that its connector package is the one imported.
    sys.path.insert(0, job["code"])
    import connector
    from connector.config import load_config
    from connector.ledger.database import open_database
    from connector.ledger.store import Ledger
    from connector.ops.logs import setup_logging
    from connector.poll.engine import SyncEngine
    from connector.poll.result import PollResult
    from connector.service.scheduler import Service

    setup_logging("INFO", "text", Path(job["log"]))
    config = load_config(Path(job["config"]))
    assert config.service.database is not None
    ledger = Ledger(open_database(config.service.database))
    engine = SyncEngine(config, ledger)
    lock = threading.Lock()
    starts: list[float] = []
    lags: list[float] = []
    finished: list[float] = []
    failed: list[str] = []
    polled: set[str] = set()
    first_round: list[float] = []  # when every account had had its first poll

    def on_lag(seconds: float) -> None:
        with lock:
            starts.append(time.time())
            lags.append(seconds)

    def on_result(result: PollResult) -> None:
        with lock:
            finished.append(time.time())
            polled.add(result.account)
            if len(polled) == len(config.accounts) and not first_round:
                first_round.append(time.time())
            if not result.ok:
                failed.append(f"{result.account}: {result.error}")

    service = Service(config, engine, ledger, on_result=on_result, on_lag=on_lag)
    cpu0 = time.process_time()
    began = time.time()
    service.start(poll_now=job["now"])
    time.sleep(job["seconds"])
    ended = time.time()
    service.shutdown()
    cpu = time.process_time() - cpu0
    with lock:
        return {
            "code": str(Path(connector.__file__).resolve().parents[1]),
            "began": began,
            "ended": ended,
            "starts": [start - began for start in starts],
            "lags": lags,
            "finished": [at - began for at in finished if at <= ended],
            "failed": failed[:5],
            "failures": len(failed),
            "cpu": cpu,
            "first_round": first_round[0] - began if first_round else None,
        }


# --- the measurement ----------------------------------------------------------------------------------


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _most_in_one_second(times: Sequence[float]) -> int:
    """The most of ``times`` in any window [t, t + 1 s)."""
    ordered = sorted(times)
    most, low = 0, 0
    for high, at in enumerate(ordered):
        while ordered[low] <= at - 1.0:
            low += 1
        most = max(most, high - low + 1)
    return most


def summarise(figures: dict[str, Any], accounts: int, interval: float) -> dict[str, Any]:
    run = figures["ended"] - figures["began"]
    starts, lags = figures["starts"], figures["lags"]
    first = [lag for start, lag in zip(starts, lags, strict=True) if start < interval]
    later = [lag for start, lag in zip(starts, lags, strict=True) if start >= interval]
    first_starts = [start for start in starts if start < interval]
    return {
        "accounts": accounts,
        "needed": accounts / interval,
        "done": len(figures["finished"]) / run,
        "polls": len(figures["finished"]),
        "failures": figures["failures"],
        "lag_first": (statistics.median(first), _percentile(first, 0.95), max(first)) if first else None,
        "lag_later": (statistics.median(later), _percentile(later, 0.95), max(later)) if later else None,
        "bunched": _most_in_one_second(first_starts),
        "started_first": len(first_starts),
        "last_first_start": max(first_starts, default=float("nan")),
        "cpu_per_poll_ms": figures["cpu"] / max(1, len(figures["finished"])) * 1000,
        # With every account due at once (--now): how fast the process worked through them.
        "first_round": figures["first_round"],
    }


def _lag(values: tuple[float, float, float] | None) -> str:
    if values is None:
        return "-"
    return "median {:.2f} s, p95 {:.2f} s, max {:.2f} s".format(*values)


def report(label: str, row: dict[str, Any], *, now: bool = False) -> str:
    lines = [
        f"{label}:",
        f"  polls/s needed {row['needed']:.1f}, done {row['done']:.1f} ({row['polls']} polls, "
        f"{row['failures']} failed); CPU {row['cpu_per_poll_ms']:.1f} ms/poll",
        f"  first interval: {row['started_first']} polls started, the last at "
        f"{row['last_first_start']:.1f} s; most started in one second {row['bunched']} "
        f"(average needed {row['needed']:.1f})",
        f"  lag, first interval: {_lag(row['lag_first'])}",
        f"  lag, later:          {_lag(row['lag_later'])}",
    ]
    if now and row["first_round"]:
        # Every account was due at once: the time to poll them all is what the process can do.
        rate = row["accounts"] / row["first_round"]
        lines.append(
            f"  every account polled once after {row['first_round']:.1f} s: {rate:.1f} polls/s at most"
        )
    return "\n".join(lines)


def _config_text(
    database: str, dovecot: Any, users: Sequence[Any], destination: Any, args: argparse.Namespace
) -> str:
    host, port, imap_port = dovecot.host, dovecot.ports.pop3, dovecot.ports.imap
    parts = [
        f'[service]\ndatabase = "{database}"\nmax_workers = {args.max_workers}\n',
        f'[defaults]\npoll_interval = "{args.interval}s"\ntimeout = "60s"\n',
        f'[[destinations]]\nname = "d"\ntype = "imap"\nhost = "{host}"\nport = {imap_port}\ntls = "none"\n'
        f'username = "{destination.name}"\npassword = "{destination.password}"\n',
    ]
    for user in users:
        parts.append(
            f'[[accounts]]\nname = "{user.name}"\nhost = "{host}"\nport = {port}\ntls = "none"\n'
            f'username = "{user.name}"\npassword = "{user.password}"\ndestination = "d"\nretention = "keep"\n'
        )
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.schedule", description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=300)
    parser.add_argument("--interval", type=int, default=10, help="poll_interval in seconds (default 10)")
    parser.add_argument("--intervals", type=float, default=3, help="how long to run, in intervals")
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument(
        "--now",
        action="store_true",
        help="start with run --now (every account due at once): the first interval then shows the most "
        "polls per second the process can do",
    )
    parser.add_argument(
        "--code",
        action="append",
        metavar="LABEL=DIR",
        help="a checkout whose service to run (repeatable; default: this one)",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child.read_text()))))
        return 0
    from bench.run import machine
    from tests.servers.dovecot import Dovecot

    trees = [entry.split("=", 1) for entry in (args.code or [f"this={ROOT}"])]
    print(f"machine: {machine()}", flush=True)
    print(
        f"{args.accounts} idle accounts, poll_interval {args.interval} s, max_workers {args.max_workers}, "
        f"{args.intervals} intervals per run",
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-schedule-") as tmp, Dovecot() as dovecot:
        work = Path(tmp)
        users = [dovecot.new_user("sched") for _ in range(args.accounts)]
        destination = dovecot.new_user("scheddst")
        for label, tree in trees:
            database = f"sqlite:///{work / (label + '.sqlite3')}"
            config = work / f"{label}.toml"
            config.write_text(_config_text(database, dovecot, users, destination, args))
            job = {
                "code": str(Path(tree).resolve()),
                "config": str(config),
                "log": str(work / f"{label}.log"),
                "seconds": args.interval * args.intervals,
                "now": args.now,
            }
            (work / f"{label}.json").write_text(json.dumps(job))
            done = subprocess.run(
                [sys.executable, "-m", "bench.schedule", "--child", str(work / f"{label}.json")],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise SystemExit(f"{label}: the service run failed:\n{done.stderr[-3000:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            if figures["failures"]:
                print(f"  {label}: {figures['failures']} polls failed, e.g. {figures['failed']}", flush=True)
            rows[label] = summarise(figures, args.accounts, args.interval)
            print(report(f"{label} ({figures['code']})", rows[label], now=args.now), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
