"""The Gmail destination end to end: the sync engine with the real Dovecot as the POP3 side, importing into
the Gmail API test server (tests/servers/gmail.py) with real google-auth sign-ins against the token server:
a Workspace service account acting as each user (JWT bearer), and a personal consent from a token file
(refresh token)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from connector.cli.check import run_checks
from connector.config import Config, load_config
from connector.destinations import gmail as gmail_module
from connector.destinations.base import look_up
from connector.destinations.gmail import QuotaPacer, open_gmail
from connector.destinations.gmail_auth import LOGINS
from connector.destinations.gmail_tokens import GMAIL_SCOPES, StoredToken, read_token, token_file, write_token
from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationTempError,
    DestinationTLSError,
)
from connector.ledger.database import open_database
from connector.ledger.records import MessageState
from connector.ledger.store import Ledger
from connector.message import FetchedMessage, MessageSpool, stamp_key
from connector.poll.engine import SyncEngine
from tests.configs import write_tables
from tests.delivery import assert_exactly_once, stamp_of
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.gmail import GmailServer
from tests.servers.token_server import Client, ServiceAccount

pytestmark = pytest.mark.integration

ALICE = "alice@example.com"
BOB = "bob@example.com"
PERSONAL = "carol@gmail.example"
CORPUS = sorted((Path(__file__).parents[1] / "corpus").glob("*.eml"))


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def gmail() -> Iterator[GmailServer]:
    with GmailServer() as server:
        for user in (ALICE, BOB, PERSONAL):
            server.add_user(user)
        yield server
    LOGINS.clear()  # access tokens of this server's token endpoint mean nothing to the next one


@pytest.fixture(autouse=True)
def _pacing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pacer of each test's own (a process-wide one would carry one test's debt into the next), a
    little under Gmail's quota so that the server's strict one-second window holds despite jitter."""
    monkeypatch.setattr(gmail_module, "PACER", QuotaPacer(200, burst=25))


@pytest.fixture
def service_account(gmail: GmailServer) -> ServiceAccount:
    """Delegated exactly the destination's scopes, for ALICE and BOB (as in the Admin console)."""
    return gmail.tokens.add_service_account(scopes=GMAIL_SCOPES, users=[ALICE, BOB])


@pytest.fixture
def desktop(gmail: GmailServer) -> Client:
    return gmail.tokens.add_desktop_client()


def workspace(
    gmail: GmailServer, account: ServiceAccount, tmp_path: Path, **overrides: Any
) -> dict[str, Any]:
    key = account.write_key(tmp_path / "service-account.json")
    return {
        "name": "workspace",
        "type": "gmail",
        "service_account_key": {"file": str(key)},
        "api_url": gmail.api_url,
        "ca_file": str(gmail.ca_file),
        **overrides,
    }


def personal(
    gmail: GmailServer, client: Client, tmp_path: Path, *, user: str = PERSONAL, **overrides: Any
) -> dict[str, Any]:
    """A destination with the client's secrets and a consent of ``user`` in its token directory, as
    ``pop-connector authorize`` leaves it."""
    secrets_file = gmail.tokens.write_client_secrets(client, tmp_path / "client_secret.json")
    token_dir = tmp_path / "tokens"
    refresh = gmail.tokens.issue_refresh_token(client.client_id, user=user, scope=" ".join(GMAIL_SCOPES))
    assert client.secret is not None
    stored = StoredToken(user, client.client_id, client.secret, refresh, gmail.tokens.google_token_url)
    write_token(token_file(token_dir, user), stored)
    return {
        "name": "gmail",
        "type": "gmail",
        "client_secrets": {"file": str(secrets_file)},
        "token_dir": str(token_dir),
        "api_url": gmail.api_url,
        "ca_file": str(gmail.ca_file),
        **overrides,
    }


class Syncs:
    """Configurations and engines on the real Dovecot, as ``make_sync`` builds them for IMAP."""

    def __init__(self, tmp_path: Path, dovecot: Dovecot, users: MailUsers, database: str) -> None:
        self.tmp_path, self.dovecot, self.users, self.database = tmp_path, dovecot, users, database
        self.engines: list[Engine] = []

    def account(self, destination: str, **fields: Any) -> dict[str, Any]:
        user = fields.pop("user", self.users.source)
        return {
            "name": user.name,
            "host": self.dovecot.host,
            "port": self.dovecot.ports.pop3,
            "tls": "none",
            "username": user.name,
            "password": user.password,
            "destination": destination,
            "timeout": "20s",
            **fields,
        }

    def __call__(self, destination: dict[str, Any], *accounts: dict[str, Any]) -> tuple[Config, SyncEngine]:
        accounts = accounts or (self.account(destination["name"]),)
        path = write_tables(self.tmp_path / "config.toml", self.database, [destination], list(accounts))
        config = load_config(path)
        assert config.service.database is not None
        engine = open_database(config.service.database)
        self.engines.append(engine)
        return config, SyncEngine(config, Ledger(engine))


@pytest.fixture
def syncs(tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, database: str) -> Iterator[Syncs]:
    factory = Syncs(tmp_path, dovecot, mail_users, database)
    yield factory
    for engine in factory.engines:
        engine.dispose()


def pending_row(engine: SyncEngine, account: str) -> tuple[MessageState, int]:
    account_id = engine.ledger.account_id(account) or 0
    (row,) = engine.ledger.known_messages(account_id).values()
    return row.state, row.attempts


# --- through the engine -------------------------------------------------------------------------------------


def test_the_hostile_corpus_is_imported_exactly_once_byte_for_byte_with_labels_and_unread(
    gmail: GmailServer,
    service_account: ServiceAccount,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
) -> None:
    gmail.quota = 250  # Gmail's per-user rate limit, in its units: the pacing keeps under it
    originals = [simple(1), *(path.read_bytes() for path in CORPUS), simple(2)]
    dovecot.seed(mail_users.source.name, originals)
    served = dovecot.pop3_contents(mail_users.source.name)
    config, engine = syncs(
        workspace(gmail, service_account, tmp_path),
        syncs.account("workspace", mailbox=ALICE, retry={"max_attempts": 1}),
    )
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.quarantined) == ("ok", len(served), 0), result

    imports = gmail.imports_for(ALICE)
    assert "429" not in str(result.problems) and all(r.status != 429 for r in gmail.requests)
    assert_exactly_once(served, [record.data for record in imports])
    account_label = f"Hosted/{mail_users.source.name}"
    for record in imports:
        assert stamp_of(record.data) is not None
        assert record.params["internalDateSource"] == "dateHeader"
        assert (record.params["neverMarkSpam"], record.params["processForCalendar"]) == ("false", "false")
        assert gmail.label_names(ALICE, record.message) == ["INBOX", account_label, "UNREAD"]
    assert {label.name for label in gmail.mailbox(ALICE).labels.values()} >= {"Hosted", account_label}
    assert dovecot.maildir_count(mail_users.source.name) == 0
    # The ledger names each Gmail message.
    with sqlite3.connect(syncs.database.removeprefix("sqlite:///")) as db:
        refs = {ref for (ref,) in db.execute("SELECT destination_ref FROM messages")}
    assert refs == {f"gmail:{ALICE};id={record.message.id}" for record in imports}
    # A second poll has nothing to do.
    again = engine.poll(config.accounts[0])
    assert (again.status, again.delivered) == ("ok", 0)
    assert len(gmail.imports_for(ALICE)) == len(served)


def test_a_personal_consent_imports_and_keeps_a_rotated_refresh_token(
    gmail: GmailServer, desktop: Client, syncs: Syncs, dovecot: Dovecot, mail_users: MailUsers, tmp_path: Path
) -> None:
    gmail.tokens.rotate_refresh_tokens = True
    dovecot.seed(mail_users.source.name, [simple(1), simple(2)])
    destination = personal(gmail, desktop, tmp_path, labels=["INBOX", "STARRED"], mark_seen=True)
    config, engine = syncs(destination)  # no mailbox: the one user who gave consent
    path = token_file(tmp_path / "tokens", PERSONAL)
    before = read_token(path).refresh_token

    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered) == ("ok", 2), result
    imports = gmail.imports_for(PERSONAL)
    assert [record.data[record.data.index(b"\r\n") + 2 :] for record in imports] == [simple(1), simple(2)]
    account_label = f"Hosted/{mail_users.source.name}"
    assert [gmail.label_names(PERSONAL, r.message) for r in imports] == [
        ["INBOX", "STARRED", account_label]
    ] * 2
    # Google rotated the refresh token: the new one is in the file (mode 600) and the old one is dead.
    after = read_token(path)
    assert after.refresh_token != before and after.refresh_token in gmail.tokens.refresh_tokens_of(PERSONAL)
    assert path.stat().st_mode & 0o777 == 0o600
    # A restart (a new process: no cached login) signs in with the rotated token, without a new consent.
    LOGINS.clear()
    dovecot.seed(mail_users.source.name, [simple(3)])
    assert engine.poll(config.accounts[0]).delivered == 1


def test_a_lost_import_answer_is_found_by_the_next_poll_and_not_imported_twice(
    gmail: GmailServer,
    service_account: ServiceAccount,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = syncs(
        workspace(gmail, service_account, tmp_path), syncs.account("workspace", mailbox=ALICE)
    )
    account = config.accounts[0]
    gmail.lose_response("import")  # Gmail imported it, the answer never came back
    first = engine.poll(account)
    assert (first.status, first.delivered, first.deleted) == ("error", 0, 0), first
    assert len(gmail.imports_for(ALICE)) == 1
    assert pending_row(engine, account.name) == (MessageState.PENDING, 0)
    # The next poll looks first, by Message-ID and then the stamp (Gmail's copy has other bytes).
    gmail.requests.clear()
    second = engine.poll(account)
    assert (second.status, second.recovered, second.delivered, second.deleted) == ("ok", 1, 0, 1), second
    assert "list" in gmail.kinds() and "get" in gmail.kinds() and "import" not in gmail.kinds()
    assert len(gmail.imports_for(ALICE)) == 1
    assert dovecot.maildir_count(mail_users.source.name) == 0


def test_a_lookup_that_fails_stops_the_poll_and_imports_nothing(
    gmail: GmailServer,
    service_account: ServiceAccount,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = syncs(
        workspace(gmail, service_account, tmp_path), syncs.account("workspace", mailbox=ALICE)
    )
    account = config.accounts[0]
    gmail.drop_request("import")  # nothing imported, no answer: the message stays pending
    assert engine.poll(account).status == "error"
    assert gmail.imports_for(ALICE) == []
    gmail.server_error("list", status=503)
    second = engine.poll(account)
    assert (second.status, second.delivered, second.recovered) == ("error", 0, 0), second
    assert second.error is not None and "search" in second.error and "503" in second.error
    assert "the lookup for an earlier delivery got no answer" in second.error
    assert gmail.imports_for(ALICE) == []
    assert pending_row(engine, account.name) == (MessageState.PENDING, 0)
    third = engine.poll(account)  # the lookup answers "not there": now it is imported
    assert (third.status, third.delivered) == ("ok", 1), third
    assert len(gmail.imports_for(ALICE)) == 1


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (lambda g: g.rate_limit("import", retry_after=30), "rateLimitExceeded"),
        (lambda g: g.user_rate_limit("import", retry_after=30), "userRateLimitExceeded"),
        (lambda g: g.server_error("import", status=503), "503"),
        (lambda g: g.rate_limit("labels.list", retry_after=30), "rateLimitExceeded"),
    ],
    ids=["429", "403-user-rate", "503", "429-labels"],
)
def test_rate_limits_and_server_errors_back_off_without_counting_an_attempt(
    gmail: GmailServer,
    service_account: ServiceAccount,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
    fault: Any,
    said: str,
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1), simple(2)])
    config, engine = syncs(
        workspace(gmail, service_account, tmp_path),
        syncs.account("workspace", mailbox=ALICE, retry={"max_attempts": 1}),
    )
    account = config.accounts[0]
    fault(gmail)
    first = engine.poll(account)
    assert (first.status, first.delivered, first.quarantined) == ("error", 0, 0), first
    assert first.error is not None and said in first.error and "backs off" in first.error
    if "rateLimit" in said:
        assert "Retry-After: 30" in first.error
    account_id = engine.ledger.account_id(account.name) or 0
    assert [row.attempts for row in engine.ledger.known_messages(account_id).values()] in ([0], [])
    assert dovecot.maildir_count(mail_users.source.name) == 2
    second = engine.poll(account)  # max_attempts = 1, yet nothing was quarantined
    assert (second.status, second.delivered, second.quarantined) == ("ok", 2, 0), second


def test_a_revoked_consent_is_an_authentication_failure_naming_the_authorize_command(
    gmail: GmailServer, desktop: Client, syncs: Syncs, dovecot: Dovecot, mail_users: MailUsers, tmp_path: Path
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = syncs(
        personal(gmail, desktop, tmp_path),
        syncs.account("gmail", mailbox=PERSONAL, retry={"max_attempts": 1}),
    )
    account = config.accounts[0]
    gmail.tokens.revoke_consent(PERSONAL)
    result = engine.poll(account)
    assert result.status == "auth_error", result
    assert result.error is not None
    assert "invalid_grant" in result.error and "expired or revoked" in result.error
    assert f"run `pop-connector authorize gmail --user {PERSONAL}`" in result.error
    assert gmail.imports_for(PERSONAL) == []
    assert dovecot.maildir_count(mail_users.source.name) == 1
    # The consent is given again (authorize writes a new token file): the next poll imports.
    personal(gmail, desktop, tmp_path)
    assert engine.poll(account).delivered == 1


def test_a_token_revoked_while_valid_gets_one_new_token_then_fails_as_authentication(
    gmail: GmailServer,
    service_account: ServiceAccount,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = syncs(
        workspace(gmail, service_account, tmp_path), syncs.account("workspace", mailbox=ALICE)
    )
    assert engine.poll(config.accounts[0]).delivered == 1
    gmail.tokens.expire_all()  # the cached access token is refused: one 401, a new token, on we go
    dovecot.seed(mail_users.source.name, [simple(2)])
    assert engine.poll(config.accounts[0]).delivered == 1
    # The delegation is withdrawn in the Admin console: Workspace's hint, not `authorize`.
    gmail.tokens.service_accounts[service_account.client_email].scopes = frozenset()
    gmail.tokens.expire_all()
    dovecot.seed(mail_users.source.name, [simple(3)])
    result = engine.poll(config.accounts[0])
    assert result.status == "auth_error", result
    assert result.error is not None and "unauthorized_client" in result.error
    assert "domain-wide delegation" in result.error and "pop-connector authorize" not in result.error


def test_a_service_account_acts_as_each_workspace_user(
    gmail: GmailServer,
    service_account: ServiceAccount,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    dovecot.seed(mail_users.destination.name, [simple(2)])
    config, engine = syncs(
        workspace(gmail, service_account, tmp_path, account_label=""),
        syncs.account("workspace", mailbox=ALICE),
        syncs.account("workspace", mailbox=BOB, user=mail_users.destination),
    )
    for account in config.accounts:
        assert engine.poll(account).delivered == 1
    assert [gmail.label_names(ALICE, r.message) for r in gmail.imports_for(ALICE)] == [["INBOX", "UNREAD"]]
    assert [r.data.endswith(simple(1)) for r in gmail.imports_for(ALICE)] == [True]
    assert [r.data.endswith(simple(2)) for r in gmail.imports_for(BOB)] == [True]
    # One JWT-bearer grant per user, each acting as that user (the "sub" of domain-wide delegation).
    assert {token.user for token in gmail.tokens.issued()} == {ALICE, BOB}
    assert {r.user for r in gmail.requests if r.kind == "import"} == {ALICE, BOB}


def test_a_user_outside_the_delegation_is_refused_with_the_admin_console_hint(
    gmail: GmailServer,
    service_account: ServiceAccount,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = syncs(
        workspace(gmail, service_account, tmp_path), syncs.account("workspace", mailbox="mallory@example.com")
    )
    result = engine.poll(config.accounts[0])
    assert result.status == "auth_error", result
    assert result.error is not None and "Invalid email or User ID" in result.error


def test_a_large_message_goes_in_a_resumable_upload_and_an_oversize_one_is_quarantined(
    gmail: GmailServer,
    service_account: ServiceAccount,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gmail_module, "SIMPLE_UPLOAD_LIMIT", 64 * 1024)
    monkeypatch.setattr(gmail_module, "RESUMABLE_CHUNK", 256 * 1024)
    big, small, oversize = simple(1, size=700_000), simple(2), simple(3, size=1_200_000)
    dovecot.seed(mail_users.source.name, [big, small, oversize])
    config, engine = syncs(
        workspace(gmail, service_account, tmp_path, max_message_size="1MB"),
        syncs.account("workspace", mailbox=ALICE),
    )
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.quarantined) == ("ok", 2, 1), result
    assert any("max_message_size of 1048576 bytes" in problem for problem in result.problems), result.problems
    imports = gmail.imports_for(ALICE)
    assert [record.upload_type for record in imports] == ["resumable", "multipart"]
    assert_exactly_once([big, small], [record.data for record in imports])
    assert sum(1 for r in gmail.requests if r.kind == "upload") == 3  # 700 KB in chunks of 256 KiB
    assert dovecot.maildir_count(mail_users.source.name) == 1  # the oversize one stays on the server


def test_check_reads_the_profile_and_labels_and_writes_nothing(
    gmail: GmailServer, desktop: Client, syncs: Syncs, tmp_path: Path
) -> None:
    config, _ = syncs(personal(gmail, desktop, tmp_path))
    lines: list[str] = []
    assert run_checks(config, lines.append)
    assert any(
        "destination gmail OK" in line
        and f"Gmail user {PERSONAL}" in line
        and "the first import creates Hosted, Hosted/" in line
        for line in lines
    ), lines
    assert set(gmail.kinds()) == {"profile", "labels.list"}
    assert all(label.type == "system" for label in gmail.mailbox(PERSONAL).labels.values())
    gmail.tokens.revoke_consent(PERSONAL)
    LOGINS.clear()
    lines.clear()
    assert not run_checks(config, lines.append)
    assert any(
        "destination gmail FAILED" in line and "pop-connector authorize gmail" in line for line in lines
    )


def test_no_secret_reaches_a_log_line_an_error_or_the_ledger(
    gmail: GmailServer,
    service_account: ServiceAccount,
    desktop: Client,
    syncs: Syncs,
    dovecot: Dovecot,
    mail_users: MailUsers,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger as verbose as the configuration can make it
    for name in ("urllib3", "requests"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    dovecot.seed(mail_users.source.name, [simple(1), simple(2)])
    dovecot.seed(mail_users.destination.name, [simple(3)])
    gmail.tokens.rotate_refresh_tokens = True
    destination = personal(gmail, desktop, tmp_path)
    config, engine = syncs(destination, syncs.account("gmail", mailbox=PERSONAL))
    snapshots: list[str] = []

    def poll(engine: SyncEngine, account: Any) -> None:
        engine.poll(account)
        with sqlite3.connect(syncs.database.removeprefix("sqlite:///")) as db:
            tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            rows = [list(db.execute(f"SELECT * FROM {table}")) for table in tables]
        snapshots.append(json.dumps(rows, default=str))

    gmail.lose_response("import")
    poll(engine, config.accounts[0])  # a lost answer,
    poll(engine, config.accounts[0])  # a recovery,
    LOGINS.clear()
    dovecot.seed(mail_users.source.name, [simple(4)])
    refresh = read_token(token_file(tmp_path / "tokens", PERSONAL)).refresh_token
    echo = f"refresh token {refresh} of the client with secret {desktop.secret} was revoked"
    gmail.tokens.fail_token_requests(400, {"error": "invalid_grant", "error_description": echo})
    poll(engine, config.accounts[0])  # a refused consent, the token endpoint quoting the secrets
    ws_config, ws_engine = syncs(
        workspace(gmail, service_account, tmp_path),
        syncs.account("workspace", mailbox=BOB, user=mail_users.destination),
    )
    gmail.rate_limit("import")
    poll(ws_engine, ws_config.accounts[0])  # a rate limit
    poll(ws_engine, ws_config.accounts[0])  # and an import as a service account
    assert len(gmail.imports_for(BOB)) == 1

    private_key = service_account.key["private_key"]
    key_lines = [line for line in private_key.splitlines() if line and not line.startswith("-----")]
    assert desktop.secret is not None
    secrets = [
        desktop.secret,
        *key_lines,
        *(token.value for token in gmail.tokens.issued()),
        *gmail.tokens.refresh_tokens.keys(),
    ]
    assert len(secrets) > 10
    logged = "\n".join(record.getMessage() for record in caplog.records)
    logged += "\n".join(str(record.__dict__) for record in caplog.records)  # extras too (JSON logs)
    assert "Gmail destination" in logged  # the logs did see the failures
    ledger = "\n".join(snapshots)
    assert "invalid_grant" in ledger and "rateLimitExceeded" in ledger  # the errors were recorded
    assert "refresh token **** of the client with secret **** was revoked" in ledger
    for secret in secrets:
        assert secret not in logged
        assert secret not in ledger


# --- the session on its own ---------------------------------------------------------------------------------


def fetched(message: bytes, uidl: str = "uidl-1", account: str = "alice") -> FetchedMessage:
    """A message as the engine spools it for ``account`` (its stamp depends on the account)."""
    spool = MessageSpool(uidl, f"<fallback-{uidl}@pop.example>", stamp_key=stamp_key(account, "pop", "a"))
    spool.write(message)
    return spool.finish()


def account_config(**fields: Any) -> Any:
    from connector.config import Account

    return Account.model_validate(
        {
            "name": "alice",
            "host": "pop",
            "username": "a",
            "password": "p",
            "destination": "workspace",
            **fields,
        }
    )


def gmail_destination(gmail: GmailServer, account: ServiceAccount, tmp_path: Path, **overrides: Any) -> Any:
    from connector.config import GmailDestination

    fields = workspace(gmail, account, tmp_path, **overrides)
    fields["service_account_key"] = json.dumps(account.key)
    return GmailDestination.model_validate(fields)


def test_find_looks_in_spam_and_tells_our_copy_from_another_accounts(
    gmail: GmailServer, service_account: ServiceAccount, tmp_path: Path
) -> None:
    destination = gmail_destination(gmail, service_account, tmp_path)
    session = open_gmail(destination, account_config(mailbox=ALICE), ALICE)
    gmail.spam = lambda data: True  # Gmail's classifier files everything in Spam
    theirs, ours = fetched(simple(1), account="bob"), fetched(simple(1))
    assert theirs.message_id == ours.message_id and theirs.stamp != ours.stamp
    session.deliver(theirs)  # the same message, delivered by another account: not ours
    assert session.find(ours) is None
    reference = session.deliver(ours)
    assert [record.message.label_ids[-1] for record in gmail.imports_for(ALICE)] == ["SPAM", "SPAM"]
    assert session.find(ours) == reference
    assert session.find(fetched(simple(2))) is None
    session.close()


def test_a_label_deleted_during_the_session_is_made_again(
    gmail: GmailServer, service_account: ServiceAccount, tmp_path: Path
) -> None:
    destination = gmail_destination(gmail, service_account, tmp_path, account_label="Hosted/{account}/2025")
    session = open_gmail(destination, account_config(mailbox=ALICE), ALICE)
    session.deliver(fetched(simple(1)))
    mailbox = gmail.mailbox(ALICE)
    assert [label.name for label in mailbox.labels.values() if label.type == "user"] == [
        "Hosted",
        "Hosted/alice",
        "Hosted/alice/2025",
    ]
    (gone,) = [key for key, label in mailbox.labels.items() if label.name == "Hosted/alice/2025"]
    del mailbox.labels[gone]
    session.deliver(fetched(simple(2), uidl="uidl-2"))
    second = gmail.imports_for(ALICE)[1]
    assert gmail.label_names(ALICE, second.message) == ["INBOX", "Hosted/alice/2025", "UNREAD"]
    session.close()


def test_network_failures_are_translated(
    gmail: GmailServer, service_account: ServiceAccount, tmp_path: Path
) -> None:
    untrusted = gmail_destination(gmail, service_account, tmp_path, ca_file=None)
    with pytest.raises(DestinationTLSError, match="certificate not trusted"):
        open_gmail(untrusted, account_config(mailbox=ALICE), ALICE)
    LOGINS.clear()
    session = open_gmail(
        gmail_destination(gmail, service_account, tmp_path), account_config(mailbox=ALICE), ALICE
    )
    gmail.drop_request("list")
    with pytest.raises(DestinationConnectError):
        look_up(session, fetched(simple(1)))
    gmail.server_error("get", status=500)
    gmail.lose_response("import")
    with pytest.raises(DestinationConnectError):
        session.deliver(fetched(simple(1)))
    with pytest.raises(DestinationTempError, match="500"):  # the lookup's candidate read fails
        look_up(session, fetched(simple(1)))
    session.close()


def test_a_consent_that_cannot_work_is_refused_before_google_is_asked(
    gmail: GmailServer, desktop: Client, tmp_path: Path
) -> None:
    from connector.config import GmailDestination

    destination = GmailDestination.model_validate(personal(gmail, desktop, tmp_path))
    path = token_file(tmp_path / "tokens", PERSONAL)
    stored = read_token(path)
    metadata = "https://www.googleapis.com/auth/gmail.metadata"
    write_token(
        path,
        StoredToken(
            PERSONAL,
            stored.client_id,
            stored.client_secret,
            stored.refresh_token,
            stored.token_uri,
            (*GMAIL_SCOPES, metadata),
        ),
    )
    with pytest.raises(DestinationAuthError, match=r"gmail\.metadata"):
        open_gmail(destination, account_config(destination="gmail"), None)
    write_token(
        path,
        StoredToken(PERSONAL, "another-client", stored.client_secret, stored.refresh_token, stored.token_uri),
    )
    with pytest.raises(DestinationAuthError, match="another-client"):
        open_gmail(destination, account_config(destination="gmail"), None)
    path.unlink()
    with pytest.raises(DestinationAuthError, match=r"no usable consent.*authorize gmail`"):
        open_gmail(destination, account_config(destination="gmail"), None)
    assert gmail.tokens.token_request_count == 0
