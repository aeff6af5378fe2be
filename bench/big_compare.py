"""Scenario 6 for several checkouts in one sitting: ``python -m bench.big_compare NAME=TREE ...``.

One Dovecot, one maildrop of ``--kept`` messages per side seeded identically (each connector side with a
ledger that knows them, as in scenario 6), then ``--rounds`` rounds in which ``--new`` messages arrive and
every side polls once: the bare loop and each named connector checkout (``before=/path/to/worktree``), the
order rotating so that each side goes first in turn. Optional load while the rounds run, stopped at the
end: ``--busy N`` processes spinning on the CPU, ``--alongside CMD`` a command (e.g. another benchmark)
started in a session of its own and ended with it. Prints each poll and the medians (time, CPU of the
poll's process, ratio to the bare loop). Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import data
from bench.run import Bench, Sizes
from bench.setup import endpoint, prime_ledger, uidls
from tests.servers.dovecot import Dovecot

BARE = "baseline"


def _load(busy: int, alongside: str | None) -> list[subprocess.Popen[bytes]]:
    started = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    if alongside:
        started.append(
            subprocess.Popen(
                alongside,
                shell=True,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        time.sleep(8)  # past its start-up, into its work
    return started


def _stop(started: list[subprocess.Popen[bytes]], alongside: bool) -> None:
    for index, process in enumerate(started):
        if alongside and index == len(started) - 1:
            os.killpg(process.pid, signal.SIGTERM)  # the command's whole session, e.g. its Dovecot
        else:
            process.kill()
        process.wait()


def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    trees = dict(tree.split("=", 1) for tree in args.trees)
    sides = [BARE, *trees]
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    work = Path(tempfile.mkdtemp(prefix="pop-connector-big-"))
    with Dovecot(reuse_processes=True) as dovecot:
        bench = Bench(dovecot, work, Sizes(), use_fetchmail=False, profile=None)
        old = data.messages(args.kept, 1024)
        users = {side: (bench._user(f"big{side}", old), bench._user(f"big{side}dst")) for side in sides}
        for side, (source, _destination) in users.items():
            listed = uidls(endpoint(dovecot, source))  # Dovecot indexes the maildrop outside the timing
            if side != BARE:
                prime_ledger(bench._database(f"big{side}"), {source.name: listed})
        load = _load(args.busy, args.alongside)
        try:
            for round_ in range(args.rounds):
                fresh = [data.message(args.kept + round_ * args.new + n, 5 * 1024) for n in range(args.new)]
                turn = round_ % len(sides)
                for side in sides[turn:] + sides[:turn]:
                    source, destination = users[side]
                    known = uidls(endpoint(dovecot, source))
                    dovecot.seed(source.name, fresh)
                    if side == BARE:
                        known_file = work / "known.txt"
                        known_file.write_text("\n".join(known))
                        bench.connector_root = None
                        result = bench._baseline("new", [source], destination, known=str(known_file))
                    else:
                        bench.connector_root = Path(trees[side]).resolve()
                        database = bench._database(f"big{side}")
                        result = bench._connector(
                            f"big{side}", [source], destination, database=database, retention="keep"
                        )
                    if result["count"] != args.new:
                        raise RuntimeError(f"{side}: moved {result['count']} messages, expected {args.new}")
                    results[side].append(result)
                    print(f"round {round_} {side:>10}: {result['seconds']:.3f} s ({result['cpu']:.3f} s CPU)")
        finally:
            _stop(load, bool(args.alongside))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.big_compare", description=__doc__)
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a checkout whose connector polls")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--kept", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile")
    parser.add_argument("--alongside", help="a shell command run meanwhile (its own session, ended after)")
    args = parser.parse_args(argv)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    results = run(args)
    bare = statistics.median(r["seconds"] for r in results[BARE])
    for side, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        print(f"{side:>10}: median {seconds:.3f} s ({cpu:.3f} s CPU), ratio {bare / seconds:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
