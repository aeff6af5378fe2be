"""`pop-connector report` rendering (connector/cli/delivery_report.py): verdicts, and hostile values
(an error quoting a server, a Message-ID) kept inert in every format."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

from connector.cli.delivery_report import AccountReport, render
from connector.ledger.records import AccountTotals, QuarantinedMessage

WHEN = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
HOSTILE = '<script>alert("x")</script>,"; =cmd|'


def report(**changes: object) -> AccountReport:
    fields: dict[str, object] = {
        "account": "alice",
        "totals": AccountTotals("alice", 346, 1_000_000, 2, WHEN, WHEN, 0, 1),
        "since": None,
        "on_server": 0,
        "pending": 0,
        "quarantined": [],
        "last_result": "ok",
        "last_error": None,
        "last_poll": WHEN,
    }
    fields.update(changes)
    return AccountReport(**fields)  # type: ignore[arg-type]


def test_a_finished_migration_says_complete() -> None:
    assert report().verdict == "complete: source empty, 346 delivered, 0 quarantined"


def test_a_quarantined_message_or_mail_left_keeps_it_in_progress() -> None:
    held = QuarantinedMessage(1, "alice", "u1", 5, "refused", 10, 10, "<m@x>", WHEN)
    assert report(quarantined=[held]).verdict.startswith(
        "in progress: 0 on the server, 0 pending, 1 quarantined"
    )
    assert report(on_server=3).verdict.startswith("in progress: 3 on the server")
    assert report(last_poll=None).verdict == "not started: never polled"


def test_hostile_values_stay_inert_in_every_format() -> None:
    held = QuarantinedMessage(1, "alice", HOSTILE, 5, HOSTILE, 10, 10, HOSTILE, WHEN)
    reports = [report(quarantined=[held], last_result="error", last_error=HOSTILE)]

    page = render(reports, "html")
    assert "<script>" not in page and "&lt;script&gt;" in page

    rows = list(csv.DictReader(io.StringIO(render(reports, "csv"))))
    assert rows[0]["account"] == "alice" and rows[0]["quarantined_now"] == "1"

    data = json.loads(render(reports, "json"))
    assert data[0]["quarantined"][0]["reason"] == HOSTILE and data[0]["last_error"] == HOSTILE

    table = render(reports, "table")
    assert "1 account(s), 0 complete, 346 message(s) delivered in all" in table
