"""Prometheus metrics, fed by the polls' events (``connector.poll.events``), served by
``connector.ops.web``."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from connector.poll.events import Delivered, Finished, PollEvent, Started

# Polls of an empty mailbox take well under a second; a first migration of a big one takes hours.
DURATION_BUCKETS = (0.25, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)


class PollMetrics:
    """A ``PollObserver``. Every metric is labelled by ``account``; ``polls_total`` also by ``result``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.polls = Counter("pop_connector_polls", "Polls finished.", ["account", "result"], registry=r)
        self.failures = Counter(
            "pop_connector_poll_failures", "Polls that ended in an error.", ["account"], registry=r
        )
        self.delivered = Counter(
            "pop_connector_messages_delivered",
            "Messages delivered (or found already delivered after a crash).",
            ["account"],
            registry=r,
        )
        self.bytes = Counter(
            "pop_connector_bytes_delivered", "Bytes of the messages delivered.", ["account"], registry=r
        )
        self.quarantined = Counter(
            "pop_connector_messages_quarantined",
            "Messages given up on after retry.max_attempts (left on the POP3 server).",
            ["account"],
            registry=r,
        )
        self.short_retrs = Counter(
            "pop_connector_short_retrs",
            "RETR replies far shorter than LIST said: not delivered, left on the POP3 server.",
            ["account"],
            registry=r,
        )
        self.duration = Histogram(
            "pop_connector_poll_duration_seconds",
            "How long a poll took.",
            ["account"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.last_success = Gauge(
            "pop_connector_last_success_timestamp_seconds",
            "Unix time of the end of the last successful poll.",
            ["account"],
            registry=r,
        )
        self.backlog = Gauge(
            "pop_connector_backlog_messages",
            "Messages due for delivery that the last poll left undelivered.",
            ["account"],
            registry=r,
        )
        self.unidentified = Gauge(
            "pop_connector_messages_unidentified",
            "Messages the last successful poll left on the POP3 server because it could not identify them "
            "(a malformed UIDL or LIST line, copies under one UIDL that nothing tells apart).",
            ["account"],
            registry=r,
        )
        self.in_progress = Gauge(
            "pop_connector_polls_in_progress", "1 while the account is being polled.", ["account"], registry=r
        )

    def notify(self, event: PollEvent) -> None:
        match event:
            case Started():
                self.in_progress.labels(event.account).set(1)
            case Delivered():
                self.bytes.labels(event.account).inc(event.size)
            case Finished():
                self._finished(event)
            case _:
                pass

    def _finished(self, event: Finished) -> None:
        name, result = event.account, event.result
        self.in_progress.labels(name).set(0)
        self.polls.labels(name, result.status).inc()
        if result.status in ("busy", "lease_lost"):
            pass  # another process polls the account: neither this poll's success nor its failure
        elif not result.ok:
            self.failures.labels(name).inc()
        else:
            self.last_success.labels(name).set_to_current_time()
            # Only a poll that got through its listing knows; a failed one leaves the last value.
            self.unidentified.labels(name).set(result.unidentified)
        self.delivered.labels(name).inc(result.delivered + result.recovered)
        self.quarantined.labels(name).inc(result.quarantined)
        self.short_retrs.labels(name).inc(result.short_retrs)
        self.duration.labels(name).observe(event.duration)
        if event.backlog is not None:
            self.backlog.labels(name).set(event.backlog)

    def forget(self, account: str) -> None:
        """An account removed from the configuration: drop its gauges (counters keep their history)."""
        for gauge in (self.last_success, self.backlog, self.in_progress, self.unidentified):
            with contextlib.suppress(KeyError):
                gauge.remove(account)

    def render(self) -> bytes:
        return generate_latest(self.registry)
