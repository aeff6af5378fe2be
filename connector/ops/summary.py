"""A line at INFO every quarter of an hour saying what the service's polls did.

A poll with nothing to do logs at DEBUG (``PollResult.idle``): 100,000 idle accounts would otherwise outrun
what journald takes. Without this line, a service whose mailboxes are empty would then say nothing for hours
after it started, and a person reading the journal could not tell a working service from a stuck one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from connector.poll.events import Finished, PollEvent

log = logging.getLogger("connector.ops.summary")

EVERY_SECONDS = 15 * 60


@dataclass
class _Counts:
    polls: int = 0
    idle: int = 0
    failed: int = 0
    delivered: int = 0
    deleted: int = 0
    quarantined: int = 0
    accounts: set[str] = field(default_factory=set)


class PollSummary:
    """Counts finished polls; the first to finish ``every`` seconds after the last line (or the start)
    logs the next one. Events come one at a time (``Observers``), so no lock is needed here."""

    def __init__(self, every: float = EVERY_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._since = clock()
        self._counts = _Counts()

    def notify(self, event: PollEvent) -> None:
        if not isinstance(event, Finished):
            return
        result, counts = event.result, self._counts
        counts.polls += 1
        counts.idle += result.idle
        counts.failed += result.poll_failed
        counts.delivered += result.delivered + result.recovered
        counts.deleted += result.deleted
        counts.quarantined += result.quarantined
        counts.accounts.add(event.account)
        now = self._clock()
        if now - self._since >= self._every:
            log.info("%s", summary_line(counts, now - self._since))
            self._since, self._counts = now, _Counts()


def summary_line(counts: _Counts, seconds: float) -> str:
    return (
        f"in the last {seconds / 60:.0f} min: {counts.polls} polls of {len(counts.accounts)} accounts, "
        f"{counts.idle} with nothing to do, {counts.failed} failed; {counts.delivered} messages delivered, "
        f"{counts.deleted} deleted, {counts.quarantined} quarantined"
    )
