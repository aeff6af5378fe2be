"""Distributed mode (``[service] mode = "distributed"``): several workers sharing one PostgreSQL database,
coordinated by procrastinate. See docs/scaling.md.

queue_schema.py  procrastinate's own tables (schema ``procrastinate``), created and upgraded at start-up
registry.py      the accounts table as the shared registry: sync from config, due accounts, poll claims
config_watch.py  re-reading a changed configuration file without a restart
worker.py        the procrastinate app: the periodic dispatch task and the poll task
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from connector.config import Config
from connector.service.distributed.queue_schema import ensure_queue_schema
from connector.service.distributed.registry import SyncSummary, sync_accounts

if TYPE_CHECKING:
    from connector.poll.result import PollResult

__all__ = ["SyncSummary", "ensure_queue_schema", "run_worker", "sync_accounts"]

log = logging.getLogger(__name__)


def _log_result(result: PollResult) -> None:
    from connector.cli.report import log_poll_line

    log_poll_line(log, result)


def run_worker(config: Config) -> bool:
    """``pop-connector run`` in distributed mode. True when stopped by a signal, False on failure."""
    from connector.service.distributed.worker import DistributedWorker, worker_engine

    assert config.service.database is not None
    engine = worker_engine(config.service.database, config.service.max_workers)
    try:
        ensure_queue_schema(engine)
        summary = sync_accounts(engine, config.accounts)
        log.info(
            "accounts in the database: %d new, %d active, %d inactive",
            summary.added,
            summary.active,
            summary.inactive,
        )
        worker = DistributedWorker(config, engine, on_result=_log_result)
        return worker.run()
    finally:
        engine.dispose()
