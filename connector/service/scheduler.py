"""The long-running service: every account polled on its own schedule by APScheduler 3.

When each account is first polled (at start, and after a reload adds accounts) is policies/schedule.py's
rule: accounts that are due are spread out at the rate the configuration needs, not all started at once.

Each account is one date-triggered job that, when its poll ends, schedules the next one at the time the
engine chose (the interval with jitter after success, the retry back-off after failure). One job per account
means two polls of one account never overlap. A job only hands its poll over: full polls run in the
service's pool of ``max_workers`` threads. Each job knows when it was due, so the service reports every
poll's scheduling lag (due to started, the wait for a free worker included) to ``on_lag``.

With an idle probe (connector/poll/probe.py; `run` has one), a job whose account the probe may try only
hands the account to the probe's thread (connector/poll/feeder.py) and returns: that thread probes the
accounts as they come, records the idle ones, and hands each of the others to the pool for a full poll.
Either way the poll's end schedules the account's next one, and the account counts as running until then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from datetime import datetime, timedelta
from functools import partial

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from connector.config import Account, Config, enabled_by_name
from connector.ledger.store import Ledger
from connector.policies.schedule import FirstPoll, Waiting, Why, first_polls, polls_per_second, spread
from connector.poll.engine import SyncEngine
from connector.poll.feeder import ProbeFeeder, Verdict
from connector.poll.probe import IdleProbe
from connector.poll.result import PollResult
from connector.service.reload import AccountChanges, account_changes

log = logging.getLogger("connector.service.scheduler")


_UNLIMITED = 1 << 30
# The scheduler's own threads: its jobs only hand each poll to the poll pool or to the idle probe.
_DISPATCHERS = 2
# Up to this many accounts, start-up logs each one's first poll time at INFO; above, one summary line (each
# account's line is then DEBUG): a start of 1,000 accounts should stay readable.
PER_ACCOUNT_LINES = 20


class Service:
    def __init__(
        self,
        config: Config,
        engine: SyncEngine,
        ledger: Ledger,
        *,
        on_result: Callable[[PollResult], None] | None = None,
        on_lag: Callable[[float], None] | None = None,
        probe: IdleProbe | None = None,
    ) -> None:
        self.config = config
        # Each poll looks its account up (a reload may have changed it): by name, not a scan of the list,
        # which with 1,000 accounts cost more than the rest of the scheduling of a poll.
        self._enabled = enabled_by_name(config)
        self.engine = engine
        self.ledger = ledger
        self.stop = threading.Event()
        self._on_result = on_result
        # Seconds from when a poll was due to when it started (a poll waits for a free worker).
        self._on_lag = on_lag
        self._running: set[str] = set()  # only touched by add/discard, which are atomic
        # Every full poll runs here: at most max_workers at a time. The scheduler's jobs only hand polls
        # to this pool or to the probe, so a poll the probe hands back is polled here too, without going
        # through the scheduler again.
        self._polls = futures.ThreadPoolExecutor(config.service.max_workers, thread_name_prefix="poll")
        # The idle probe's thread, started with the scheduler (None: every poll is a full one).
        self._probe = ProbeFeeder(probe, self.stop) if probe is not None else None
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(_DISPATCHERS)},
            # No instance limit: a poll job adds the account's next run before it returns, and when that run
            # is already due (a poll longer than the interval, a slow end) a limit makes APScheduler skip it,
            # and a skipped date job is gone: the account would never be polled again. One account is still
            # never polled twice at once: each run adds the next only once its poll (and lease) is over.
            job_defaults={"coalesce": True, "max_instances": _UNLIMITED, "misfire_grace_time": None},
            timezone="UTC",
        )

    def accounts(self) -> list[Account]:
        return list(self._enabled.values())

    def _current(self, name: str) -> Account | None:
        return self._enabled.get(name)

    def scheduled(self) -> dict[str, datetime]:
        """When each account waiting in the scheduler is due (accounts being polled are not listed)."""
        jobs = self._scheduler.get_jobs()
        return {job.id: job.next_run_time for job in jobs if job.next_run_time is not None}

    def reload(self, config: Config) -> AccountChanges:
        """Use a new configuration: removed accounts are unscheduled, added and changed ones polled now (as
        many as the workers), the rest spread at the rate the configuration needs (policies/schedule.py).

        A poll in flight finishes with the settings it started with and is then rescheduled with the new
        ones (or not at all if its account is gone). [service] settings need a restart.
        """
        changes = account_changes(self.config, config)
        self.config = config
        self._enabled = enabled_by_name(config)
        self.engine.config = config
        for name in changes.removed:
            try:
                self._scheduler.remove_job(name)
            except JobLookupError:  # it may be running right now
                continue
            # Its next poll is dropped, one waiting for its server's LOGIN-DELAY (_probed) included: the
            # account is no longer running, and polled again if a later reload adds it back.
            self._running.discard(name)
        now = self.engine.clock()
        waiting = {
            account.name: account
            for name in changes.added + changes.changed
            if (account := self._current(name)) is not None and name not in self._running
        }
        rate = polls_per_second(account.poll_interval for account in self.accounts())
        plan = spread(
            [Waiting(account.name, account.poll_interval) for account in waiting.values()],
            now,
            rate=rate,
            at_once=config.service.max_workers,
        )
        for name, account in waiting.items():
            self._schedule(account, plan[name].when)
        spread_out = [first.spread_over for first in plan.values() if first.spread_over is not None]
        if spread_out:
            log.info(
                "reload: %d added or changed accounts polled now, %d spread over %s from now (%.1f polls/s)",
                len(plan) - len(spread_out),
                len(spread_out),
                _seconds(max(spread_out)),
                rate,
            )
        return changes

    def start(self, *, poll_now: bool = False) -> None:
        """Schedule every enabled account (policies/schedule.py): at the next poll time its last poll chose
        (a ``sync``'s too); due ones and never polled ones now when they are few, spread at the rate the
        configuration needs when they are many; all at once with ``poll_now``. Each account's first poll
        time is logged (a service that waits silently looks stuck), or one summary for many accounts."""
        now = self.engine.clock()
        next_polls = {status.name: status.next_poll_at for status in self.ledger.statuses()}
        accounts = self.accounts()
        plan = first_polls(
            [
                Waiting(account.name, account.poll_interval, next_polls.get(account.name))
                for account in accounts
            ],
            now,
            at_once=self.config.service.max_workers,
            poll_now=poll_now,
        )
        level = logging.INFO if len(accounts) <= PER_ACCOUNT_LINES else logging.DEBUG
        for account in accounts:
            first = plan[account.name]
            self._schedule(account, first.when)
            log.log(
                level,
                "account %s: first poll %s",
                account.name,
                first_poll_reason(first),
                extra={"account": account.name},
            )
        if len(accounts) > PER_ACCOUNT_LINES:
            log.info("first polls of %s", first_polls_summary(plan.values()))
        self._scheduler.start()
        if self._probe is not None:
            self._probe.start()
        log.info(
            "service started: %d accounts, at most %d polled at once",
            len(accounts),
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
        if self._probe is not None:
            self._probe.join()  # its sessions in flight end; accounts still queued are not polled
        self._scheduler.shutdown(wait=True)
        self._polls.shutdown(wait=True)
        log.info("service stopped")

    def _schedule(self, account: Account, when: datetime) -> None:
        self._scheduler.add_job(
            self._poll,
            trigger="date",
            run_date=when,
            args=[account, when],
            id=account.name,
            name=f"poll {account.name}",
            replace_existing=True,
        )

    def _poll(self, account: Account, due: datetime) -> None:
        """The scheduler's job: the account's poll handed to the idle probe or to the poll pool."""
        if self.stop.is_set():
            return
        self._running.add(account.name)
        probe = self._probe
        if probe is not None and probe.takes(account):  # not after the probe's thread failed
            self._lag(due)
            # The probe's thread tells what became of it (_probed), once.
            probe.hand_in(account).add_done_callback(partial(self._probed, account))
            return
        self._polls.submit(self._poll_in_full, account, due)

    def _lag(self, due: datetime) -> None:
        if self._on_lag is not None:
            try:
                self._on_lag((self.engine.clock() - due).total_seconds())
            except Exception:  # watching the schedule must never break it
                log.exception("reporting the scheduling lag failed")

    def _poll_in_full(self, account: Account, due: datetime | None) -> None:
        """A full poll, in the pool; ``due``: when it was due (None: handed over by the probe)."""
        if self.stop.is_set():
            self._running.discard(account.name)
            return
        if due is not None:
            self._lag(due)  # the wait for a free worker included
        try:
            result = self.engine.poll(account, stop=self.stop)
        except Exception:  # the schedule must survive a bug in one poll
            log.exception("account %s: poll crashed", account.name, extra={"account": account.name})
            result = PollResult(account=account.name, status="error", error="internal error (see log)")
        self._finished(account, result)

    def _probed(self, account: Account, told: futures.Future[Verdict]) -> None:
        """What the probe made of ``account``'s poll: recorded (``result``), or to be polled in full, not
        sooner than ``wait`` seconds (the server's LOGIN-DELAY since the probe's login); after the probe's
        thread failed, in full."""
        verdict = told.result()
        wait = verdict.wait
        if verdict.result is not None:
            self._finished(account, verdict.result)
        elif self.stop.is_set():
            self._running.discard(account.name)
        elif wait and self._current(account.name) is None:
            # Removed by a reload while the probe had it: a poll that would wait for the server's
            # LOGIN-DELAY is dropped, as reload drops one already waiting; a later reload that adds the
            # account back polls it then.
            self._running.discard(account.name)
        elif wait:
            self._scheduler.add_job(
                self._polls.submit,
                trigger="date",
                run_date=self.engine.clock() + timedelta(seconds=wait),
                args=[self._poll_in_full, account, None],
                id=account.name,
                name=f"poll {account.name}",
                replace_existing=True,
            )
        else:
            self._polls.submit(self._poll_in_full, account, None)

    def _finished(self, account: Account, result: PollResult) -> None:
        """The poll of ``account`` is over: report it and schedule the account's next poll."""
        self._running.discard(account.name)
        if self._on_result is not None:
            self._on_result(result)
        current = self._current(account.name)  # a reload may have changed or removed it meanwhile
        if self.stop.is_set() or current is None:
            return
        account = current
        when = result.next_poll_at or self.engine.clock() + account.retry.initial_backoff
        log.log(
            logging.DEBUG if result.idle else logging.INFO,
            "account %s: next poll at %s",
            account.name,
            when.isoformat(timespec="seconds"),
            extra={"account": account.name},
        )
        self._schedule(account, when)


def first_poll_reason(first: FirstPoll) -> str:
    """When an account is first polled after a start, and why."""
    at = first.when.isoformat(timespec="seconds")
    if first.why is Why.STORED:
        return f"at {at}, the next poll time its last poll chose (run --now polls at once)"
    if first.spread_over is None:
        return f"now ({first.why.value})"
    return (
        f"at {at} ({first.why.value}; one of {first.spread_among} due accounts spread over "
        f"{_seconds(first.spread_over)} from now)"
    )


def first_polls_summary(plan: Iterable[FirstPoll]) -> str:
    """One line for a start of many accounts: how many are polled now, spread out, and later."""
    firsts = list(plan)
    if any(first.why is Why.ASKED for first in firsts):
        return f"all {len(firsts)} accounts now (run --now)"
    spread_out = [first.spread_over for first in firsts if first.spread_over is not None]
    stored = [first.when for first in firsts if first.why is Why.STORED]
    parts = [f"{len(firsts) - len(spread_out) - len(stored)} now"]
    if spread_out:
        parts.append(
            f"{len(spread_out)} spread over the next {_seconds(max(spread_out))} (due or never polled: at "
            "the rate their poll intervals need, not all at once)"
        )
    if stored:
        parts.append(
            f"{len(stored)} at the next poll time their last poll chose, the first at "
            f"{min(stored).isoformat(timespec='seconds')} (run --now polls at once)"
        )
    return f"{len(firsts)} accounts: " + ", ".join(parts)


def _seconds(duration: timedelta) -> str:
    return f"{duration.total_seconds():.0f}s"
