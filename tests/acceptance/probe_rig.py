"""The accounts, the ledger and the checks shared by the idle probe's crash tests (test_crash_probe.py kills
`sync`, test_crash_probe_run.py kills `run`).

Six accounts on Dovecot, one destination: three idle ones (`keep`) that the probe records, two with new
mail (``fresh``) that it hands over to the full poll, and one with more mail (``busy``) that is polled in full
from the start (its last poll delivered mail). crash_driver.py stalls every full poll after its first APPEND,
so the kill finds them mid-delivery.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from connector.ledger.database import open_database
from connector.ledger.models import AccountRow, LeaseRow, MessageRow
from tests.acceptance.conftest import RunCli
from tests.configs import write_tables
from tests.conftest import fresh_postgres_database
from tests.delivery import assert_at_most_once, assert_exactly_once, assert_nothing_lost, match_deliveries
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUser, MailUsers

LEASE_TTL = timedelta(minutes=2)  # the default [service] lease_ttl
MARKER = re.compile(r"^crash_driver: killed at (?P<point>[\w-]+): pid (?P<pid>\d+)(?P<found>.*)$", re.M)
_numbers = itertools.count(1)
# Messages seeded before the killed command: the fresh accounts' are found by the probe, the busy one's by
# its full poll.
NEW_MAIL = {"fresh": 3, "busy": 6}


@dataclass
class Account:
    name: str
    kind: str  # idle, fresh or busy (see the module doc)
    user: MailUser
    retention: str
    seeded: list[bytes]


@dataclass
class Rig:
    dovecot: Dovecot
    destination: MailUser
    database: str
    config: Path
    accounts: list[Account]

    def seed(self, account: Account, count: int) -> None:
        messages = [simple(next(_numbers)) for _ in range(count)]
        self.dovecot.seed(account.user.name, messages)
        account.seeded += messages

    def of(self, kind: str) -> list[Account]:
        return [account for account in self.accounts if account.kind == kind]

    @property
    def seeded(self) -> list[bytes]:
        return [message for account in self.accounts for message in account.seeded]

    def on_server(self) -> list[bytes]:
        return [m for account in self.accounts for m in self.dovecot.maildir_messages(account.user.name)]

    def delivered(self) -> list[bytes]:
        return self.dovecot.imap_messages(self.destination.name)

    def stored(self, delivered: list[bytes]) -> dict[str, int]:
        """Per account, how many of its messages are in ``delivered``."""
        counts = match_deliveries(self.seeded, delivered)
        indexes = itertools.count()
        return {
            account.name: sum(counts[next(indexes)] for _message in account.seeded)
            for account in self.accounts
        }

    def rows(self) -> dict[str, dict[str, Any]]:
        """Per account: its account row, its lease row (None: none yet) and how many of its messages are
        ``pending``."""
        engine = open_database(self.database, migrate=False)
        try:
            with engine.connect() as connection:
                accounts = {row.id: dict(row._mapping) for row in connection.execute(select(AccountRow))}
                leases = {row.account_id: dict(row._mapping) for row in connection.execute(select(LeaseRow))}
                states = connection.execute(select(MessageRow.account_id, MessageRow.state)).all()
        finally:
            engine.dispose()
        return {
            row["name"]: {
                **row,
                "lease": leases.get(account_id),
                "pending": sum(1 for owner, state in states if owner == account_id and state == "pending"),
            }
            for account_id, row in accounts.items()
        }


@contextmanager
def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    with fresh_postgres_database("pop_connector_probe_crash") as url:
        yield url


@contextmanager
def probe_rig(
    kind: str, tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, **account_fields: str
) -> Iterator[Rig]:
    """The six accounts on a ``kind`` ledger (sqlite, postgresql); ``account_fields``: more fields of every
    account (``poll_interval`` for `run`)."""
    kinds = [("idle", "keep")] * 3 + [("fresh", "delete")] * 2 + [("busy", "delete")]
    accounts = [
        Account(f"{kind}{n}", kind, dovecot.new_user("prb"), retention, [])
        for n, (kind, retention) in enumerate(kinds, start=1)
    ]
    destination = {"name": "d", "type": "imap", "host": dovecot.host, "port": dovecot.ports.imap,
                   "tls": "none", "username": mail_users.destination.name,
                   "password": mail_users.destination.password}  # fmt: skip
    tables = [
        {"name": account.name, "host": dovecot.host, "port": dovecot.ports.pop3, "tls": "none",
         "username": account.user.name, "password": account.user.password, "destination": "d",
         "retention": account.retention, "timeout": "20s", **account_fields}
        for account in accounts
    ]  # fmt: skip
    try:
        with _database(kind, tmp_path) as database:
            config = write_tables(
                tmp_path / "config.toml", database, [destination], tables, {"max_workers": 4}
            )
            yield Rig(dovecot, mail_users.destination, database, config, accounts)
    finally:
        for account in accounts:
            dovecot.remove_user(account.user.name)


def sync(run_cli: RunCli, rig: Rig) -> subprocess.CompletedProcess[str]:
    done = run_cli("--config", str(rig.config), "sync", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def line(output: str, account: str) -> str:
    found = re.search(rf"^{account}: .*$", output, re.M)
    assert found is not None, output
    return found.group(0)


def ids(found: str, word: str) -> set[int]:
    listed = re.search(rf"{word} ([\d,]+)", found)
    assert listed is not None, found
    return {int(n) for n in listed.group(1).split(",")}


def numbers(found: str, word: str) -> dict[int, int]:
    """``word 3:2,4:1`` in a marker as {3: 2, 4: 1} (``word none``: {})."""
    listed = re.search(rf"{word} (none|[\d:,]+)", found)
    assert listed is not None, found
    if listed.group(1) == "none":
        return {}
    pairs = (pair.split(":") for pair in listed.group(1).split(","))
    return {int(key): int(value) for key, value in pairs}


def prepare(run_cli: RunCli, rig: Rig) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Each idle account's mail delivered, then a poll that found nothing: the probe's from now on. The
    fresh ones (empty) are the probe's after their first poll; the busy one just delivered mail. Then the
    new mail of the fresh and busy accounts is seeded. The ledger's rows, and each account's messages in
    the destination, before the killed command."""
    for account in rig.of("idle") + rig.of("busy"):
        rig.seed(account, 2)
    sync(run_cli, rig)
    rig.seed(rig.of("busy")[0], 2)
    sync(run_cli, rig)
    before = rig.rows()
    stored_before = rig.stored(rig.delivered())
    assert all(before[a.name]["last_delivered"] == 0 for a in rig.of("idle") + rig.of("fresh"))
    for account in rig.of("fresh") + rig.of("busy"):
        rig.seed(account, NEW_MAIL[account.kind])
    return before, stored_before


def killed(crashed: subprocess.CompletedProcess[str], point: str) -> tuple[str, int]:
    """The kill was the driver's at ``point``, with a full poll mid-delivery: what it found, and the pid."""
    # Nothing else sends SIGKILL: the driver reached its point (and says what it found there).
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    marker = MARKER.search(crashed.stderr)
    assert marker is not None and marker["point"] == point, crashed.stderr
    found = marker["found"]
    assert "; a full poll mid-delivery" in found, found
    return found, int(marker["pid"])


def check_after_kill(
    rig: Rig, stored_before: dict[str, int], pid: int, killed_at: datetime
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Right after the kill: nothing lost, nothing twice, nothing gone from the POP3 server that is not in
    the destination; each message the stalled full polls stored is ``pending``; every lease still held is
    the dead process's and ends within ``lease_ttl``. The ledger's rows, and per account its messages in
    the destination whose ``delivered`` record was not written."""
    delivered = rig.delivered()
    assert_at_most_once(rig.seeded, delivered)
    assert_nothing_lost(rig.seeded, delivered, rig.on_server())
    after = rig.rows()
    # Per account, the new messages in the destination: the full polls stall after their first APPEND,
    # before its `delivered` record, so each is a `pending` row the next poll must find, not append again.
    stored = rig.stored(delivered)
    unrecorded = {a.name: stored[a.name] - stored_before[a.name] for a in rig.accounts}
    assert sum(unrecorded.values()) >= 1, unrecorded  # the stalled full poll's APPEND
    assert all(after[name]["pending"] >= count for name, count in unrecorded.items()), (unrecorded, after)
    # No lease blocks the next poll for ever: one still held is the dead process's (on this host: free
    # at once), and would expire within lease_ttl anyway.
    held = {name: row["lease"] for name, row in after.items() if row["lease"]["expires_at"] > killed_at}
    assert held, after  # the stalled full poll's
    for name, lease in held.items():
        assert lease["pid"] == pid and lease["expires_at"] <= killed_at + LEASE_TTL, (name, lease)
    return after, unrecorded


@dataclass
class Killed:
    """A command the crash driver killed at a point, and the state right after (``check_after_kill``)."""

    before: dict[str, dict[str, Any]]  # the ledger's rows before the command
    started: datetime
    killed_at: datetime
    found: str  # what the driver found at its point (see crash_driver.py)
    pid: int
    after: dict[str, dict[str, Any]]  # the ledger's rows after the kill
    unrecorded: dict[str, int]  # per account, its messages in the destination with no `delivered` record

    @property
    def names(self) -> dict[int, str]:
        """Account names by their ledger id (the driver's markers name accounts by id)."""
        return {row["id"]: name for name, row in self.after.items()}


def kill_at(run_cli: RunCli, rig: Rig, point: str, nth: int, command: str) -> Killed:
    """``prepare``, then ``command`` (sync or run) killed by crash_driver.py the ``nth`` time it reaches
    ``point``, then ``check_after_kill``."""
    before, stored_before = prepare(run_cli, rig)
    started = datetime.now(UTC)
    crashed = run_cli(
        point,
        str(nth),
        "--",
        "--config",
        str(rig.config),
        command,
        module="tests.acceptance.crash_driver",
        timeout=60,
    )
    killed_at = datetime.now(UTC)
    found, pid = killed(crashed, point)
    after, unrecorded = check_after_kill(rig, stored_before, pid, killed_at)
    return Killed(before, started, killed_at, found, pid, after, unrecorded)


def check_reruns(
    run_cli: RunCli, rig: Rig, unrecorded: dict[str, int], killed_at: datetime, *, once_more: bool = True
) -> None:
    """The next sync: no account skipped as busy; each stalled message found in the destination, not
    appended again; the rest delivered (and deleted) now; every lease released. And ``once_more``: every
    account idle."""
    rerun = sync(run_cli, rig)
    for account in rig.accounts:
        found = line(rerun.stdout, account.name)
        recovered = unrecorded[account.name]
        if account.kind == "idle":
            assert found.startswith(f"{account.name}: ok delivered=0 recovered=0 deleted=0 failed=0"), found
        else:
            new = NEW_MAIL[account.kind]
            counts = f"delivered={new - recovered} recovered={recovered} deleted={new} failed=0"
            assert found.startswith(f"{account.name}: ok {counts}"), found
    assert_exactly_once(rig.seeded, rig.delivered())
    for account in rig.accounts:
        left = rig.dovecot.maildir_count(account.user.name)
        assert left == (len(account.seeded) if account.retention == "keep" else 0), account.name
    for name, row in rig.rows().items():
        assert row["last_result"] == "ok" and not row["consecutive_failures"], (name, row)
        assert row["last_poll_finished_at"] >= killed_at and not row["pending"], (name, row)
        assert row["lease"]["expires_at"] <= datetime.now(UTC), (name, row)  # released

    if not once_more:
        return
    final = sync(run_cli, rig)
    for account in rig.accounts:
        found = line(final.stdout, account.name)
        assert found.startswith(f"{account.name}: ok delivered=0 recovered=0 deleted=0 failed=0"), found
