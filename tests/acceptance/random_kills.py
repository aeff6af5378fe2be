"""Kills ``pop-connector sync`` at random moments and checks, after every kill, that nothing was lost,
nothing delivered twice and nothing deleted from the POP3 server before its delivery was recorded.

Used by test_crash_random.py; the number of kills comes from ``POP_CONNECTOR_CRASH_KILLS`` (per retention
mode) and the random seed from ``POP_CONNECTOR_CRASH_SEED`` (printed on failure, to replay a run).
"""

from __future__ import annotations

import hashlib
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.delivery import assert_at_most_once, assert_nothing_lost, match_deliveries, normalised
from tests.messages import simple
from tests.servers.dovecot import Dovecot, ImapMessage, MailUsers

ROOT = Path(__file__).resolve().parents[2]
# Logged by the engine once the listing is planned: from here on the poll is delivering.
PLANNED = "to deliver"
_SIZES = (300, 4_000, 60_000, 400_000)


def mixed_mailbox(count: int, tag: str) -> list[bytes]:
    """Distinct messages of mixed sizes; every fifth has no Message-ID (the connector adds one)."""
    messages = []
    for n in range(count):
        body = simple(n, size=_SIZES[n % len(_SIZES)], message_id=n % 5 != 2)
        messages.append(body.replace(b"Subject: test", f"X-Run: {tag}\r\nSubject: test".encode(), 1))
    return messages


@dataclass
class Row:
    uidl: str
    state: str
    sha256: str | None
    destination_ref: str | None
    # Missing from the last listing: kept a while before it is forgotten (issue 11.4).
    missing: bool = False


def ledger_rows(database: Path) -> list[Row]:
    if not database.exists():
        return []  # killed before the ledger was created
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone() is None:
            return []  # killed after the file was created, before its tables were
        # Each migration commits on its own on SQLite: a kill between two leaves the ledger at an older
        # revision (before 0005 there is no missing_since), which the next start brings up to date.
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        missing = "missing_since IS NOT NULL" if "missing_since" in columns else "0"
        query = f"SELECT uidl, state, sha256, destination_ref, {missing} FROM messages"
        rows = conn.execute(query).fetchall()
    return [Row(*row[:4], missing=bool(row[4])) for row in rows]


@dataclass
class KillStats:
    kills: int = 0
    finished_early: int = 0
    while_planning: int = 0
    while_delivering: int = 0
    terms: int = 0


@dataclass
class Aim:
    """How long after a sync's start, or after its listing is planned, a signal may come (seconds): at
    first guesses, then the time the last sync that ended before its signal took. A signal aimed past
    the end of a sync tests nothing and costs a round; syncs got quicker (pipelined and batched), so a
    fixed window missed most of them."""

    from_start: float = 1.5
    from_planned: float = 0.6

    def learn(self, started: float, planned: float | None, ended: float) -> None:
        """A sync started at ``started``, planned at ``planned`` (None: not seen) and ended at ``ended``
        (``time.monotonic``) before its signal came."""
        self.from_start = max(ended - started, 0.01)
        if planned is not None:
            self.from_planned = max(ended - planned, 0.01)


class _Stderr(threading.Thread):
    """Reads a sync's stderr: its lines, set ``planned`` once its listing is planned, and when it closed
    (``ended_at``, ``time.monotonic``): the process ended."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self._process = process
        self.lines: list[str] = []
        self.planned = threading.Event()
        self.ended_at: float | None = None

    def run(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self.lines.append(line)
            if PLANNED in line:
                self.planned.set()
        self.ended_at = time.monotonic()


class CrashRun:
    """One mailbox, one config file, one ledger; repeatedly started and killed."""

    def __init__(
        self,
        dovecot: Dovecot,
        users: MailUsers,
        config: Path,
        database: Path,
        messages: list[bytes],
        rng: random.Random,
        retention: str,
    ) -> None:
        self.dovecot = dovecot
        self.users = users
        self.config = config
        self.database = database
        self.messages = messages
        self.rng = rng
        self.retention = retention
        self._gone: set[int] = set()  # originals already off the server at the previous check
        self.stdout = config.with_name("stdout.txt")

    def start(self) -> tuple[subprocess.Popen[str], _Stderr]:
        """A sync, and the reader of its stderr."""
        process = subprocess.Popen(
            [sys.executable, "-m", "connector", "--config", str(self.config), "sync"],
            cwd=ROOT,
            stdout=self.stdout.open("w"),
            stderr=subprocess.PIPE,
            text=True,
        )
        stderr = _Stderr(process)
        stderr.start()
        return process, stderr

    def interrupt(self, stats: KillStats, sig: signal.Signals, aim: Aim) -> None:
        """Start a sync and send ``sig`` at a random moment within ``aim``: a third of the time counted
        from the start (start-up, login, listing), otherwise from the moment deliveries begin."""
        # Pending rows an earlier SIGKILL left: a graceful stop may come before the poll reaches them.
        left_pending = self._pending() if sig == signal.SIGTERM else set()
        started = time.monotonic()
        process, stderr = self.start()
        planned, lines = stderr.planned, stderr.lines
        planned_at: float | None = None
        early = sig == signal.SIGKILL and self.rng.random() < 1 / 3
        if early:
            time.sleep(self.rng.uniform(0, aim.from_start))
        else:
            planned.wait(60)
            planned_at = time.monotonic()
            time.sleep(self.rng.uniform(0, aim.from_planned))
        if process.poll() is not None:
            stats.finished_early += 1
            self._learn(aim, started, planned_at, stderr)
            self.check_invariants()
            return
        process.send_signal(sig)
        code = process.wait(60)
        if sig == signal.SIGKILL and code in (0, 1) and "delivered=" in self.stdout.read_text():
            # The sync ended between the check above and the signal (pipelined runs are quick).
            stats.finished_early += 1
            self._learn(aim, started, planned_at, stderr)
        elif sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, "".join(lines[-20:])
            stats.kills += 1
            if planned.is_set():
                stats.while_delivering += 1
            else:
                stats.while_planning += 1
        else:
            # Graceful: the handler lets the poll finish its message and QUIT; exit 0 or 1. Python restores
            # the default action while the interpreter shuts down, so a signal that late may still kill
            # it, but only once the result line shows that every poll has ended.
            finished = "delivered=" in self.stdout.read_text()
            assert code in (0, 1) or (code == -signal.SIGTERM and finished), (
                f"exit {code} after SIGTERM: {''.join(lines[-20:])}"
            )
            stats.terms += 1
            self.check_graceful(left_pending)
        self.check_invariants()

    @staticmethod
    def _learn(aim: Aim, started: float, planned_at: float | None, stderr: _Stderr) -> None:
        """The sync ended before its signal: the next signals aim within the time it took."""
        stderr.join(10)  # it ends with the process's stderr
        aim.learn(started, planned_at, stderr.ended_at or time.monotonic())

    def finish(self) -> None:
        """A run to the end (checked against both servers), then one more that finds nothing to do."""
        for attempt in range(2):
            result = subprocess.run(
                [sys.executable, "-m", "connector", "--config", str(self.config), "sync"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert result.returncode == 0, result.stdout + result.stderr[-3000:]
            self.check_invariants()
            if attempt == 0:
                self.check_final()
            else:
                assert "delivered=0 recovered=0" in result.stdout, result.stdout

    # --- checks ---------------------------------------------------------------------------------------

    def _state(self) -> tuple[list[ImapMessage], list[bytes], dict[str, Row]]:
        delivered = self.dovecot.imap_fetch(self.users.destination.name)
        on_server = self.dovecot.maildir_messages(self.users.source.name)
        rows = {row.sha256: row for row in ledger_rows(self.database) if row.sha256}
        return delivered, on_server, rows

    def _row_of(self, delivered: list[ImapMessage], rows: dict[str, Row]) -> dict[int, Row | None]:
        """For each delivered original (by index), the ledger row with the SHA-256 of what arrived (the
        stored bytes, the connector's stamp line included)."""
        by_index: dict[int, Row | None] = {}
        for message in delivered:
            index = next(iter(match_deliveries(self.messages, [message.body])))
            by_index[index] = rows.get(hashlib.sha256(message.stored).hexdigest())
        return by_index

    def check_invariants(self) -> None:
        fetched, on_server, rows = self._state()
        delivered = [message.body for message in fetched]
        assert_at_most_once(self.messages, delivered)
        assert_nothing_lost(self.messages, delivered, on_server)
        left = {normalised(message) for message in on_server}
        row_of = self._row_of(fetched, rows)
        gone = {index for index, message in enumerate(self.messages) if normalised(message) not in left}
        for index in gone - self._gone:
            # It left the server during the last run, which cannot also have pruned its row (a poll
            # prunes only what was gone before it started), so the row must say it was delivered.
            row = row_of.get(index)
            assert row is not None and row.state in ("delivered", "deleted"), (
                f"message {index} left the POP3 server but the ledger has {row}"
            )
        self._gone = gone

    def _pending(self) -> set[str]:
        return (
            {row.uidl for row in ledger_rows(self.database) if row.state == "pending"}
            if self.database.exists()
            else set()
        )

    def check_graceful(self, left_pending: set[str]) -> None:
        """After SIGTERM no message is half done: no pending row but those an earlier SIGKILL left and the
        stopped poll did not reach, and (delete mode) every recorded delivery was also deleted at QUIT."""
        rows = ledger_rows(self.database)
        pending = [row.uidl for row in rows if row.state == "pending" and row.uidl not in left_pending]
        assert not pending, f"SIGTERM left messages half done: {pending}"
        if self.retention == "delete":
            # A delivered row missing from the listing: an earlier SIGKILL came between QUIT and its record.
            undeleted = [row.uidl for row in rows if row.state == "delivered" and not row.missing]
            assert not undeleted, f"SIGTERM ended the session without deleting {undeleted}"

    def all_delivered(self) -> bool:
        return len(self.dovecot.imap_messages(self.users.destination.name)) == len(self.messages)

    def check_final(self) -> None:
        fetched, on_server, _ = self._state()
        counts = assert_at_most_once(self.messages, [message.body for message in fetched])
        assert sorted(counts) == list(range(len(self.messages))), "not everything was delivered"
        ledger = ledger_rows(self.database)
        states = {row.state for row in ledger if not row.missing}
        uids = {_uid(row.destination_ref) for row in ledger}
        shas = {row.sha256 for row in ledger}
        stored = self.dovecot.imap_fetch(self.users.destination.name)
        if self.retention == "delete":
            # Rows of messages deleted by earlier runs were pruned when this run saw them gone, but for
            # a SIGKILL between QUIT and its record: such a row is kept a while, counted missing.
            assert on_server == [] and states <= {"deleted"}, states
            assert {row.state for row in ledger if row.missing} <= {"delivered"}
            assert uids <= {m.uid for m in stored}
            assert shas <= {hashlib.sha256(m.stored).hexdigest() for m in stored}
        else:
            assert len(on_server) == len(self.messages) and states == {"delivered"}, states
            assert uids == {m.uid for m in stored}
            assert shas == {hashlib.sha256(m.stored).hexdigest() for m in stored}


def _uid(reference: str | None) -> int:
    assert reference and "UID=" in reference, f"no UID in destination reference {reference!r}"
    return int(reference.rsplit("UID=", 1)[1])


def interrupt_repeatedly(
    make_run: Callable[[int], CrashRun], signals: list[signal.Signals], stats: KillStats
) -> None:
    """Rounds of (fresh mailbox, the next signals until it is all delivered, finish and check) until
    every signal in ``signals`` has interrupted a running sync."""
    pending = list(signals)
    aim = Aim()
    round_number = 0
    while pending:
        run = make_run(round_number)
        round_number += 1
        while pending:
            before = stats.kills + stats.terms
            run.interrupt(stats, pending[0], aim)
            if stats.kills + stats.terms > before:
                pending.pop(0)
            elif run.all_delivered():
                break
        run.finish()
