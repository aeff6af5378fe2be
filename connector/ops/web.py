"""The operations listener of ``run``: ``/metrics`` (Prometheus), ``/healthz``, and a read-only status page
(``/``, ``/account/NAME`` and ``/status.json``; the HTML is connector/ops/status_page.py).

Bound to loopback unless configured otherwise. With ``status_token`` set every path but ``/healthz`` wants
the token, as ``?token=...`` (for a browser, whose links on the page then carry it) or ``Authorization:
Bearer ...`` (for Prometheus). Nothing served is secret: account names, states, times, counts,
Message-IDs and error texts (which never carry passwords).
``/healthz`` answers anyone, but without the token only its status word: its problems name accounts, and a
database error names the database's host and port, which a load balancer's probe has no need to know.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from connector.cli.report import status_records
from connector.config import Account, Config
from connector.errors import ConfigError, LedgerError
from connector.ledger.records import AccountTotals
from connector.ledger.store import Ledger
from connector.ops.charts import DAYS
from connector.ops.health import HealthMonitor, database_error, health_problems
from connector.ops.metrics import PollMetrics, ServiceSeries
from connector.ops.status_page import (
    RECENT_DELIVERIES,
    AccountDetail,
    View,
    render_account_page,
    render_status_page,
    select_page,
)

log = logging.getLogger("connector.ops.web")

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    # No script and no external resource (the charts are inline SVG); the filter form submits only here.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",  # the token may be in the URL
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def account_state(record: Mapping[str, Any], *, enabled: bool) -> str:
    """ok, backing off, suspended, auth failing, waiting (never polled) or removed."""
    if not record["configured"]:
        return "removed"
    # Disabled in the configuration, or suspended by the retry policy until `pop-connector resume`.
    if not enabled or record.get("suspended"):
        return "suspended"
    result = record["last_result"]
    if result == "auth_error":
        return "auth failing"
    if result == "error":
        return "backing off"
    if result == "never polled":
        return "waiting"
    return "ok"


def next_poll_reason(record: Mapping[str, Any], account: Account | None) -> str:
    """Why the next poll is when it is, in the words of ``pop-connector status`` (``record["condition"]``,
    see connector/cli/report.py) where it has some."""
    if not record["configured"] or account is None:
        return "no longer in the configuration: not polled"
    if not account.enabled:
        return "disabled in the configuration (enabled = false): not polled"
    condition = record.get("condition")
    login_delay = "LOGIN-DELAY" in (record.get("last_error") or "")
    if condition and login_delay and not record.get("suspended"):
        return f"LOGIN-DELAY: the server refused a login this soon after the previous one. {condition}"
    if condition:
        return str(condition)
    if record["last_result"] == "never polled":
        return "never polled yet: the first poll comes as soon as the service schedules it"
    interval = account.poll_interval
    try:
        last = datetime.fromisoformat(record["last_poll"])
        upcoming = datetime.fromisoformat(record["next_poll"])
    except (KeyError, TypeError, ValueError):
        return f"polled every {_duration(interval)} (poll_interval)"
    # A successful poll waits the jittered interval, longer only when the server announced a LOGIN-DELAY
    # longer than that (policies/retry.py: success_delay), which the ledger does not keep: inferred.
    if upcoming - last > interval * (1 + account.poll_jitter) + timedelta(seconds=1):
        return (
            f"later than poll_interval ({_duration(interval)}): the server's LOGIN-DELAY asks for "
            f"{_duration(upcoming - last)} between logins (or poll_interval was shortened since)"
        )
    return f"polled every {_duration(interval)} (poll_interval)"


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def _totals_record(totals: AccountTotals | None) -> dict[str, Any]:
    def when(value: datetime | None) -> str | None:
        return value.isoformat(timespec="seconds") if value is not None else None

    if totals is None:
        return {
            "messages": 0, "bytes": 0, "recovered": 0, "first_delivery": None, "last_delivery": None,
            "quarantined": 0, "failed_polls": 0,
        }  # fmt: skip
    return {
        "messages": totals.messages,
        "bytes": totals.bytes,
        "recovered": totals.recovered,
        "first_delivery": when(totals.first_delivery_at),
        "last_delivery": when(totals.last_delivery_at),
        "quarantined": totals.quarantined,
        "failed_polls": totals.failed_polls,
    }


def history_since(today: date) -> datetime:
    """The start of the first of the days the charts show (UTC midnight)."""
    return datetime.combine(today - timedelta(days=DAYS - 1), time(0), UTC)


@dataclass
class Operations:
    """What the listener reads; ``config`` is a callable because a reload replaces the configuration.
    ``series``: what ``/metrics`` reads at each request besides the poll events' ``metrics``."""

    config: Callable[[], Config]
    ledger: Ledger
    metrics: PollMetrics
    health: HealthMonitor
    series: ServiceSeries | None = None

    def metrics_text(self) -> bytes:
        return self.metrics.render() if self.series is None else self.metrics.render(self.series)

    def status(self) -> list[dict[str, Any]]:
        """Every account's record (``/status.json``): ``pop-connector status --json``'s fields, plus
        ``state``, ``polling``, ``destination``, ``next_poll_reason``, ``on_server`` and the delivery
        journal's totals (``journal``). A handful of queries, whatever the number of accounts."""
        config = self.config()
        statuses = self.ledger.statuses()
        records = status_records(config.accounts, statuses)
        totals = {total.account: total for total in self.ledger.journal.totals()}
        listed = {status.name: status.last_listed for status in statuses}
        accounts = {account.name: account for account in config.accounts}
        polling = self.health.polling()
        for record in records:
            name = record["account"]
            account = accounts.get(name)
            record["state"] = account_state(record, enabled=account is not None and account.enabled)
            record["polling"] = name in polling
            if account is not None:
                record["destination"] = f"{account.destination} / {account.folder}"
            record["journal"] = _totals_record(totals.get(name))
            record["on_server"] = listed.get(name)
            record["next_poll_reason"] = next_poll_reason(record, account)
        return records

    def history(self, accounts: Sequence[str], today: date) -> dict[str, dict[str, int]]:
        """Messages delivered per day over the charts' days, for these accounts (one query)."""
        return self.ledger.journal.per_day_of(accounts, history_since(today))

    def account(self, name: str, today: date) -> AccountDetail | None:
        """One account's page, or None for a name that is neither configured nor in the ledger."""
        record = next((record for record in self.status() if record["account"] == name), None)
        if record is None:
            return None
        return AccountDetail(
            record=record,
            deliveries=self.ledger.journal.deliveries(name, limit=RECENT_DELIVERIES),
            quarantined=self.ledger.quarantine.messages(name),
            per_day=self.ledger.journal.per_day(name, history_since(today)),
        )

    def health_report(self) -> list[str]:
        config = self.config()
        return health_problems(
            self.health.due(), datetime.now(UTC), config.service.health_grace, database_error(self.ledger)
        )


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "pop-connector"
    sys_version = ""  # no Python version in the Server header

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        query_token = query.get("token", [None])[0]
        authorized = self._authorized(query_token)
        if url.path == "/healthz":
            self._healthz(authorized)
            return
        if not authorized:
            self._send(HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8", b"access token required\n")
            return
        # A browser sends the token only in the address: the page's links carry the one it came with.
        link_token = (
            query_token if self._configured_token() is not None and self._valid(query_token) else None
        )
        if url.path.startswith("/account/"):
            self._account(unquote(url.path.removeprefix("/account/")), link_token)
            return
        routes: dict[str, Callable[[], None]] = {
            "/": lambda: self._page(View.from_query(query), link_token),
            "/status.json": self._status_json,
            "/metrics": self._metrics,
        }
        route = routes.get(url.path)
        if route is None:
            self._not_found()
            return
        route()

    def _configured_token(self) -> str | None:
        token = self.server.ops.config().service.status_token
        return None if token is None else token.get_secret_value()

    def _valid(self, given: str | None) -> bool:
        token = self._configured_token()
        return token is not None and given is not None and hmac.compare_digest(given.encode(), token.encode())

    def _authorized(self, query_token: str | None) -> bool:
        if self._configured_token() is None:
            return True
        header = self.headers.get("Authorization", "")
        return self._valid(header[7:] if header.startswith("Bearer ") else query_token)

    def _not_found(self) -> None:
        self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

    def _healthz(self, authorized: bool) -> None:
        problems = self.server.ops.health_report()
        body: dict[str, object] = {"status": "failing" if problems else "ok"}
        if authorized:
            body["problems"] = problems
        status = HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK
        self._send(status, "application/json", json.dumps(body).encode())

    def _refresh_seconds(self) -> int:
        return max(1, int(self.server.ops.config().service.status_refresh.total_seconds()))

    def _page(self, view: View, token: str | None) -> None:
        ops = self.server.ops
        problems = ops.health_report()
        now = datetime.now(UTC)
        history: dict[str, dict[str, int]] = {}
        try:
            records = ops.status()
            # Only the shown page's accounts are charted: one grouped query for at most a page of them.
            shown = [record["account"] for record in select_page(records, view).rows]
            history = ops.history(shown, now.date())
        except LedgerError as exc:
            records, problems = [], [*problems, str(exc)]
        page = render_status_page(
            records,
            problems,
            refresh_seconds=self._refresh_seconds(),
            now=now,
            view=view,
            history=history,
            token=token,
        )
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode())

    def _account(self, name: str, token: str | None) -> None:
        """``/account/NAME``: a configured account's or one the ledger knows; any other name is not found
        (and not echoed)."""
        ops = self.server.ops
        problems = ops.health_report()
        now = datetime.now(UTC)
        try:
            detail = ops.account(name, now.date())
        except LedgerError as exc:
            body = html.escape(f"the ledger cannot be read: {exc}")
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/html; charset=utf-8", body.encode())
            return
        if detail is None:
            self._not_found()
            return
        page = render_account_page(
            detail, problems, refresh_seconds=self._refresh_seconds(), now=now, token=token
        )
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode())

    def _status_json(self) -> None:
        try:
            body = json.dumps(self.server.ops.status(), indent=2).encode()
        except LedgerError as exc:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "application/json", json.dumps(str(exc)).encode())
            return
        self._send(HTTPStatus.OK, "application/json", body)

    def _metrics(self) -> None:
        self._send(HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8", self.server.ops.metrics_text())

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines may carry the token in the query string: log the path only, at DEBUG.
        log.debug("%s %s", self.command, urlsplit(self.path).path)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], ops: Operations) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.ops = ops


class OpsServer:
    """The listener, served from a daemon thread until ``stop()``."""

    def __init__(self, address: tuple[str, int], ops: Operations) -> None:
        try:
            self._server = _Server(address, ops)
        except OSError as exc:
            host, port = address
            raise ConfigError(
                f"service.metrics: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        # ``stop()`` waits for serve_forever to look at its flag again: every 0.5 s by default, which every
        # stop of the service (and of each test's) waited for; twenty times a second costs nothing measurable.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="ops-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        host, port = self.address
        log.info("status page, /metrics and /healthz on http://%s:%d/", host, port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
