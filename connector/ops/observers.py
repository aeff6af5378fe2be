"""The observers the services give their polls, and the operations listener that reads them.

``run`` and each distributed worker build their ``SyncEngine`` with ``standard_observers()``: Prometheus
metrics and the health monitor, read by the listener of ``connector.ops.web``, and the quarter-hourly
summary line (``connector.ops.summary``). ``sync`` serves no listener
and gives its engine only its progress display (connector/ops/progress.py). The engine adds the
per-message log lines itself (``PollLog``), so that no engine, whoever builds it, polls without them. The
listener adds to the metrics the series it reads at each scrape (``ServiceSeries``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from connector.config import Config
from connector.ledger.store import Ledger
from connector.ops.health import HealthMonitor, overdue_accounts
from connector.ops.metrics import PollMetrics, ServiceSeries
from connector.ops.summary import PollSummary
from connector.ops.web import Operations, OpsServer
from connector.poll.events import PollObserver


@dataclass(frozen=True)
class StandardObservers:
    metrics: PollMetrics
    health: HealthMonitor
    summary: PollSummary

    def all(self) -> list[PollObserver]:
        """For ``SyncEngine(..., observers=...)``."""
        return [self.metrics, self.health, self.summary]


def standard_observers() -> StandardObservers:
    return StandardObservers(PollMetrics(), HealthMonitor(), PollSummary())


def operations_listener(
    config: Callable[[], Config],
    ledger: Ledger,
    observers: StandardObservers,
    overdue: Callable[[Config], int] | None = None,
) -> OpsServer | None:
    """The listener of ``[service] metrics`` (not started yet), or None when it is not configured.
    ``config`` is read at each request: a reload replaces the configuration, not the listener's address.
    ``overdue`` counts the overdue accounts for ``/metrics``; by default the health monitor's due times
    tell (``run``: its scheduler reports them), a distributed worker asks the accounts table."""
    address = config().service.metrics
    if address is None:
        return None
    health = observers.health
    series = ServiceSeries(config, ledger, overdue or (lambda c: overdue_polls(health, c)))
    return OpsServer(address, Operations(config, ledger, observers.metrics, health, series))


def overdue_polls(health: HealthMonitor, config: Config) -> int:
    """Accounts due more than ``health_grace`` ago whose poll has not started, by the health monitor: the
    accounts of ``/healthz``'s ``scheduler stuck``."""
    return len(overdue_accounts(health.due(), datetime.now(UTC), config.service.health_grace))
