"""Integration fixtures: a ledger on SQLite or PostgreSQL and a sync engine wired to the real Dovecot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from connector.config import Account, Config
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from connector.poll.result import PollResult
from tests.configs import make_config
from tests.messages import simple
from tests.servers.courier import Courier, CourierError, CourierUnavailable
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import ScriptedPop3Server, StoredMessage


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    """Each sync test runs once per ledger backend (a module may override this with one backend)."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))


@pytest.fixture
def ledger_engine(database: str) -> Iterator[Engine]:
    engine = open_database(database)
    yield engine
    engine.dispose()


SyncFactory = Callable[..., tuple[Config, SyncEngine]]


@pytest.fixture
def make_sync(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, database: str
) -> Iterator[SyncFactory]:
    """``make_sync(account={...}, ...)`` -> (config, engine); the account is named after its POP3 user so
    that tests sharing one PostgreSQL database never share ledger rows."""
    engines: list[Engine] = []

    def factory(**kwargs: Any) -> tuple[Config, SyncEngine]:
        kwargs.setdefault("name", mail_users.source.name)
        config = make_config(tmp_path, dovecot, mail_users, database, **kwargs)
        assert config.service.database is not None
        engine = open_database(config.service.database)
        engines.append(engine)
        return config, SyncEngine(config, Ledger(engine))

    yield factory
    for engine in engines:
        engine.dispose()


@pytest.fixture
def pop3() -> Iterator[ScriptedPop3Server]:
    """A scripted POP3 server holding three simple messages, for faults Dovecot cannot produce."""
    with ScriptedPop3Server([StoredMessage(f"uid-{n}", simple(n)) for n in range(3)]) as server:
        yield server


def scripted(server: ScriptedPop3Server, **extra: Any) -> dict[str, Any]:
    """Account fields for ``make_sync`` that read from the scripted server instead of Dovecot's POP3."""
    return {"port": server.port, "username": server.username, "password": server.password, **extra}


@pytest.fixture(scope="module")
def courier() -> Iterator[Courier]:
    """A real Courier POP3/IMAP server for the tests of one module (skipped where it cannot run)."""
    try:
        server = Courier().start()
    except CourierUnavailable as exc:
        pytest.skip(f"cannot run Courier on this machine: {exc}")
    except CourierError as exc:
        pytest.fail(f"cannot run the Courier test server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


class FullPolls:
    """A ``full_poll`` for ``poll_round`` that counts the full polls per account (the idle probe's polls do
    not go through it)."""

    def __init__(self, engine: SyncEngine) -> None:
        self.engine = engine
        self.count: Counter[str] = Counter()

    def __call__(self, account: Account) -> PollResult:
        self.count[account.name] += 1
        return self.engine.poll(account)


def made_idle(engine: SyncEngine, account: Account) -> None:
    """The first poll delivers; the second, in full since the last one delivered, finds nothing: the next
    one is the idle probe's."""
    assert engine.poll(account).delivered
    assert engine.poll(account).idle
