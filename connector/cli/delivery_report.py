"""``pop-connector report``: what each account moved, what is left, and whether a migration is complete.

Read from the delivery journal and its totals (connector/ledger/journal.py), which outlive the ledger's
message rows, and from the account rows (last poll, messages listed, quarantine). Read-only.

Formats: ``table`` (the terminal), ``csv`` and ``json`` (for spreadsheets and scripts), ``html`` (one
self-contained file, no script and no external resource, every value escaped: something to mail to a
manager).
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from connector.config import Config
from connector.errors import ConfigError
from connector.ledger.records import AccountStatus, AccountTotals, QuarantinedMessage
from connector.ledger.store import Ledger

COLUMNS = (
    "account",
    "delivered",
    "bytes",
    "first_delivery",
    "last_delivery",
    "on_server",
    "quarantined_now",
    "last_result",
    "verdict",
)


@dataclass(frozen=True)
class AccountReport:
    account: str
    totals: AccountTotals
    # Deliveries (and their bytes) since ``--since``; None without it.
    since: tuple[int, int] | None
    on_server: int | None
    pending: int
    quarantined: list[QuarantinedMessage]
    last_result: str | None
    last_error: str | None
    last_poll: datetime | None

    @property
    def verdict(self) -> str:
        """For a one-time migration: is everything moved?"""
        delivered = self.totals.messages
        if self.last_poll is None:
            return "not started: never polled"
        if self.on_server == 0 and not self.pending and not self.quarantined and self.last_result == "ok":
            return f"complete: source empty, {delivered} delivered, 0 quarantined"
        left = "unknown" if self.on_server is None else str(self.on_server)
        return (
            f"in progress: {left} on the server, {self.pending} pending, {len(self.quarantined)} "
            f"quarantined, {delivered} delivered"
        )

    def row(self) -> dict[str, Any]:
        delivered, size = self.since if self.since is not None else (self.totals.messages, self.totals.bytes)
        return {
            "account": self.account,
            "delivered": delivered,
            "bytes": size,
            "first_delivery": _iso(self.totals.first_delivery_at),
            "last_delivery": _iso(self.totals.last_delivery_at),
            "on_server": self.on_server,
            "quarantined_now": len(self.quarantined),
            "last_result": self.last_result,
            "verdict": self.verdict,
        }


def run(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    names = args.account or [account.name for account in config.accounts]
    for name in names:
        config.account(name)  # a ConfigError (exit 2) for an unknown one
    since = _since(args.since)
    reports = build(ledger, names, since)
    print(render(reports, args.format, since=since), end="")
    return 0


def build(ledger: Ledger, names: Sequence[str], since: datetime | None = None) -> list[AccountReport]:
    statuses = {status.name: status for status in ledger.statuses()}
    totals = {total.account: total for total in ledger.journal.totals(names)}
    reports = []
    for name in names:
        status = statuses.get(name)
        total = totals.get(name) or AccountTotals(name, 0, 0, 0, None, None, 0, 0)
        period = None
        if since is not None:
            rows = ledger.journal.deliveries(name, since=since)
            period = (len(rows), sum(entry.size for entry, _ in rows))
        reports.append(
            _report(name, total, status, ledger.quarantine.messages(name) if status else [], period)
        )
    return reports


def _report(
    name: str,
    totals: AccountTotals,
    status: AccountStatus | None,
    quarantined: list[QuarantinedMessage],
    since: tuple[int, int] | None,
) -> AccountReport:
    return AccountReport(
        account=name,
        totals=totals,
        since=since,
        on_server=status.last_listed if status else None,
        pending=status.counts.get("pending", 0) if status else 0,
        quarantined=quarantined,
        last_result=status.last_result if status else None,
        last_error=status.last_error if status else None,
        last_poll=status.last_poll_finished_at if status else None,
    )


def render(reports: Sequence[AccountReport], fmt: str, *, since: datetime | None = None) -> str:
    if fmt == "json":
        return json.dumps([_json(report) for report in reports], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for report in reports:
            writer.writerow(report.row())
        return out.getvalue()
    if fmt == "html":
        return _html(reports, since)
    return _table(reports)


def _json(report: AccountReport) -> dict[str, Any]:
    return {
        **report.row(),
        "recovered": report.totals.recovered,
        "quarantined_total": report.totals.quarantined,
        "failed_polls": report.totals.failed_polls,
        "pending": report.pending,
        "last_error": report.last_error,
        "quarantined": [
            {"uidl": q.uidl, "message_id": q.message_id, "attempts": q.attempts, "reason": q.last_error}
            for q in report.quarantined
        ],
    }


def _table(reports: Sequence[AccountReport]) -> str:
    headers = ("account", "delivered", "bytes", "last delivery", "on server", "quarantined", "verdict")
    rows = [
        (
            r.account,
            str(r.row()["delivered"]),
            str(r.row()["bytes"]),
            r.row()["last_delivery"] or "-",
            "-" if r.on_server is None else str(r.on_server),
            str(len(r.quarantined)),
            r.verdict,
        )
        for r in reports
    ]
    widths = [max(len(cells[i]) for cells in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
             for cells in [headers, *rows]]  # fmt: skip
    for r in reports:
        for q in r.quarantined:
            lines.append(
                f"{r.account}: quarantined {q.uidl!r} ({q.message_id or 'no Message-ID'}): {q.last_error}"
            )
        if r.last_error and r.last_result != "ok":
            lines.append(f"{r.account}: last error: {r.last_error}")
    total = sum(r.totals.messages for r in reports)
    complete = sum(1 for r in reports if r.verdict.startswith("complete"))
    lines.append(f"{len(reports)} account(s), {complete} complete, {total} message(s) delivered in all")
    return "\n".join(lines) + "\n"


def _html(reports: Sequence[AccountReport], since: datetime | None) -> str:
    e = html.escape
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    period = f" since {e(since.date().isoformat())}" if since is not None else ""
    head = "".join(f"<th>{e(column.replace('_', ' '))}</th>" for column in COLUMNS)
    body = []
    for report in reports:
        row = report.row()
        cls = "ok" if report.verdict.startswith("complete") else "open"
        cells = "".join(f"<td>{e('' if row[c] is None else str(row[c]))}</td>" for c in COLUMNS)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    quarantine = [
        f"<li>{e(r.account)}: {e(q.uidl)} ({e(q.message_id or 'no Message-ID')}): "
        f"{e(q.last_error or '')}</li>"
        for r in reports
        for q in r.quarantined
    ]
    total = sum(r.totals.messages for r in reports)
    complete = sum(1 for r in reports if r.verdict.startswith("complete"))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>POP Connector delivery report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        "tr.ok td:last-child{color:#176b1c}tr.open td:last-child{color:#8a5300}"
        "</style></head><body>"
        f"<h1>Delivery report{period}</h1><p>Generated {e(generated)}: {len(reports)} account(s), "
        f"{complete} complete, {total} message(s) delivered in all.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        + (f"<h2>Quarantined messages</h2><ul>{''.join(quarantine)}</ul>" if quarantine else "")
        + "</body></html>\n"
    )


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        day = datetime.strptime(text, "%Y-%m-%d")
    except ValueError as exc:
        raise ConfigError(f"--since: {text!r} is not a date (write YYYY-MM-DD)") from exc
    return day.replace(tzinfo=UTC)


def _iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when is not None else None
