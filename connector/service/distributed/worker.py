"""A distributed worker: procrastinate runs the jobs, the sync engine does the polls.

Every worker runs the same two tasks:

- ``dispatch``, a periodic task (every ``dispatch_interval``; procrastinate defers each tick once for all
  workers): re-queues the jobs of workers that stopped sending heartbeats, re-reads the configuration
  file when it changed, then queues a ``poll`` job for every active account that is due and has none.
- ``poll``, one account: its ``queueing_lock`` keeps one waiting job per account and its ``lock`` one
  running job per account; under an advisory lock of its own it checks the account is still due, records
  this worker as the account's ``last_worker`` and polls it as the single-process service does: an
  account the idle probe may try (connector/poll/probe.py) goes to the worker's probe thread, and the job
  waits, still holding the lock, for its verdict; an idle poll the probe recorded is the job's result,
  anything else is polled by ``SyncEngine.poll`` in the job's own thread.

Besides, each worker checks its configuration file every ``dispatch_interval``, busy or idle, and serves
the operations listener of ``[service] metrics`` (``/metrics``, ``/healthz``, the status page) like ``run``,
fed by its own polls through the same observers (``connector.ops.observers``). Every line it logs about an
account carries ``account`` in the log context, procrastinate's lines about a poll job too.

A worker that comes back from a pause longer than ``stalled_after`` (SIGSTOP, a frozen VM) while another
worker started finds that the queue has forgotten it (its worker row pruned, its jobs queued again): it
lets its running polls end, registers again with a new procrastinate worker and goes on; each of its jobs
that another worker took over meanwhile ends with one warning line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from procrastinate import App, JobContext, PsycopgConnector
from procrastinate.exceptions import AlreadyEnqueued, ConnectorException
from procrastinate.jobs import Job
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from connector.config import Account, Config
from connector.connections import Connections
from connector.ledger.records import utcnow
from connector.ledger.store import Ledger
from connector.ops.logs import log_context
from connector.ops.observers import operations_listener, standard_observers
from connector.poll.engine import SyncEngine
from connector.poll.feeder import ProbeFeeder
from connector.poll.probe import IdleProbe
from connector.poll.result import PollResult
from connector.service.distributed.config_watch import ConfigWatch
from connector.service.distributed.queue_schema import SEARCH_PATH_OPTION
from connector.service.distributed.registry import (
    claimed,
    count_overdue,
    due_accounts,
    poll_lock_name,
    sync_accounts,
)

log = logging.getLogger(__name__)

POLL_TASK = "pop_connector.poll"
DISPATCH_TASK = "pop_connector.dispatch"
_DEFER_BATCH = 500
# procrastinate runs waiting jobs by priority, then in the order they were queued. The dispatch must not
# wait behind the poll jobs: with every account due at once (100,000 after an outage) it would wait until
# the whole backlog was polled, and the stalled jobs of a dead worker and a changed configuration with it.
DISPATCH_PRIORITY = 10


def libpq_url(database: str) -> str:
    """The SQLAlchemy URL as libpq (psycopg) takes it: same host, user, password and parameters."""
    return make_url(database).set(drivername="postgresql").render_as_string(hide_password=False)


def worker_engine(database: str, max_workers: int) -> Engine:
    """Each running poll holds one connection for its account lock and briefly borrows one for each
    ledger write; connections open only when needed, so most workers use about ``max_workers + 2``."""
    return create_engine(
        make_url(database), pool_size=max_workers + 2, max_overflow=max_workers, pool_pre_ping=True
    )


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DistributedWorker:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        connections: Connections | None = None,
        on_result: Callable[[PollResult], None] | None = None,
        probe_type: type[IdleProbe] = IdleProbe,
    ) -> None:
        assert config.service.database is not None
        self.service = config.service
        self.name = config.service.worker_name or default_worker_name()
        self.engine = engine
        self.ledger = Ledger(engine)
        self.watch = ConfigWatch(config)
        self.connections = connections or Connections()
        self.stop = threading.Event()
        self._on_result = on_result
        self.observers = standard_observers()
        # The listener reads the configuration of the moment (``watch``); its address is read once, here.
        self.server = operations_listener(
            self.watch.current,
            self.ledger,
            self.observers,
            # The job queue, not this worker, knows which accounts wait: ask the accounts table.
            lambda config: count_overdue(self.engine, utcnow(), config.service.health_grace),
        )
        self._probe_type = probe_type
        # The engine of the configuration of the moment and its idle probe's thread (_sync_engine).
        self._engine: SyncEngine | None = None
        self._probe: ProbeFeeder | None = None
        self._engine_lock = threading.Lock()
        self._polls = ThreadPoolExecutor(config.service.max_workers, thread_name_prefix="poll")
        self._db = ThreadPoolExecutor(1, thread_name_prefix="dispatch")
        self.app = App(
            connector=PsycopgConnector(
                conninfo=libpq_url(config.service.database),
                kwargs={"options": SEARCH_PATH_OPTION},
                min_size=1,
                max_size=4,
            )
        )
        self.poll_task = self.app.task(name=POLL_TASK)(self._poll_job)
        seconds = int(config.service.dispatch_interval.total_seconds())
        cron = "* * * * *" if seconds == 60 else f"* * * * * */{seconds}"
        dispatch = self.app.task(name=DISPATCH_TASK, queueing_lock=DISPATCH_TASK, priority=DISPATCH_PRIORITY)(
            self._dispatch_job
        )
        self.app.periodic(cron=cron, periodic_id="dispatch")(dispatch)
        # procrastinate logs each job's start and end from its own loop, outside any poll's log context.
        tag_poll_jobs(logging.getLogger("procrastinate.worker"))
        tag_poll_jobs(logging.getLogger("procrastinate.worker").getChild(self.name))

    # --- running ------------------------------------------------------------------------------------

    def run(self) -> bool:
        """Work until SIGTERM/SIGINT (True) or until the worker fails on its own (False)."""
        if self.server is not None:
            self.server.start()
        try:
            return asyncio.run(self._main())
        finally:
            self._polls.shutdown(wait=True)  # a poll waiting for the probe's verdict gets it: see feeder.py
            self._db.shutdown(wait=True)
            with self._engine_lock:
                probe = self._probe
            if probe is not None:  # a worker that failed on its own has no stop set
                probe.close()
                probe.join()
            if self.server is not None:
                self.server.stop()

    async def _main(self) -> bool:
        loop = asyncio.get_running_loop()
        async with self.app.open_async():
            watcher = asyncio.create_task(self._watch_config())
            # The procrastinate worker of the moment: a new one after the queue forgot this worker.
            current: list[asyncio.Task[None]] = []
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._request_stop, signum, current)
            log.info(
                "worker %s started: at most %d accounts polled at once, dispatch every %ss",
                self.name,
                self.service.max_workers,
                int(self.service.dispatch_interval.total_seconds()),
            )
            try:
                while not self.stop.is_set():
                    current[:] = [asyncio.create_task(self._run_procrastinate())]
                    try:
                        await current[0]
                    except asyncio.CancelledError:
                        break
                    except ConnectorException as exc:
                        if not worker_row_pruned(exc):
                            raise
                        if not self.stop.is_set():
                            self._log_pruned()
                        continue
                    break
            finally:
                watcher.cancel()
        log.info("worker %s stopped", self.name)
        return self.stop.is_set()

    async def _run_procrastinate(self) -> None:
        """One procrastinate worker: registers a worker row, runs jobs until stopped, removes its row."""
        await self.app.run_worker_async(
            name=self.name,
            # One slot more than polls: the dispatch job must never wait behind them.
            concurrency=self.service.max_workers + 1,
            install_signal_handlers=False,
            update_heartbeat_interval=self.service.heartbeat_interval.total_seconds(),
            stalled_worker_timeout=self.service.stalled_after.total_seconds(),
            delete_jobs="successful",
            worker_middleware=[_watch_job_end],
        )

    def _log_pruned(self) -> None:
        log.warning(
            "worker %s: the job queue had removed this worker: it sent no heartbeat for more than "
            "stalled_after (%ss; the process was paused or its machine frozen) while another worker "
            "started; its jobs were handed to the other workers. Registering again and going on",
            self.name,
            int(self.service.stalled_after.total_seconds()),
        )

    def _request_stop(self, signum: int, current: list[asyncio.Task[None]]) -> None:
        log.warning(
            "received %s: finishing the current message of each poll, then stopping",
            signal.Signals(signum).name,
        )
        self.stop.set()
        for worker in current:
            worker.cancel()

    # --- poll ---------------------------------------------------------------------------------------

    async def _poll_job(self, account: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._polls, self.poll_account, account)

    def poll_account(self, name: str) -> str:
        """One poll job: the configured account, claimed, polled by the sync engine. Never raises."""
        with log_context(name):
            return self._poll_account(name)

    def _poll_account(self, name: str) -> str:
        if self.stop.is_set():
            # Fetched just before the stop: leave the account due for the workers that stay.
            return "stopped"
        config, account = self.watch.account(name)
        if account is None:
            log.warning("account %s: not an enabled account in this worker's configuration; skipped", name)
            return "skipped"
        try:
            with claimed(self.engine, name, self.name, utcnow()) as claim:
                if claim.reason is not None:
                    log.info("account %s: poll skipped: %s", name, claim.reason)
                    return "skipped"
                log.info("account %s: poll started on worker %s", name, self.name)
                if claim.due_at is not None:
                    self.observers.metrics.observe_lag((utcnow() - claim.due_at).total_seconds())
                result = self._run_engine(config, account, claim.account_id)
                log.info("account %s: poll finished on worker %s: %s", name, self.name, result.status)
        except Exception:  # the job must end; the dispatcher queues the account again when it is due
            log.exception("account %s: poll job failed", name)
            return "error"
        if self._on_result is not None:
            self._on_result(result)
        return result.status

    def _run_engine(self, config: Config, account: Account, account_id: int | None) -> PollResult:
        engine, probe = self._sync_engine(config)
        if probe is not None and probe.takes(account):  # not after the probe's thread failed
            # Still under the claim: the probe writes only through the lease (Leases.pass_through), and no
            # other worker polls the account while this job waits.
            verdict = probe.hand_in(account).result()
            if verdict.result is not None:
                return verdict.result
            # Handed over: the full poll, once the server's LOGIN-DELAY since the probe's login is over.
            if self.stop.is_set() or (verdict.wait and self.stop.wait(verdict.wait)):
                # Left due, as a job fetched just before a stop: a worker that stays polls it.
                return PollResult(account=account.name, status="stopped")
        try:
            return engine.poll(account, stop=self.stop)
        except Exception:
            # A bug in one poll: back off like a failed poll instead of being queued again every tick.
            log.exception("account %s: poll crashed", account.name)
            if account_id is not None:
                self.ledger.set_next_poll(account_id, utcnow() + account.retry.initial_backoff)
            return PollResult(account=account.name, status="error", error="internal error (see log)")

    def _sync_engine(self, config: Config) -> tuple[SyncEngine, ProbeFeeder | None]:
        """One engine per configuration, shared by the polls that run at once (as in ``run``): one event
        bus, so the observers get one event at a time; a changed configuration gets a new engine.

        Each engine gets an idle probe thread of its own, and the old one is closed: it ends once the
        polls handed to it are done. The probe emits its polls' events on its engine's bus, so a probe
        kept across a reload would emit on the old engine's bus for ever, beside the new engine's polls;
        and one switched to the new engine would change engines between two of its batches, with
        sessions in flight. A probe whose thread failed is kept instead: every poll after it is a full
        one, as in ``run``, reloads or not."""
        with self._engine_lock:
            if self._engine is None or self._engine.config is not config:
                self._engine = SyncEngine(
                    config, self.ledger, self.connections, observers=self.observers.all()
                )
                old = self._probe
                if old is None or not old.failed:
                    self._probe = ProbeFeeder(
                        self._probe_type(self._engine, at_once=self.service.max_workers), self.stop
                    )
                    self._probe.start()
                    if old is not None:
                        old.close()
            return self._engine, self._probe

    # --- dispatch -----------------------------------------------------------------------------------

    async def _dispatch_job(self, timestamp: int) -> str:
        retried = await self._retry_stalled()
        due = await asyncio.get_running_loop().run_in_executor(self._db, self._due_accounts)
        queued = await self._queue_polls(due)
        if retried or queued:
            log.info("dispatch: %d polls queued, %d stalled jobs retried", queued, retried)
        return f"{queued} queued, {retried} retried"

    async def _retry_stalled(self) -> int:
        manager = self.app.job_manager
        stalled = await manager.get_stalled_jobs(
            seconds_since_heartbeat=self.service.stalled_after.total_seconds()
        )
        retried = 0
        for job in stalled:
            about = {"account": job.task_kwargs.get("account")}  # None for a dispatch job
            try:
                await manager.retry_job(job)
            except Exception:
                log.exception("cannot retry stalled job %s", job.call_string, extra=about)
                continue
            log.warning(
                "job %s of a worker that stopped sending heartbeats: queued again",
                job.call_string,
                extra=about,
            )
            retried += 1
        return retried

    async def _watch_config(self) -> None:
        """Every worker notices a changed file within one dispatch period, busy or not."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.service.dispatch_interval.total_seconds())
            try:
                await loop.run_in_executor(self._db, self._reload_if_changed)
            except Exception:
                log.exception("cannot apply the changed configuration")

    def _due_accounts(self) -> list[str]:
        self._reload_if_changed()
        return due_accounts(self.engine, utcnow())

    def _reload_if_changed(self) -> None:
        config, changed = self.watch.refresh()
        if changed:
            summary = sync_accounts(self.engine, config.accounts)
            log.info(
                "accounts written to the database: %d new, %d active, %d inactive",
                summary.added,
                summary.active,
                summary.inactive,
            )

    async def _queue_polls(self, names: list[str]) -> int:
        jobs = [self._poll_job_for(name) for name in names]
        manager = self.app.job_manager
        queued = 0
        for chunk in _chunks(jobs, _DEFER_BATCH):
            try:
                await manager.batch_defer_jobs_async(chunk)
                queued += len(chunk)
            except AlreadyEnqueued:
                # Another dispatch queued some of them meanwhile: the batch failed whole, go one by one.
                for job in chunk:
                    try:
                        await manager.defer_job_async(job)
                        queued += 1
                    except AlreadyEnqueued:
                        pass
        return queued

    def _poll_job_for(self, name: str) -> Job:
        lock = poll_lock_name(name)
        return self.poll_task.configure(lock=lock, queueing_lock=lock, task_kwargs={"account": name}).job


# --- a worker the queue gave up on -------------------------------------------------------------------
#
# procrastinate registers a worker row (procrastinate_workers) when its worker starts, and every starting
# worker deletes the rows whose heartbeat is older than its stalled_worker_timeout (our stalled_after);
# the jobs of a deleted row keep running in their process but lose their worker_id, so the dispatcher
# queues them again. A worker that was only paused (SIGSTOP, a frozen VM) comes back to find its row gone:
# its next job fetch fails on the jobs' foreign key to that row, and procrastinate never registers again.

_WORKER_ROW_CONSTRAINT = "procrastinate_jobs_worker_id_fkey"
_JOB_NOT_RUNNING = 'Job was not found or not in "doing"'


def worker_row_pruned(exc: BaseException) -> bool:
    """The job fetch failed because this worker's row was deleted by another worker."""
    cause = exc.__cause__
    if not isinstance(exc, ConnectorException) or not isinstance(cause, psycopg.errors.ForeignKeyViolation):
        return False
    return cause.diag.constraint_name == _WORKER_ROW_CONSTRAINT or _WORKER_ROW_CONSTRAINT in str(cause)


def job_taken_over(exc: BaseException) -> bool:
    """Recording a job's end failed because it is no longer this worker's: after a pause it was queued
    again, and another worker ran it (and deleted it) or runs it now."""
    return isinstance(exc, ConnectorException) and _JOB_NOT_RUNNING in str(exc.__cause__ or exc)


async def _watch_job_end(call_next: Callable[[], Awaitable[Any]], context: JobContext, _worker: Any) -> Any:
    """procrastinate's worker middleware around every job, in the job's own asyncio task. The task also
    records the job's end after the job; if that fails, nobody reads the exception and asyncio logs
    "Task exception was never retrieved" with a traceback. The task's end is read here instead."""
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(functools.partial(job_ended, context.job))
    return await call_next()


def job_ended(job: Job, task: asyncio.Future[Any]) -> None:
    """A job's asyncio task ended: one warning line when the queue had handed the job to another worker,
    an error with its traceback for any other failure to record its end."""
    if task.cancelled() or (exc := task.exception()) is None:
        return
    account = job.task_kwargs.get("account") if job.task_name == POLL_TASK else None
    what = f"account {account}: poll job" if account is not None else f"job {job.call_string}"
    if job_taken_over(exc):
        log.warning(
            "%s was taken over by another worker while this one sent no heartbeats (paused longer than "
            "stalled_after): the queue no longer has it as this worker's, so its end is not recorded",
            what,
            extra={"account": account},
        )
    else:
        log.error("%s: cannot record its end in the queue", what, exc_info=exc, extra={"account": account})


_POLL_CALL = re.compile(re.escape(POLL_TASK) + r"\[\d*\]\(account='([^']+)'\)")


class _PollJobAccount(logging.Filter):
    """Puts the account of a poll job on procrastinate's records about it: from the job it attaches to the
    record, else from the job's call string in the text (``pop_connector.poll[7](account='alice')``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "account", None) is None:
            job = getattr(record, "job", None)
            if isinstance(job, dict) and job.get("task_name") == POLL_TASK:
                record.account = (job.get("task_kwargs") or {}).get("account")
            elif (match := _POLL_CALL.search(record.getMessage())) is not None:
                record.account = match.group(1)
        return True


def tag_poll_jobs(logger: logging.Logger) -> None:
    """Install ``_PollJobAccount`` on ``logger`` (once: every worker of a process asks)."""
    if not any(isinstance(f, _PollJobAccount) for f in logger.filters):
        logger.addFilter(_PollJobAccount())


def _chunks(items: list[Job], size: int) -> Iterator[list[Job]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
