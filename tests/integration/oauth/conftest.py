"""OAuth fixtures: the tests' own token server (HTTP and HTTPS) and a Dovecot that validates its tokens.

The OAuth Dovecot is a second instance, so that the main ``dovecot`` fixture keeps its exact set-up.
"""

from __future__ import annotations

import functools
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from connector.config import Config, parse_config
from connector.connections import Connections, open_imap_destination, open_source
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.oauth import TokenProviders
from connector.poll.engine import SyncEngine
from connector.poll.result import PollResult
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers, fresh_users, running_for_tests
from tests.servers.scripted_pop3 import tls_contexts
from tests.servers.token_server import TokenServer


@dataclass
class TokenPeer:
    server: TokenServer
    ca_file: Path


@pytest.fixture(scope="session")
def token_peer() -> Iterator[TokenPeer]:
    directory = Path(tempfile.mkdtemp(prefix="token-server-"))
    context, ca_file = tls_contexts(directory)
    with TokenServer(tls_context=context) as server:
        yield TokenPeer(server, ca_file)


@pytest.fixture(scope="session")
def oauth_dovecot(token_peer: TokenPeer) -> Iterator[Dovecot]:
    with running_for_tests(oauth2_introspection_url=token_peer.server.introspection_url) as server:
        yield server


@pytest.fixture
def oauth_users(oauth_dovecot: Dovecot) -> Iterator[MailUsers]:
    with fresh_users(oauth_dovecot) as users:
        yield users


@dataclass(frozen=True)
class App:
    """An app registered at the token server, granted one mailbox."""

    client_id: str
    secret: str
    mailbox: str

    def table(self, server: TokenServer, **extra: Any) -> dict[str, Any]:
        return {
            "token_url": server.token_url,
            "client_id": self.client_id,
            "client_secret": self.secret,
            **extra,
        }

    def requests(self, server: TokenServer) -> int:
        return sum(1 for form in server.recorded.token_requests if form.get("client_id") == self.client_id)


@pytest.fixture
def register_app(token_peer: TokenPeer) -> Callable[[str], App]:
    def register(mailbox: str) -> App:
        app = App(f"app-{secrets.token_hex(4)}", f"secret-{secrets.token_hex(8)}", mailbox)
        token_peer.server.add_client(app.client_id, secret=app.secret, mailbox=mailbox)
        return app

    return register


class FakeClock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class OAuthSync:
    """Builds a config for the OAuth Dovecot and polls it with token providers of its own (and clock)."""

    tmp_path: Path
    dovecot: Dovecot
    users: MailUsers
    database: str
    peer: TokenPeer
    register: Callable[[str], App]
    clock: FakeClock = field(default_factory=FakeClock)
    engines: list[Engine] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.providers = TokenProviders(clock=self.clock)
        self.connections = Connections(
            open_source=functools.partial(open_source, providers=self.providers),
            open_destination=functools.partial(open_imap_destination, providers=self.providers),
        )

    def config(
        self,
        *,
        destination: dict[str, Any] | None = None,
        account: dict[str, Any] | None = None,
        accounts: list[dict[str, Any]] | None = None,
    ) -> Config:
        base_account: dict[str, Any] = {
            "name": self.users.source.name,
            "host": self.dovecot.host,
            "port": self.dovecot.ports.pop3,
            "tls": "none",
            "username": self.users.source.name,
            "password": self.users.source.password,
            "destination": "exo",
            "timeout": "20s",
        }
        data = {
            "service": {"database": self.database},
            "destinations": [
                {
                    "name": "exo",
                    "type": "imap",
                    "host": self.dovecot.host,
                    "port": self.dovecot.ports.imap,
                    "tls": "none",
                    "username": self.users.destination.name,
                    **(destination or {}),
                }
            ],
            "accounts": accounts or [_merged(base_account, account or {})],
        }
        return parse_config(data, self.tmp_path / "config.toml")

    @property
    def token_server(self) -> TokenServer:
        return self.peer.server

    def destination_app(self) -> tuple[App, dict[str, Any]]:
        """An app granted the destination mailbox, and the destination settings that use it."""
        app = self.register(self.users.destination.name)
        return app, {"auth": "oauth2", "oauth": app.table(self.token_server)}

    def source_app(self, *, initial_response: bool = False) -> tuple[App, dict[str, Any]]:
        """An app granted the POP3 mailbox, and the account settings that use it."""
        app = self.register(self.users.source.name)
        account = {
            "auth": "oauth2",
            "password": None,
            "oauth": app.table(self.token_server),
            "auth_initial_response": initial_response,
        }
        return app, account

    def all_oauth(self, *, initial_response: bool = False) -> tuple[Config, App, App]:
        """(config, source app, destination app): both sides log in with XOAUTH2."""
        source_app, account = self.source_app(initial_response=initial_response)
        destination_app, destination = self.destination_app()
        return self.config(destination=destination, account=account), source_app, destination_app

    def seed(self, *numbers: int) -> None:
        self.dovecot.seed(self.users.source.name, [simple(n) for n in numbers])

    def poll(self, config: Config, account: int = 0) -> PollResult:
        assert config.service.database is not None
        engine = open_database(config.service.database)
        self.engines.append(engine)
        return SyncEngine(config, Ledger(engine), self.connections).poll(config.accounts[account])


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **overrides}
    return {key: value for key, value in merged.items() if value is not None}


@pytest.fixture
def oauth_sync(
    tmp_path: Path,
    oauth_dovecot: Dovecot,
    oauth_users: MailUsers,
    sqlite_url: str,
    token_peer: TokenPeer,
    register_app: Callable[[str], App],
) -> Iterator[OAuthSync]:
    sync = OAuthSync(tmp_path, oauth_dovecot, oauth_users, sqlite_url, token_peer, register_app)
    yield sync
    for engine in sync.engines:
        engine.dispose()
