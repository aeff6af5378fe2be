"""Prometheus metrics with a bounded number of series, served by ``connector.ops.web``.

A scrape of 100,000 accounts must stay small (docs/operations.md has the table and the measured size), so
nothing is labelled by account unless an alert has to name the account, and those series exist only
while the account needs attention (a healthy account has no series of its own), for at most
``ACCOUNT_SERIES_LIMIT`` accounts each, the worst first.

- ``PollMetrics``, a ``PollObserver`` fed by the polls' events (``connector.poll.events``): counters and
  histograms over the whole service, the polls in progress, the scheduling lag its scheduler reports, and
  two per-account gauges kept while they are not zero (backlog, unidentified messages). Process metrics
  (RSS, CPU, open files) are on its registry too.
- ``ServiceSeries``, read at each scrape: accounts configured, overdue accounts, and the state and last
  success of each account whose last poll failed, from the ledger: the same answer in ``run`` and in every
  distributed worker, whichever of them polled the account, and across restarts.

No ``_created`` series: ``render`` leaves them out (prometheus_client's switch for that is process-wide).
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import or_, select
from sqlalchemy.exc import SQLAlchemyError

from connector.config import Config
from connector.errors import LedgerError
from connector.ledger.models import AccountRow
from connector.ledger.store import Ledger
from connector.poll.events import Delivered, Finished, PollEvent, Started

log = logging.getLogger("connector.ops.metrics")

# Polls of an empty mailbox take well under a second; a first migration of a big one takes hours.
DURATION_BUCKETS = (0.25, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
# A poll should start within a second of being due (docs/scaling.md); minutes mean too few workers.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)

# The values of the ``state`` label of ``pop_connector_account_state`` (an account that is ok has none).
STATES = ("backing_off", "auth_failing", "suspended")
# At most this many accounts in each per-account family, the worst first: when a POP3 server or a
# destination is down for every account, the counts over the service say so and a scrape stays small.
ACCOUNT_SERIES_LIMIT = 1000


class _SparseGauge:
    """A gauge labelled by account that has a series only while its value is not zero, for at most
    ``ACCOUNT_SERIES_LIMIT`` accounts (the highest values)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def set(self, account: str, value: float) -> None:
        with self._lock:
            if value:
                self._values[account] = value
            else:
                self._values.pop(account, None)

    def forget(self, account: str) -> None:
        with self._lock:
            self._values.pop(account, None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            values = list(self._values.items())
        if len(values) > ACCOUNT_SERIES_LIMIT:
            values = heapq.nlargest(ACCOUNT_SERIES_LIMIT, values, key=itemgetter(1))
        family = GaugeMetricFamily(self.name, self.documentation, labels=["account"])
        for account, value in values:
            family.add_metric([account], value)
        yield family


class PollMetrics:
    """A ``PollObserver``; its registry also has the process metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.polls = Counter("pop_connector_polls", "Polls finished, by result.", ["result"], registry=r)
        self.failures = Counter("pop_connector_poll_failures", "Polls that ended in an error.", registry=r)
        self.delivered = Counter(
            "pop_connector_messages_delivered",
            "Messages delivered (or found already delivered after a crash).",
            registry=r,
        )
        self.bytes = Counter("pop_connector_bytes_delivered", "Bytes of the messages delivered.", registry=r)
        self.quarantined = Counter(
            "pop_connector_messages_quarantined",
            "Messages given up on after retry.max_attempts (left on the POP3 server).",
            registry=r,
        )
        self.short_retrs = Counter(
            "pop_connector_short_retrs",
            "RETR replies far shorter than LIST said: not delivered, left on the POP3 server.",
            registry=r,
        )
        self.duration = Histogram(
            "pop_connector_poll_duration_seconds",
            "How long a poll took.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.lag = Histogram(
            "pop_connector_scheduling_lag_seconds",
            "From when a poll was due to when it started.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self._polling: set[str] = set()
        self._polling_lock = threading.Lock()
        in_progress = Gauge("pop_connector_polls_in_progress", "Polls running now.", registry=r)
        in_progress.set_function(self._polls_in_progress)
        self.backlog = _SparseGauge(
            "pop_connector_backlog_messages",
            "Messages due for delivery that the account's last poll left undelivered (no series: none).",
        )
        self.unidentified = _SparseGauge(
            "pop_connector_messages_unidentified",
            "Messages the account's last successful poll left on the POP3 server because it could not "
            "identify them (a malformed UIDL or LIST line, copies under one UIDL that nothing tells apart; "
            "no series: none).",
        )
        r.register(self.backlog)
        r.register(self.unidentified)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def notify(self, event: PollEvent) -> None:
        match event:
            case Started():
                with self._polling_lock:
                    self._polling.add(event.account)
            case Delivered():
                self.bytes.inc(event.size)
            case Finished():
                self._finished(event)
            case _:
                pass

    def _finished(self, event: Finished) -> None:
        name, result = event.account, event.result
        with self._polling_lock:
            self._polling.discard(name)
        self.polls.labels(result.status).inc()
        if result.status in ("busy", "lease_lost"):
            pass  # another process polls the account: neither this poll's success nor its failure
        elif not result.ok:
            self.failures.inc()
        else:
            # Only a poll that got through its listing knows; a failed one leaves the last value.
            self.unidentified.set(name, result.unidentified)
        self.delivered.inc(result.delivered + result.recovered)
        self.quarantined.inc(result.quarantined)
        self.short_retrs.inc(result.short_retrs)
        self.duration.observe(event.duration)
        if event.backlog is not None:
            self.backlog.set(name, event.backlog)

    def _polls_in_progress(self) -> float:
        with self._polling_lock:
            return len(self._polling)

    def observe_lag(self, seconds: float) -> None:
        """A poll started ``seconds`` after it was due (told by the scheduler, which alone knows)."""
        self.lag.observe(max(0.0, seconds))

    def forget(self, account: str) -> None:
        """An account removed from the configuration: drop its series (the counters are not per account)."""
        self.backlog.forget(account)
        self.unidentified.forget(account)

    def render(self, *more: Collector) -> bytes:
        """The text exposition of this registry and ``more`` (``ServiceSeries``), without ``_created``."""
        return generate_latest(_WithoutCreated([self.registry, *more]))


class _WithoutCreated:
    """Collects from every collector and drops the ``_created`` samples of counters and histograms: one
    per counter would say only when the process started."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self._collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            for metric in collector.collect():
                if metric.type in ("counter", "histogram", "summary"):
                    kept = [s for s in metric.samples if not s.name.endswith("_created")]
                    if len(kept) != len(metric.samples):
                        copy = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                        copy.samples = kept
                        metric = copy
                yield metric


def troubled_accounts(ledger: Ledger) -> list[tuple[str, str]]:
    """``(account, state)`` of every account of the ledger whose last poll failed or that is suspended,
    the longest without a success first (never: first of all, then by name), so that the accounts listed
    stay the same from one scrape to the next while the set of failing ones does. One query; no date is
    converted, as an outage of 100,000 accounts returns them all."""
    query = (
        select(AccountRow.name, AccountRow.last_result, AccountRow.suspended_at.is_not(None))
        .where(_TROUBLED)
        .order_by(AccountRow.last_success_at.asc().nulls_first(), AccountRow.name)
    )
    try:
        with ledger.engine.connect() as connection:
            rows = connection.execute(query).all()
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read the accounts' states: {exc}") from exc
    return [(name, _state(result, suspended)) for name, result, suspended in rows]


def last_successes(ledger: Ledger, accounts: Sequence[str]) -> dict[str, datetime]:
    """When the last successful poll of each of ``accounts`` ended (accounts that never had one: absent)."""
    found: dict[str, datetime] = {}
    try:
        with ledger.engine.connect() as connection:
            for start in range(0, len(accounts), 500):
                query = select(AccountRow.name, AccountRow.last_success_at).where(
                    AccountRow.name.in_(accounts[start : start + 500])
                )
                found.update((name, at) for name, at in connection.execute(query) if at is not None)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read the accounts' last successes: {exc}") from exc
    return found


# A failed last poll (never polled: no result, and NOT IN leaves NULL out), or a suspension.
_TROUBLED = or_(AccountRow.last_result.not_in(("ok", "stopped")), AccountRow.suspended_at.is_not(None))


def _state(last_result: str | None, suspended: bool) -> str:
    """As the status page says it (``connector.ops.web.account_state``), in the words of a label."""
    if suspended:
        return "suspended"
    return "auth_failing" if last_result == "auth_error" else "backing_off"


@dataclass(frozen=True)
class ServiceSeries:
    """The series read at each scrape. ``config`` is the configuration of the moment; ``overdue`` counts
    the accounts due more than ``health_grace`` ago whose poll has not started (the health monitor knows in
    ``run``, the accounts table in distributed mode)."""

    config: Callable[[], Config]
    ledger: Ledger
    overdue: Callable[[Config], int]

    def collect(self) -> Iterator[Metric]:
        config = self.config()
        enabled = {account.name for account in config.accounts if account.enabled}
        yield GaugeMetricFamily(
            "pop_connector_accounts_configured", "Accounts enabled in the configuration.", value=len(enabled)
        )
        # The database may be down: /healthz says so; the other series must still be served.
        try:
            overdue = self.overdue(config)
        except (LedgerError, SQLAlchemyError) as exc:
            log.debug("metrics: cannot count the overdue accounts: %s", exc)
        else:
            yield GaugeMetricFamily(
                "pop_connector_overdue_accounts",
                "Accounts due more than service.health_grace ago whose poll has not started.",
                value=overdue,
            )
        try:
            troubled = [(name, state) for name, state in troubled_accounts(self.ledger) if name in enabled]
            listed = troubled[:ACCOUNT_SERIES_LIMIT]
            successes = last_successes(self.ledger, [name for name, _state in listed])
        except LedgerError as exc:
            log.debug("metrics: %s", exc)
            return
        counts = Tally(state for _name, state in troubled)
        accounts = GaugeMetricFamily(
            "pop_connector_accounts",
            "Enabled accounts whose last poll failed or that are suspended, by state.",
            labels=["state"],
        )
        for name in STATES:
            accounts.add_metric([name], counts[name])
        yield accounts
        state_family = GaugeMetricFamily(
            "pop_connector_account_state",
            "1 for an account whose last poll failed or that is suspended, labelled by why "
            f"({', '.join(STATES)}); an account that is ok has no series. At most "
            f"{ACCOUNT_SERIES_LIMIT} accounts, the longest without a success first.",
            labels=["account", "state"],
        )
        last_success = GaugeMetricFamily(
            "pop_connector_last_success_timestamp_seconds",
            "Unix time of the end of the last successful poll of an account whose last poll failed or "
            "that is suspended (an account that is ok has no series).",
            labels=["account"],
        )
        for name, state in listed:
            state_family.add_metric([name, state], 1)
            if name in successes:
                last_success.add_metric([name], successes[name].timestamp())
        yield state_family
        yield last_success
