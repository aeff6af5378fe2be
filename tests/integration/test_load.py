"""Load: one process polls many accounts on one Dovecot with ``run``'s scheduler for several cycles.

No account starves (every one is polled in every cycle), memory stays flat (peak RSS per cycle is printed
and may not keep growing), and every message is delivered exactly once. The normal suite runs 100 accounts;
``POP_CONNECTOR_LOAD_ACCOUNTS=1000 python -m pytest tests/integration/test_load.py -q -s`` runs the full
load of the issue (docs/policies.md, "Load").
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections import Counter
from collections.abc import Iterator
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest

from connector.config import load_config
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from connector.poll.probe import IdleProbe
from connector.poll.result import PollResult
from connector.service.scheduler import Service
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUser

pytestmark = pytest.mark.integration

ACCOUNTS = int(os.environ.get("POP_CONNECTOR_LOAD_ACCOUNTS", "100"))
CYCLES = 4
PER_ACCOUNT = 3  # at the start; one more arrives for every account in each cycle
# A cycle that makes no progress for this long is a hang, not slowness (it never bounds a duration).
STALL_SECONDS = 300.0


def _message(account: int, n: int) -> bytes:
    return simple(n).replace(b"<msg", f"<load{account}-".encode())


@pytest.fixture
def sources(dovecot: Dovecot) -> Iterator[list[MailUser]]:
    users = [dovecot.new_user("load") for _ in range(ACCOUNTS)]
    yield users
    for user in users:
        dovecot.remove_user(user.name)


def _config_text(dovecot: Dovecot, sources: list[MailUser], destination: MailUser, database: str) -> str:
    lines = [
        f'[service]\ndatabase = "{database}"\nmax_workers = 8\n',
        '[defaults]\npoll_interval = "1s"\npoll_jitter = 0\ntimeout = "60s"\n',
        f'[[destinations]]\nname = "dovecot"\ntype = "imap"\nhost = "{dovecot.host}"\n'
        f'port = {dovecot.ports.imap}\ntls = "none"\nusername = "{destination.name}"\n'
        f'password = "{destination.password}"\n',
    ]
    for user in sources:
        lines.append(
            f'[[accounts]]\nname = "{user.name}"\nhost = "{dovecot.host}"\nport = {dovecot.ports.pop3}\n'
            f'tls = "none"\nusername = "{user.name}"\npassword = "{user.password}"\ndestination = "dovecot"\n'
        )
    return "\n".join(lines)


class Polls:
    """Successful polls per account, as the service reports them."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.failures: list[PollResult] = []
        self.changed = threading.Condition()

    def __call__(self, result: PollResult) -> None:
        with self.changed:
            if result.ok:
                self.count[result.account] += 1
            else:
                self.failures.append(result)
            self.changed.notify_all()

    def wait_all(self, names: list[str], polls: int) -> None:
        """Until every account has had ``polls`` successful polls; fails on a stall or a failed poll."""

        def done() -> bool:
            return all(self.count[name] >= polls for name in names)

        with self.changed:
            while not done():
                assert not self.failures, self.failures[:3]
                before = self.count.total()
                self.changed.wait(STALL_SECONDS)
                assert self.count.total() > before or done() or self.failures, f"no poll for {STALL_SECONDS}s"
            assert not self.failures, self.failures[:3]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_many_accounts_for_several_cycles(
    dovecot: Dovecot,
    sources: list[MailUser],
    sqlite_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="connector")  # records kept by pytest would grow memory
    destination = dovecot.new_user("sink")
    for index, user in enumerate(sources):
        dovecot.seed(user.name, [_message(index, n) for n in range(PER_ACCOUNT)])
    path = tmp_path / "config.toml"
    path.write_text(_config_text(dovecot, sources, destination, sqlite_url))
    config = load_config(path)
    database = open_database(sqlite_url)
    polls = Polls()
    ledger = Ledger(database)
    engine = SyncEngine(config, ledger)
    # As `run` builds it: idle polls are the idle probe's (connector/poll/probe.py), the others full polls.
    probe = IdleProbe(engine, at_once=config.service.max_workers)
    service = Service(config, engine, ledger, on_result=polls, probe=probe)
    names = [user.name for user in sources]
    peaks = []
    service.start()
    try:
        for cycle in range(1, CYCLES + 1):
            polls.wait_all(names, cycle)
            peaks.append(_peak_rss_mb())
            print(f"load: {ACCOUNTS} accounts, cycle {cycle}: peak RSS {peaks[-1]:.1f} MB")
            if cycle < CYCLES:
                for index, user in enumerate(sources):
                    dovecot.seed(user.name, [_message(index, PER_ACCOUNT + cycle - 1)])
        polls.wait_all(names, CYCLES + 1)  # the last arrivals are delivered too
    finally:
        service.shutdown()
        database.dispose()
    try:
        ids = _message_ids(dovecot, destination.name)
    finally:
        dovecot.remove_user(destination.name)
    expected = {
        f"<load{index}-{n}@example.net>" for index in range(ACCOUNTS) for n in range(PER_ACCOUNT + CYCLES - 1)
    }
    assert len(ids) == len(expected) and set(ids) == expected  # each once, none missing
    assert all(dovecot.maildir_count(user.name) == 0 for user in sources)
    # Flat: after the first cycle (imports, pools, caches warmed up) the peak hardly moves.
    assert peaks[-1] <= peaks[0] * 1.2 + 16, peaks


def _message_ids(dovecot: Dovecot, user: str) -> list[str]:
    with dovecot.imap(user) as client:
        client.select_folder("INBOX", readonly=True)
        uids = client.search("ALL")
        data = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
    parser = BytesHeaderParser()
    return [
        str(parser.parsebytes(item[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"])["Message-ID"])
        for item in data.values()
    ]
