"""The long-running service: every account polled on its own schedule by APScheduler 3.

Each account is one date-triggered job that, when its poll ends, schedules the next one at the time the
engine chose (the interval with jitter after success, the retry back-off after failure). One job per account
means two polls of one account never overlap; the executor's size is ``max_workers``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from connector.config import Account, Config
from connector.engine import PollResult, SyncEngine
from connector.ledger.store import Ledger

log = logging.getLogger("connector.scheduler")


class Service:
    def __init__(
        self,
        config: Config,
        engine: SyncEngine,
        ledger: Ledger,
        *,
        on_result: Callable[[PollResult], None] | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.ledger = ledger
        self.stop = threading.Event()
        self._on_result = on_result
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(config.service.max_workers)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )

    def accounts(self) -> list[Account]:
        return [account for account in self.config.accounts if account.enabled]

    def start(self) -> None:
        """Schedule every enabled account: due ones (or never polled ones) at once."""
        now = self.engine.clock()
        next_polls = {status.name: status.next_poll_at for status in self.ledger.statuses()}
        for account in self.accounts():
            when = next_polls.get(account.name)
            self._schedule(account, when if when is not None and when > now else now)
        self._scheduler.start()
        log.info(
            "service started: %d accounts, at most %d polled at once",
            len(self.accounts()),
            self.config.service.max_workers,
        )

    def run_until_stopped(self) -> None:
        self.start()
        self.stop.wait()
        self.shutdown()

    def shutdown(self) -> None:
        """Polls in flight finish their current message (they watch ``self.stop``), then QUIT."""
        self.stop.set()
        log.info("stopping: waiting for polls in flight to finish their current message")
        self._scheduler.shutdown(wait=True)
        log.info("service stopped")

    def _schedule(self, account: Account, when: datetime) -> None:
        self._scheduler.add_job(
            self._poll,
            trigger="date",
            run_date=when,
            args=[account],
            id=account.name,
            name=f"poll {account.name}",
            replace_existing=True,
        )

    def _poll(self, account: Account) -> None:
        if self.stop.is_set():
            return
        try:
            result = self.engine.poll(account, stop=self.stop)
        except Exception:  # the schedule must survive a bug in one poll
            log.exception("account %s: poll crashed", account.name)
            result = PollResult(account=account.name, status="error", error="internal error (see log)")
        if self._on_result is not None:
            self._on_result(result)
        if self.stop.is_set():
            return
        when = result.next_poll_at or self.engine.clock() + account.retry.initial_backoff
        log.info("account %s: next poll at %s", account.name, when.isoformat(timespec="seconds"))
        self._schedule(account, when)
