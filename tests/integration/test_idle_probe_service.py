"""``run``'s scheduler with the idle probe (connector/service/scheduler.py, connector/poll/probe.py).

The scheduler hands accounts the probe may try to the probe's thread; it records the idle ones and hands
the others back for a full poll. Against a real Dovecot: idle polls are probed (no full poll), a message
that arrives is delivered exactly once by a full poll the probe handed the account to, and every poll's
end schedules the next one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connector.config import Account, load_config
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from connector.poll.events import Finished, PollEvent
from connector.poll.probe import Done, IdleProbe, Take
from connector.poll.result import PollResult
from connector.service.scheduler import Service
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUser

pytestmark = pytest.mark.integration

# A phase that makes no progress for this long is a hang, not slowness (it never bounds a duration).
STALL_SECONDS = 120.0
# Polls of all accounts together without reaching what a phase waits for: it is not coming.
MORE_POLLS = 100


class _CountingEngine(SyncEngine):
    """Counts the full polls (``SyncEngine.poll``); the probe's polls do not go through it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full: Counter[str] = Counter()

    def poll(self, account: Account, **kwargs: Any) -> PollResult:
        self.full[account.name] += 1
        return super().poll(account, **kwargs)


class _Finished:
    """Every poll's Finished event, as the observers get it, probed or full."""

    def __init__(self) -> None:
        self.polls: Counter[str] = Counter()
        self.failed: list[PollResult] = []
        self.changed = threading.Condition()

    def notify(self, event: PollEvent) -> None:
        if isinstance(event, Finished):
            with self.changed:
                self.polls[event.account] += 1
                if not event.result.ok:
                    self.failed.append(event.result)
                self.changed.notify_all()

    def wait(self, what: str, done: Any) -> None:
        with self.changed:
            start = self.polls.total()
            while not done():
                assert not self.failed, self.failed[:3]
                # Polls go on every second whatever the probe does: many without ``done`` is a failure.
                assert self.polls.total() - start < MORE_POLLS, f"{MORE_POLLS} polls without {what}"
                before = self.polls.total()
                self.changed.wait(STALL_SECONDS)
                assert self.polls.total() > before or done(), f"no poll for {STALL_SECONDS}s ({what})"
            assert not self.failed, self.failed[:3]


def _config(tmp_path: Path, dovecot: Dovecot, sources: list[MailUser], sink: MailUser, url: str) -> Path:
    lines = [
        f'[service]\ndatabase = "{url}"\nmax_workers = 4\n',
        '[defaults]\npoll_interval = "1s"\npoll_jitter = 0\nretention = "keep"\n',
        f'[[destinations]]\nname = "dovecot"\ntype = "imap"\nhost = "{dovecot.host}"\n'
        f'port = {dovecot.ports.imap}\ntls = "none"\nusername = "{sink.name}"\n'
        f'password = "{sink.password}"\n',
    ]
    for user in sources:
        lines.append(
            f'[[accounts]]\nname = "{user.name}"\nhost = "{dovecot.host}"\nport = {dovecot.ports.pop3}\n'
            f'tls = "none"\nusername = "{user.name}"\npassword = "{user.password}"\ndestination = "dovecot"\n'
        )
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines))
    return path


@dataclass
class _Rig:
    """``count`` accounts with one message each on Dovecot, and a ``Service`` as `run` builds it, with
    ``probe_type`` as its idle probe; ``finished`` sees every poll, ``engine.full`` counts the full ones."""

    sources: list[MailUser]
    sink: MailUser
    engine: _CountingEngine
    finished: _Finished
    service: Service

    @property
    def names(self) -> list[str]:
        return [user.name for user in self.sources]


@contextmanager
def _running(
    dovecot: Dovecot, url: str, tmp_path: Path, prefix: str, count: int, probe_type: type[IdleProbe]
) -> Iterator[_Rig]:
    sources = [dovecot.new_user(prefix) for _ in range(count)]
    sink = dovecot.new_user(f"{prefix}sink")
    for index, user in enumerate(sources):
        dovecot.seed(user.name, [simple(index)])
    config = load_config(_config(tmp_path, dovecot, sources, sink, url))
    database = open_database(url)
    finished = _Finished()
    ledger = Ledger(database)
    engine = _CountingEngine(config, ledger, observers=[finished])
    service = Service(config, engine, ledger, probe=probe_type(engine, at_once=4))
    service.start()
    try:
        yield _Rig(sources, sink, engine, finished, service)
    finally:
        service.shutdown()
        database.dispose()


def test_run_probes_idle_accounts_and_delivers_new_mail_once(
    dovecot: Dovecot, sqlite_url: str, tmp_path: Path
) -> None:
    with _running(dovecot, sqlite_url, tmp_path, "probed", 5, IdleProbe) as rig:
        engine, finished, names = rig.engine, rig.finished, rig.names
        # The first poll delivers, the second (in full: the last one delivered) finds nothing, and from then
        # on the probe polls them.
        finished.wait("probed polls", lambda: all(finished.polls[n] >= engine.full[n] + 2 for n in names))
        assert all(engine.full[n] >= 2 for n in names)
        newcomer = names[0]
        dovecot.seed(newcomer, [simple(99)])
        full_before = engine.full[newcomer]
        # The probe hands the account over; the full poll delivers; then it is idle (and probed) again.
        finished.wait(
            "the new message delivered and the account probed again",
            lambda: (
                engine.full[newcomer] >= full_before + 2
                and finished.polls[newcomer] >= engine.full[newcomer] + 1
            ),
        )
    assert dovecot.maildir_count(rig.sink.name) == len(names) + 1  # each message once, none lost
    assert all(dovecot.maildir_count(name) == 1 for name in names[1:])
    assert dovecot.maildir_count(newcomer) == 2  # retention keep


class _BrokenProbe(IdleProbe):
    """Takes the first accounts handed to it, then fails: a bug in the probe."""

    def serve(self, take: Take, done: Done, stop: threading.Event | None = None) -> None:
        while not take(10, 0.5):
            pass
        raise RuntimeError("a bug in the probe")


def test_accounts_in_a_probe_that_fails_are_polled_in_full_and_the_service_goes_on(
    dovecot: Dovecot, sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _running(dovecot, sqlite_url, tmp_path, "orphan", 3, _BrokenProbe) as rig:
        finished = rig.finished
        # Each account is polled again and again although the probe took some of them and died.
        finished.wait("polls after the probe failed", lambda: all(finished.polls[n] >= 4 for n in rig.names))
    assert "idle probe failed" in caplog.text
    assert dovecot.maildir_count(rig.sink.name) == len(rig.names)
