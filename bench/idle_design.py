"""The floor of the idle probe's design: ``python -m bench.idle_design`` (issue 16, scenario 5).

Not the connector: the measurement, made before the idle probe was built (connector/poll/probe.py), of
the least that design costs, which decided the rebuild of the idle path. Kept as that floor: the probe's
own cost is scenario 5 of ``python -m bench`` and ``python -m bench.idle_parts``. The design:

- one thread drives up to ``--at-once`` POP3 sessions with non-blocking sockets (``selectors``): no poll
  threads, so no GIL hand-off at every socket call (with ``max_workers = 8`` the connector's threads cost
  0.3-0.5 ms per idle poll, docs/benchmarks.md);
- the ledger is read for ``--batch`` accounts at once (their kept UIDLs and lease rows, one query) and the
  idle results written for ``--batch`` accounts in one transaction (lease compare-and-set and result per
  account, one commit): the ledger's per-poll fixed costs (pool, BEGIN, COMMIT, the fsync) are shared;
- a session does what the connector's idle poll does on the wire: greeting, CAPA (parsed with the
  connector's parser), USER, PASS, UIDL (parsed line by line), the listing compared with the ledger's,
  QUIT not awaited; ``--tls``: POP3S, the handshake non-blocking too.

It checks less than the connector (no identity checks, no retention, no STLS or other logins; an account with
anything new would go to the full poll): a lower bound of the design, not a working poller. Each side runs
``--rounds`` times, alternately, against one Dovecot (processes reused, as scenario 5); the best run's CPU
per poll is shown, with the bare loop's (bench/baseline.py, one poll after another) from the same rounds.
"""

from __future__ import annotations

import argparse
import gc
import resource
import selectors
import socket
import sqlite3
import ssl
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench import baseline
from bench.setup import endpoint, idle_maildrops
from connector.pop3.replies import parse_capabilities
from tests.servers.dovecot import Dovecot

_END = b"\r\n.\r\n"


@dataclass
class _Session:
    """One account's POP3 session, advanced by each reply: ``step`` is the reply it waits for."""

    account: str
    sock: socket.socket
    user: bytes
    password: bytes
    known: set[str]
    step: str = "greeting"  # "handshake" first over TLS
    buffer: bytes = b""
    listed: set[str] = field(default_factory=set)
    ok: bool = False

    def readable(self) -> bool:
        """Read what arrived (a TLS socket may hold more than one record); True once the session is over."""
        if self.step == "handshake":
            assert isinstance(self.sock, ssl.SSLSocket)
            try:
                self.sock.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.step = "greeting"
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                return False
            if not chunk or self.feed(chunk):
                return True
            if not isinstance(self.sock, ssl.SSLSocket) or not self.sock.pending():
                return False

    def feed(self, chunk: bytes) -> bool:
        """Take in what arrived; True once the session is over."""
        self.buffer += chunk
        while True:
            multi = self.step in ("capa", "uidl")
            end = self.buffer.find(_END) if multi else self.buffer.find(b"\r\n")
            if end < 0:
                return False
            reply = self.buffer[: end + (len(_END) if multi else 2)]
            self.buffer = self.buffer[len(reply) :]
            if not reply.startswith(b"+OK"):
                return True  # the full poll would take over
            if self._advance(reply):
                return True

    def _advance(self, reply: bytes) -> bool:
        if self.step == "greeting":
            self.step = "capa"
            self.sock.send(b"CAPA\r\n")
        elif self.step == "capa":
            parse_capabilities(reply.split(b"\r\n")[1:-2])
            self.step = "user"
            self.sock.send(b"USER " + self.user + b"\r\n")
        elif self.step == "user":
            self.step = "pass"
            self.sock.send(b"PASS " + self.password + b"\r\n")
        elif self.step == "pass":
            self.step = "uidl"
            self.sock.send(b"UIDL\r\n")
        else:
            for line in reply.split(b"\r\n")[1:-2]:
                _number, uidl = line.split(b" ", 1)
                self.listed.add(uidl.decode("ascii"))
            self.ok = self.listed <= self.known and len(self.listed) == len(self.known)
            self.sock.send(b"QUIT\r\n")  # not awaited: nothing is at stake in its reply
            return True
        return False


def _known(ledger: sqlite3.Connection, accounts: Sequence[str]) -> dict[str, tuple[int, set[str]]]:
    """Each account's id and kept UIDLs, for a batch of accounts, in one query."""
    marks = ",".join("?" * len(accounts))
    known: dict[str, tuple[int, set[str]]] = {}
    rows = ledger.execute(
        "SELECT a.name, a.id, m.uidl FROM accounts a LEFT JOIN messages m ON m.account_id = a.id "
        f"WHERE a.name IN ({marks})",
        accounts,
    )
    for name, account_id, uidl in rows:
        _id, uidls_ = known.setdefault(name, (account_id, set()))
        if uidl is not None:
            uidls_.add(uidl)
    return known


def _write(ledger: sqlite3.Connection, done: Sequence[tuple[int, bool]]) -> None:
    """The batch's results in one transaction: per account, the lease's compare-and-set (on a lease row
    that is free, as the connector's idle write does) and the result."""
    now = datetime.now(UTC).isoformat()
    ledger.execute("BEGIN IMMEDIATE")
    ledger.executemany(
        "UPDATE leases SET generation = generation + 1, expires_at = ? "
        "WHERE account_id = ? AND expires_at <= ?",
        [(now, account_id, now) for account_id, _ok in done],
    )
    ledger.executemany(
        "UPDATE accounts SET last_poll_finished_at = ?, last_success_at = ?, last_result = ?, "
        "consecutive_failures = 0 WHERE id = ?",
        [(now, now, "ok" if ok else "handover", account_id) for account_id, ok in done],
    )
    ledger.execute("COMMIT")


def poll_all(
    sources: Sequence[baseline.Endpoint],
    ledger: sqlite3.Connection,
    *,
    at_once: int,
    batch: int,
    context: ssl.SSLContext | None = None,
) -> int:
    """Every account polled once; returns how many were idle as the ledger expected."""
    selector = selectors.DefaultSelector()
    idle = 0
    for chunk in _chunks(sources, batch):
        known = _known(ledger, [source.user for source in chunk])
        waiting = list(chunk)
        done: list[tuple[int, bool]] = []
        running = 0
        while waiting or running:
            while waiting and running < at_once:
                source = waiting.pop()
                sock = socket.create_connection((source.host, source.port))
                sock.setblocking(False)
                if context is not None:
                    sock = context.wrap_socket(
                        sock, server_hostname=source.host, do_handshake_on_connect=False
                    )
                session = _Session(
                    source.user,
                    sock,
                    source.user.encode(),
                    source.password.encode(),
                    known[source.user][1],
                    step="greeting" if context is None else "handshake",
                )
                selector.register(sock, selectors.EVENT_READ, session)
                if context is not None:
                    session.readable()  # sends the ClientHello: the server speaks only after it
                running += 1
            for key, _events in selector.select():
                session = key.data
                if session.readable():
                    selector.unregister(session.sock)
                    session.sock.close()
                    running -= 1
                    done.append((known[session.account][0], session.ok))
                    idle += session.ok
        _write(ledger, done)
    return idle


def _chunks(items: Sequence[baseline.Endpoint], size: int) -> Iterator[Sequence[baseline.Endpoint]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_design", description=__doc__)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument(
        "--at-once", type=int, default=8, help="sessions in flight (the connector: max_workers)"
    )
    parser.add_argument("--batch", type=int, default=100, help="accounts per ledger read and write")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="POP3S (implicit TLS) instead of plain POP3")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="idle-design-"))
    with Dovecot(reuse_processes=True) as dovecot:
        database = work / "ledger.sqlite3"
        users = idle_maildrops(dovecot, args.accounts, f"sqlite:///{database}")
        sources = [endpoint(dovecot, user, tls=args.tls) for user in users]
        ledger = sqlite3.connect(database, isolation_level=None)
        ledger.execute("PRAGMA synchronous=NORMAL")  # as the connector's idle write (prepared.py)
        # Every account's lease row, free: the write's compare-and-set then updates one row per account.
        ledger.execute(
            "INSERT INTO leases (account_id, generation, holder, host, pid, acquired_at, expires_at) "
            "SELECT id, 1, 'x', 'h', 1, '2000-01-01', '2000-01-01' FROM accounts"
        )
        results: dict[str, list[tuple[float, float]]] = {"bare loop": [], "this design": []}
        for round_ in range(args.rounds):
            sides = ["bare loop", "this design"] if round_ % 2 == 0 else ["this design", "bare loop"]
            for side in sides:
                gc.collect()
                cpu, wall = _cpu(), time.perf_counter()
                if side == "bare loop":
                    count = sum(1 for source in sources if baseline.idle_poll(source) >= 0)
                else:
                    context = ssl.create_default_context(cafile=str(dovecot.ca_file)) if args.tls else None
                    count = poll_all(sources, ledger, at_once=args.at_once, batch=args.batch, context=context)
                cpu, wall = _cpu() - cpu, time.perf_counter() - wall
                assert count == len(sources), f"{side}: {count} of {len(sources)} idle as expected"
                results[side].append((cpu / count * 1000, count / wall))
        base_cpu = min(cpu for cpu, _rate in results["bare loop"])
        variant = "POP3S" if args.tls else "POP3"
        print(f"{args.accounts} idle accounts, {variant}, best of {args.rounds} rounds:")
        for side, runs in results.items():
            cpu, rate = min(runs)
            print(f"  {side:12s} {cpu:6.3f} ms CPU/poll ({cpu / base_cpu:.2f} x), {rate:.0f} polls/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
