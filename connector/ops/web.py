"""The operations listener of ``run``: ``/metrics`` (Prometheus), ``/healthz``, and a read-only status page
(``/``, and ``/status.json``).

Bound to loopback unless configured otherwise. With ``status_token`` set every path but ``/healthz`` wants
the token, as ``?token=...`` (for a browser) or ``Authorization: Bearer ...`` (for Prometheus). Nothing
served is secret: account names, states, times, counts and error texts (which never carry passwords).
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from connector import __version__
from connector.cli.report import status_records
from connector.config import Config
from connector.errors import ConfigError, LedgerError
from connector.ledger.store import Ledger
from connector.ops.health import HealthMonitor, database_error, health_problems
from connector.ops.metrics import PollMetrics, ServiceSeries

log = logging.getLogger("connector.ops.web")

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
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
        config = self.config()
        records = status_records(config.accounts, self.ledger.statuses())
        accounts = {account.name: account for account in config.accounts}
        polling = self.health.polling()
        for record in records:
            account = accounts.get(record["account"])
            record["state"] = account_state(record, enabled=account is not None and account.enabled)
            record["polling"] = record["account"] in polling
            if account is not None:
                record["destination"] = f"{account.destination} / {account.folder}"
        return records

    def health_report(self) -> list[str]:
        config = self.config()
        return health_problems(
            self.health.due(), datetime.now(UTC), config.service.health_grace, database_error(self.ledger)
        )


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.state { font-weight: bold; } .polling { color: #555; font-size: 90%; }
.ok { color: #1a7f37; } .waiting { color: #555; } .suspended, .removed { color: #777; }
.backing-off { color: #b35900; } .auth-failing { color: #c62828; }
.error { color: #c62828; font-family: monospace; white-space: pre-wrap; }
.banner { background: #fde7e7; border: 1px solid #c62828; padding: 0.6em; margin-bottom: 1em; }
"""

_COLUMNS = (
    "Account",
    "State",
    "Destination",
    "Last poll",
    "Next poll",
    "Last poll counts",
    "Ledger",
    "Last error",
)


def _time(iso: str) -> str:
    """``2026-01-02T03:04:05+00:00`` as ``2026-01-02 03:04:05`` (the page says times are UTC)."""
    return iso.replace("T", " ").removesuffix("+00:00")


def _row(record: Mapping[str, Any]) -> str:
    e = html.escape
    polling = ' <span class="polling">(polling now)</span>' if record.get("polling") else ""
    last = record.get("last_poll_counts") or {}
    messages = record.get("messages") or {}
    cells = [
        e(record["account"]),
        f'<span class="state {e(record["state"].replace(" ", "-"))}">{e(record["state"])}</span>{polling}',
        e(record.get("destination", "-")),
        e(_time(record.get("last_poll", "-"))),
        e(_time(record.get("next_poll", "-"))),
        e(", ".join(f"{k} {v}" for k, v in last.items()) or "-"),
        e(", ".join(f"{k} {v}" for k, v in messages.items()) or "-"),
        f'<span class="error">{e(record.get("last_error") or "")}</span>',
    ]
    return f'<tr data-account="{e(record["account"])}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render_status_page(
    records: list[dict[str, Any]], problems: list[str], *, refresh_seconds: int, now: datetime
) -> str:
    banner = "".join(f'<div class="banner">{html.escape(p)}</div>' for p in problems)
    header = "".join(f"<th>{c}</th>" for c in _COLUMNS)
    rows = "\n".join(_row(record) for record in records)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh_seconds}">
<title>POP Connector status</title><style>{_STYLE}</style></head>
<body><h1>POP Connector status</h1>
<p>Version {html.escape(__version__)}; page generated {now.isoformat(timespec="seconds")}, refreshes every
{refresh_seconds} s. Times are UTC.</p>
{banner}
<table id="accounts"><thead><tr>{header}</tr></thead><tbody>
{rows}
</tbody></table></body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "pop-connector"
    sys_version = ""  # no Python version in the Server header

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        authorized = self._authorized(parse_qs(url.query).get("token", [None])[0])
        if url.path == "/healthz":
            self._healthz(authorized)
            return
        if not authorized:
            self._send(HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8", b"access token required\n")
            return
        routes: dict[str, Callable[[], None]] = {
            "/": self._page,
            "/status.json": self._status_json,
            "/metrics": self._metrics,
        }
        route = routes.get(url.path)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")
            return
        route()

    def _authorized(self, query_token: str | None) -> bool:
        token = self.server.ops.config().service.status_token
        if token is None:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else query_token
        return given is not None and hmac.compare_digest(given.encode(), token.get_secret_value().encode())

    def _healthz(self, authorized: bool) -> None:
        problems = self.server.ops.health_report()
        body: dict[str, object] = {"status": "failing" if problems else "ok"}
        if authorized:
            body["problems"] = problems
        status = HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK
        self._send(status, "application/json", json.dumps(body).encode())

    def _page(self) -> None:
        ops = self.server.ops
        problems = ops.health_report()
        try:
            records = ops.status()
        except LedgerError as exc:
            records, problems = [], [*problems, str(exc)]
        refresh = max(1, int(ops.config().service.status_refresh.total_seconds()))
        page = render_status_page(records, problems, refresh_seconds=refresh, now=datetime.now(UTC))
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
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

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
