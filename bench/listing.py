"""The CPU of a big listing's pure part: ``python -m bench.listing`` (issue 16, scenario 6's maildrop).

A UIDL reply body of ``--kept`` messages the ledger keeps plus ``--new`` new ones is parsed, checked for
identities (``needs_header_hash``, ``suspect_migration``) and planned (``plan_poll``), as a poll of that
maildrop does after the server's reply has arrived; in a process with the connector imported (a heap like
a poll's). Reported: the median and lowest CPU time of ``--runs`` runs, and how many full garbage
collections they set off. No server, no ledger: what the listing costs in Python alone, comparable between
two checkouts (``PYTHONPATH=OTHER_TREE python bench/listing.py`` measures another tree's connector with
this file). Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import connector.poll.engine  # noqa: F401  # a poll's heap: what a full collection has to go through
from connector.config import RetentionPolicy
from connector.ledger.records import KnownMessages
from connector.policies.uidl import needs_header_hash, suspect_migration
from connector.poll.plan import plan_poll
from connector.pop3.replies import parse_uidl_block_lenient


def _uidl(n: int) -> str:
    return f"{0x5F000000 + n:08x}.{n}"  # as Dovecot's default %08Xu%08Xv looks


def run(kept: int, new: int, runs: int) -> tuple[list[float], int]:
    block = b"".join(b"%d %s\r\n" % (n, _uidl(n).encode()) for n in range(1, kept + new + 1))
    known = KnownMessages({}, frozenset(_uidl(n) for n in range(1, kept + 1)))
    retention = RetentionPolicy(mode="keep")
    full: list[int] = []

    def count_full(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    gc.collect()
    gc.callbacks.append(count_full)
    times = []
    try:
        for _ in range(runs):
            start = time.process_time()
            listing, unlisted = parse_uidl_block_lenient(block)
            assert not unlisted and not needs_header_hash(listing, known)
            assert not suspect_migration(listing, known)
            plan = plan_poll(listing, known, retention, datetime.now(UTC))
            assert len(plan.deliver) == new, plan
            del listing, plan
            times.append(time.process_time() - start)
    finally:
        gc.callbacks.remove(count_full)
    return times, len(full)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listing", description=__doc__)
    parser.add_argument("--kept", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    times, full = run(args.kept, args.new, args.runs)
    print(
        f"listing of {args.kept} kept + {args.new} new: {statistics.median(times) * 1000:.1f} ms CPU median, "
        f"{min(times) * 1000:.1f} ms lowest, {full} full garbage collection(s) in {args.runs} runs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
