"""A poll's world without servers: the engine wired to the fakes (fakes.py), a SQLite ledger in tmp_path and
a clock that moves only when told. ``make_rig(...)`` builds one; see ``Rig``."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from connector.config import Account, Config, parse_config
from connector.ledger.database import open_database
from connector.ledger.records import AccountStatus, KnownMessage, MessageState
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from connector.poll.events import PollObserver
from connector.poll.result import PollResult
from tests.messages import simple
from tests.unit.poll.fakes import (
    FakeClock,
    FakeDestination,
    FakeMaildrop,
    FakeMessage,
    RecordingObserver,
    connections,
)

ACCOUNT = "alice"
START = datetime(2025, 6, 3, 10, 0, tzinfo=UTC)
# Unlike any word of an error message: the configuration loader registers it for redaction.
PASSWORD = "pw-4c1e9b7f"


def messages(count: int) -> list[FakeMessage]:
    """``count`` distinct messages, ``uid-1`` ... (tests/messages.py's ``simple(n)``)."""
    return [FakeMessage(f"uid-{n}", simple(n)) for n in range(1, count + 1)]


@dataclass
class Rig:
    """One account (``alice``, into destination ``archive``), its POP3 server, its destination and the
    ledger; ``poll()`` runs one poll of the account through the public API."""

    config: Config
    ledger: Ledger
    maildrop: FakeMaildrop
    destination: FakeDestination
    recipients: dict[str, FakeDestination]
    clock: FakeClock
    observer: RecordingObserver
    extra_observers: list[PollObserver] = field(default_factory=list)

    @property
    def account(self) -> Account:
        return self.config.accounts[0]

    def engine(self) -> SyncEngine:
        return SyncEngine(
            self.config,
            self.ledger,
            connections(self.maildrop, self.destination, self.recipients),
            clock=self.clock,
            observers=[self.observer, *self.extra_observers],
        )

    def poll(self, *, dry_run: bool = False, stop: threading.Event | None = None) -> PollResult:
        return self.engine().poll(self.account, dry_run=dry_run, stop=stop)

    # --- the committed ledger ---------------------------------------------------------------------------

    def account_id(self) -> int | None:
        return self.ledger.account_id(ACCOUNT, create=False)

    def rows(self) -> dict[str, KnownMessage]:
        """Every message row as committed now (deferred writes not yet committed are not in it)."""
        account_id = self.account_id()
        return self.ledger.known_messages(account_id) if account_id is not None else {}

    def row(self, uidl: str) -> KnownMessage:
        return self.rows()[uidl]

    def states(self) -> dict[str, MessageState]:
        return {uidl: row.state for uidl, row in self.rows().items()}

    def status(self) -> AccountStatus:
        [status] = [status for status in self.ledger.statuses() if status.name == ACCOUNT]
        return status


RigFactory = Callable[..., Rig]


@pytest.fixture(scope="session")
def ledger_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty ledger file, copied for each test (migrating costs more than a whole poll)."""
    path = tmp_path_factory.mktemp("ledger") / "template.db"
    open_database(f"sqlite:///{path}").dispose()
    return path


@pytest.fixture
def make_rig(tmp_path: Path, ledger_template: Path) -> Iterator[RigFactory]:
    """``make_rig(3, account={...}, destination={...}, defaults={...}, batch=1, capabilities=[...],
    recipients=["bob"])``: the first argument is a message count or a list of ``FakeMessage``; the dicts are
    configuration fields (TOML tables) over a minimal one."""
    engines: list[Engine] = []

    def factory(
        mail: int | list[FakeMessage] = 1,
        *,
        account: dict[str, Any] | None = None,
        destination: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None,
        batch: int = 1,
        capabilities: list[str] | None = None,
        recipients: list[str] | None = None,
    ) -> Rig:
        path = tmp_path / f"ledger-{len(engines)}.db"
        shutil.copyfile(ledger_template, path)
        data = {
            "service": {"database": f"sqlite:///{path}"},
            # No jitter: the next poll time is exact.
            "defaults": {"poll_jitter": 0, **(defaults or {})},
            "destinations": [
                {
                    "name": "archive",
                    "type": "imap",
                    "host": "imap.fake.example",
                    "username": "archive",
                    "password": PASSWORD,
                    **(destination or {}),
                }
            ],
            "accounts": [
                {
                    "name": ACCOUNT,
                    "host": "pop.fake.example",
                    "username": ACCOUNT,
                    "password": PASSWORD,
                    "destination": "archive",
                    **(account or {}),
                }
            ],
        }
        config = parse_config(data, tmp_path / "config.toml")
        engine = open_database(f"sqlite:///{path}", migrate=False)
        engines.append(engine)
        clock = FakeClock(START)
        maildrop = FakeMaildrop(messages(mail) if isinstance(mail, int) else mail)
        if capabilities is not None:
            maildrop.capabilities = capabilities
        return Rig(
            config=config,
            ledger=Ledger(engine, clock=clock),
            maildrop=maildrop,
            destination=FakeDestination("archive", batch=batch),
            recipients={name: FakeDestination(name) for name in recipients or []},
            clock=clock,
            observer=RecordingObserver(),
        )

    yield factory
    for engine in engines:
        engine.dispose()
