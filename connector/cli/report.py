"""Text and JSON renderings of poll results and account status for the CLI."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from connector.cli.parser import STATES
from connector.config import Account
from connector.ledger.records import AccountStatus

if TYPE_CHECKING:
    # Annotations only: `status` loads none of the poll's code (connector/cli/commands.py).
    from connector.poll.result import PollResult


def ledger_line(database: str) -> str:
    """Where the ledger is, in one line: ``sync`` and ``check`` print it first (on stderr), ``status`` too."""
    url = make_url(database)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return f"ledger: {url.render_as_string(hide_password=True)}"
    path = Path(url.database)
    state = "" if path.exists() else ", not created yet"
    return f"ledger: {path} (SQLite{state}; [service] database sets where)"


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def poll_line(result: PollResult) -> str:
    counts = (
        f"delivered={result.delivered} recovered={result.recovered} deleted={result.deleted} "
        f"failed={result.failed} not_delivered={result.not_delivered} quarantined={result.quarantined} "
        f"skipped={result.skipped}"
    )
    line = f"{result.account}: {result.status} {counts}"
    if result.error:
        line += f"\n  error: {result.error}"
    for problem in result.problems:
        line += f"\n  problem: {problem}"
    return line


def log_poll_line(log: logging.Logger, result: PollResult) -> None:
    """A service's line for one finished poll (``run`` and distributed workers): DEBUG for a poll with
    nothing to do, INFO for any other (see ``PollResult.idle``)."""
    level = logging.DEBUG if result.idle else logging.INFO
    log.log(level, "%s", poll_line(result), extra={"account": result.account})


def dry_run_lines(result: PollResult) -> list[str]:
    if result.plan is None:
        return [f"{result.account}: {result.status}: {result.error}"]
    plan = result.plan
    lines = [
        f"{result.account}: would deliver {len(plan.deliver)} ({plan.new_count} new, "
        f"{len(plan.deliver) - plan.new_count} to recover or retry), would delete {len(plan.delete)}, "
        f"would forget {len(plan.gone)} gone from the server, {plan.quarantined} quarantined"
    ]
    lines += [
        f"  deliver #{d.info.number} uidl={d.info.uidl} size={d.info.size}"
        + (" (check destination first)" if d.recover else "")
        for d in plan.deliver
    ]
    lines += [f"  delete  #{i.number} uidl={i.uidl}" for i in plan.delete]
    lines += [f"  skip    uidl={uidl} (listed more than once)" for uidl in plan.duplicates]
    lines += [
        f"  quarantine #{i.number} uidl={i.uidl} size={i.size} (too large to download)" for i in plan.oversize
    ]
    if plan.deferred:
        lines.append(f"  {plan.deferred} more left for later polls (max_messages_per_poll)")
    if plan.seen:
        lines.append(f'  {plan.seen} left alone: on the server before the baseline (start = "new")')
    if plan.missing:
        lines.append(
            f"  {len(plan.missing)} known but missing from this listing (counted, not forgotten yet)"
        )
    if plan.sudden_loss:
        lines.append(f"  problem: {plan.sudden_loss}")
    return lines


def status_records(accounts: Sequence[Account], statuses: Iterable[AccountStatus]) -> list[dict[str, Any]]:
    """One record per configured account, in config order, plus ledger accounts no longer configured."""
    by_name = {status.name: status for status in statuses}
    records = []
    names = [account.name for account in accounts]
    for name in names + sorted(set(by_name) - set(names)):
        status = by_name.get(name)
        record: dict[str, Any] = {"account": name, "configured": name in names}
        if status is None:
            record.update(last_result="never polled")
        else:
            record.update(
                last_poll=_when(status.last_poll_finished_at),
                last_success=_when(status.last_success_at),
                last_result=status.last_result or "never polled",
                last_error=status.last_error,
                consecutive_failures=status.consecutive_failures,
                next_poll=_when(status.next_poll_at),
                last_poll_counts={
                    "delivered": status.last_delivered,
                    "failed": status.last_failed,
                    "deleted": status.last_deleted,
                },
                messages=status.counts,
                last_worker=status.last_worker,
                suspended=status.suspended_at is not None,
                condition=account_condition(status),
                identity=status.identity_note,
                uidl_change=status.uidl_change_note,
                listing=status.listing_note,
            )
        records.append(record)
    return records


def account_condition(status: AccountStatus) -> str | None:
    """Why an account is not being polled normally, in words for an admin; None when it is."""
    if status.suspended_at is not None:
        return (
            f"SUSPENDED since {_when(status.suspended_at)}: {status.suspended_reason}; "
            f"run `pop-connector resume {status.name}` once the cause is fixed"
        )
    if status.last_result == "auth_error":
        return (
            f"AUTHENTICATION FAILING ({status.consecutive_failures} failed polls in a row): retried slowly "
            f"so that the provider does not lock the mailbox; next attempt {_when(status.next_poll_at)}"
        )
    if status.consecutive_failures > 0:
        return (
            f"BACKING OFF after {status.consecutive_failures} failed polls in a row; "
            f"next poll {_when(status.next_poll_at)}"
        )
    return None


# --- the state of each account, the summary line, selection and order (``status``) -------------------

# Each account is in exactly one state: a problem first, then what it is doing.
STATE_LABELS = {
    "ok": "ok",
    "backing-off": "backing off",
    "failing": "failing auth",
    "suspended": "suspended",
    "polling": "polling now",
    "never-polled": "never polled",
    "removed": "no longer configured",
}


def account_state(record: Mapping[str, Any], *, enabled: bool = True) -> str:
    """The one state of a ``status_records`` record (with ``polling`` when a poll holds it now):
    removed (no longer configured), suspended (also when disabled in the configuration), failing
    (authentication failing), backing-off (other failed polls in a row), polling, never-polled or ok."""
    if not record["configured"]:
        return "removed"
    if not enabled or record.get("suspended"):
        return "suspended"
    if record["last_result"] == "auth_error":
        return "failing"
    if record.get("consecutive_failures", 0) > 0:
        return "backing-off"
    if record.get("polling"):
        return "polling"
    if record["last_result"] == "never polled":
        return "never-polled"
    return "ok"


def summary_line(records: Iterable[Mapping[str, Any]]) -> str:
    """``1000 accounts: 950 ok, 20 backing off, ...``: every state but ``removed`` always, so that the
    line reads the same from one run to the next; ``removed`` when there are any."""
    counts = Counter(record["state"] for record in records)
    shown = [state for state in STATES if state != "removed" or counts[state]]
    total = sum(counts.values())
    parts = ", ".join(f"{counts[state]} {STATE_LABELS[state]}" for state in shown)
    return f"{total} account{'' if total == 1 else 's'}: {parts}"


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sorts ``a2`` before ``a10``: runs of digits compare as numbers, the rest without case. The split
    alternates text and digits, so two keys always compare text with text and numbers with numbers."""
    parts = _DIGITS.split(name)
    return tuple(int(part) if index % 2 else part.casefold() for index, part in enumerate(parts)), name


def matching_accounts(records: Iterable[dict[str, Any]], patterns: Sequence[str]) -> list[dict[str, Any]]:
    """The records whose account name matches one of the shell patterns (all without patterns), in
    natural order."""
    chosen = [r for r in records if not patterns or any(fnmatchcase(r["account"], p) for p in patterns)]
    return sorted(chosen, key=lambda record: natural_key(record["account"]))


def in_states(records: Iterable[dict[str, Any]], states: Collection[str]) -> list[dict[str, Any]]:
    """The records in one of ``states`` (all of them when empty), order kept."""
    return [record for record in records if not states or record["state"] in states]


def status_report(records: list[dict[str, Any]], shown: list[dict[str, Any]]) -> str:
    """``status``: the summary line of ``records``, then ``shown`` (a selection of them) in full."""
    lines = [summary_line(records)]
    if len(shown) < len(records):
        lines.append(f"{len(shown)} shown")
    if shown:
        lines.append(status_text(shown))
    return "\n".join(lines)


def status_text(records: list[dict[str, Any]]) -> str:
    lines = []
    for record in records:
        head = f"{record['account']}: {record['last_result']}"
        if not record["configured"]:
            head += " (no longer in the configuration)"
        lines.append(head)
        if record.get("polling"):
            pid, host, since = (record["polling"][key] for key in ("pid", "host", "since"))
            lines.append(f"  being polled now by PID {pid} on host {host} since {since}")
        if "last_poll" in record:
            counts = record["messages"]
            lines.append(
                f"  last poll {record['last_poll']}, last success {record['last_success']}, "
                f"next poll {record['next_poll']}"
            )
            lines.append("  messages: " + ", ".join(f"{state} {count}" for state, count in counts.items()))
            if record["last_worker"]:
                lines.append(f"  last polled by worker {record['last_worker']}")
            if record["last_error"]:
                lines.append(f"  last error: {record['last_error']}")
            if record.get("condition"):
                lines.append(f"  {record['condition']}")
            if record.get("identity"):
                lines.append(f"  identity: {record['identity']}")
            if record.get("uidl_change"):
                lines.append(f"  UIDL change: {record['uidl_change']}")
            if record.get("listing"):
                lines.append(f"  short listing: {record['listing']}")
    return "\n".join(lines)


def status_json(records: list[dict[str, Any]]) -> str:
    return json.dumps(records, indent=2)
