"""The observers every run mode gives its polls, and the operations listener that reads them.

``sync``, ``run`` and each distributed worker build their ``SyncEngine`` with ``standard_observers()``:
Prometheus metrics and the health monitor (read by the listener of ``connector.ops.web``), plus the
progress display for ``sync``. The engine adds the per-message log lines itself (``PollLog``), so that no
engine, whoever builds it, polls without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from connector.config import Config
from connector.ledger.store import Ledger
from connector.ops.health import HealthMonitor
from connector.ops.metrics import PollMetrics
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
    config: Callable[[], Config], ledger: Ledger, observers: StandardObservers
) -> OpsServer | None:
    """The listener of ``[service] metrics`` (not started yet), or None when it is not configured.
    ``config`` is read at each request: a reload replaces the configuration, not the listener's address."""
    address = config().service.metrics
    if address is None:
        return None
    return OpsServer(address, Operations(config, ledger, observers.metrics, observers.health))
