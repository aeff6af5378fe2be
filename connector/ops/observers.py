"""The observers every run mode gives its polls, and the operations listener that reads them.

``sync``, ``run`` and each distributed worker build their ``SyncEngine`` with ``standard_observers()``:
Prometheus metrics and the health monitor (read by the listener of ``connector.ops.web``), plus the
progress display for ``sync``. The engine adds the per-message log lines itself (``PollLog``), so that no
engine, whoever builds it, polls without them. The listener adds to the metrics the series it reads at each
scrape (``ServiceSeries``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from connector.config import Config
from connector.ledger.store import Ledger
from connector.ops.health import HealthMonitor, overdue_accounts
from connector.ops.metrics import PollMetrics, ServiceSeries
from connector.ops.progress import SyncProgress
from connector.ops.web import Operations, OpsServer
from connector.poll.events import PollObserver


@dataclass(frozen=True)
class StandardObservers:
    metrics: PollMetrics
    health: HealthMonitor
    progress: SyncProgress | None = None

    def all(self) -> list[PollObserver]:
        """For ``SyncEngine(..., observers=...)``."""
        observers: list[PollObserver] = [self.metrics, self.health]
        if self.progress is not None:
            observers.append(self.progress)
        return observers


def standard_observers(progress: SyncProgress | None = None) -> StandardObservers:
    return StandardObservers(PollMetrics(), HealthMonitor(), progress)


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
