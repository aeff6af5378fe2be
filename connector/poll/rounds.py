"""One round of polls of many accounts (``sync``, the benchmarks): each account polled once.

The accounts the idle probe may try (probe.py) are probed in this thread while the others' full polls
already run in the pool; each one the probe hands over is polled in full as soon as it does.
Results come back in the order of the accounts given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from connector.config import Account
from connector.poll.engine import SyncEngine
from connector.poll.probe import IdleProbe, in_batches
from connector.poll.result import PollResult


def poll_round(
    engine: SyncEngine,
    accounts: Sequence[Account],
    *,
    workers: int,
    stop: threading.Event | None = None,
    full_poll: Callable[[Account], PollResult] | None = None,
) -> list[PollResult]:
    """Every account in ``accounts`` polled once, at most ``workers`` full polls at a time (and as many
    probe sessions); ``full_poll``: how one account is polled in full (default ``engine.poll``)."""
    stop = stop or threading.Event()
    poll = full_poll or (lambda account: engine.poll(account, stop=stop))
    probe = IdleProbe(engine, at_once=workers)
    probed = [account for account in accounts if probe.refusal(account) is None]
    results: dict[str, PollResult | Future[PollResult]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        taken = {account.name for account in probed}
        for account in accounts:
            if account.name not in taken:
                results[account.name] = pool.submit(poll, account)

        def done(account: Account, result: PollResult | None, wait: float) -> None:
            # A hand-over is polled in full at once, while the probe goes on with the others.
            if result is not None:
                results[account.name] = result
            else:
                results[account.name] = pool.submit(_after, wait, stop, poll, account)

        probe.serve(in_batches(probed), done, stop)
        for account in probed:  # not probed (a stop): the full poll sees the stop too
            if account.name not in results:
                results[account.name] = pool.submit(poll, account)
    return [_value(results[account.name]) for account in accounts]


def _after(
    seconds: float, stop: threading.Event, poll: Callable[[Account], PollResult], account: Account
) -> PollResult:
    """``poll(account)`` once ``seconds`` have passed (the server's LOGIN-DELAY since the probe's login)."""
    if seconds and stop.wait(seconds):
        return PollResult(account=account.name, status="stopped")
    return poll(account)


def _value(entry: PollResult | Future[PollResult]) -> PollResult:
    return entry.result() if isinstance(entry, Future) else entry
