"""The EWS destination, driven by the real exchangelib client against the EWS test server, and end to end
through the sync engine with the real Dovecot as the POP3 side."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from exchangelib.errors import ErrorNameResolutionNoResults, MalformedResponseError
from sqlalchemy import select

from connector.cli.check import run_checks
from connector.config import Account, Destination, EwsDestination
from connector.connections import open_destination
from connector.destinations import ews as ews_module
from connector.destinations.base import DestinationSession
from connector.destinations.ews import EwsSession, open_ews
from connector.destinations.ews_connection import CONFIGURATIONS
from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTLSError,
)
from connector.ledger.models import MessageRow
from connector.ledger.records import MessageState
from connector.message import FetchedMessage, MessageSpool
from connector.poll.engine import SyncEngine
from tests.configs import EWS_MAILBOX as MAILBOX
from tests.configs import EWS_SERVICE as SERVICE
from tests.configs import EWS_SERVICE_PASSWORD as SERVICE_PASSWORD
from tests.configs import ews_destination
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.ews import EwsServer

pytestmark = pytest.mark.integration

FOLDER = "Inbox/Hosted/2025"
# tests.messages.simple(n): Received: ... 08:<n>:05 +0000, Date: 07:58:00 +0000
SENT = "2025-06-03T07:58:00Z"


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def exchange(ews: EwsServer) -> EwsServer:
    """The server with a service account that holds the ApplicationImpersonation role, and one mailbox."""
    ews.add_user(SERVICE, SERVICE_PASSWORD, impersonation=True)
    ews.add_mailbox(MAILBOX)
    return ews


def destination(ews: EwsServer, **overrides: Any) -> dict[str, Any]:
    """The destination's TOML fields, with the default auth, NTLM (a real handshake with the server)."""
    return {**ews_destination(ews), "version": "Exchange2016", **overrides}


def login(ews: EwsServer, **overrides: Any) -> EwsDestination:
    """A validated destination for sessions on their own: Basic auth, 1 MiB limit."""
    fields = {"name": "exchange", **destination(ews, auth="basic", max_message_size=1024 * 1024), **overrides}
    return EwsDestination.model_validate(fields)


class Waits(list[float]):
    """Stands in for time.sleep: records what the server asked us to wait (tests never wait on the clock)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def session(
    ews: EwsServer | EwsDestination,
    *,
    mailbox: str = MAILBOX,
    folder: str = FOLDER,
    mark_seen: bool = False,
    waits: Waits | None = None,
) -> EwsSession:
    """A session as the engine opens it: ``ews`` is the server (default login) or a destination."""
    target = login(ews) if isinstance(ews, EwsServer) else ews
    sleep = waits if waits is not None else Waits()
    return open_ews(target, mailbox=mailbox, folder=folder, mark_seen=mark_seen, timeout=20.0, sleep=sleep)


@pytest.fixture
def message() -> Iterator[FetchedMessage]:
    spool = MessageSpool("uidl-1", "<fallback@pop.example>")
    spool.write(simple(1))
    with spool.finish() as fetched:
        yield fetched


# --- through the engine -------------------------------------------------------------------------------------


def test_delivery_creates_folders_and_received_mail(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    messages = [simple(1), simple(2)]
    dovecot.seed(mail_users.source.name, messages)
    config, engine = make_sync(
        account={"mailbox": MAILBOX, "folder": FOLDER}, destination=destination(exchange)
    )
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.deleted) == ("ok", 2, 2), result
    assert exchange.folder_paths(MAILBOX) == ["Inbox", "Inbox/Hosted", "Inbox/Hosted/2025"]
    items = exchange.items(MAILBOX, FOLDER)
    assert [item.mime for item in items] == messages
    for n, item in zip((1, 2), items, strict=True):
        assert item.tag(0x0E07) == "0"  # unread, and not MSGFLAG_UNSENT: received mail, not a draft
        assert item.tag(0x0E06) == f"2025-06-03T08:0{n}:05Z"  # PidTagMessageDeliveryTime: newest Received:
        assert item.tag(0x0039) == SENT  # PidTagClientSubmitTime: Date:
        assert item.is_read is False
    # Every request acted as the target mailbox, through impersonation.
    assert {(r.login, r.impersonated) for r in exchange.requests} == {(SERVICE, MAILBOX)}
    with engine.ledger.engine.connect() as db:
        refs = db.scalars(select(MessageRow.destination_ref)).all()
    assert sorted(refs) == sorted(f"ews:{MAILBOX}/{FOLDER};ItemId={item.id}" for item in items)
    assert dovecot.maildir_count(mail_users.source.name) == 0


def test_dedupe_after_a_crash_between_create_and_record(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(
        account={"mailbox": MAILBOX, "folder": FOLDER}, destination=destination(exchange)
    )
    account = config.accounts[0]
    # The item is created, but the answer never arrives (a crash or timeout at the worst moment).
    exchange.fail("CreateItem", "drop_after")
    first = engine.poll(account)
    assert (first.status, first.delivered, first.deleted) == ("error", 0, 0), first
    assert len(exchange.items(MAILBOX, FOLDER)) == 1
    account_id = engine.ledger.account_id(account.name) or 0
    (row,) = engine.ledger.known_messages(account_id).values()
    assert (row.state, row.attempts) == (MessageState.PENDING, 0)
    assert dovecot.maildir_count(mail_users.source.name) == 1
    exchange.requests.clear()
    second = engine.poll(account)
    assert (second.status, second.recovered, second.delivered, second.deleted) == ("ok", 1, 0, 1), second
    assert "FindItem" in exchange.ops() and "CreateItem" not in exchange.ops()
    assert len(exchange.items(MAILBOX, FOLDER)) == 1
    assert dovecot.maildir_count(mail_users.source.name) == 0


def test_busy_server_is_waited_out_then_the_account_backs_off(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"mailbox": MAILBOX}, destination=destination(exchange))
    account = config.accounts[0]
    exchange.fail("CreateItem", "busy", times=5, back_off_ms=1)  # one more than BUSY_RETRIES
    first = engine.poll(account)
    assert (first.status, first.delivered, first.quarantined) == ("error", 0, 0), first
    assert first.error is not None and "still busy after 4 back-offs" in first.error
    account_id = engine.ledger.account_id(account.name) or 0
    (row,) = engine.ledger.known_messages(account_id).values()
    assert row.attempts == 0  # a busy server does not count against the message
    assert exchange.items(MAILBOX) == []
    second = engine.poll(account)
    assert (second.status, second.delivered) == ("ok", 1)
    assert len(exchange.items(MAILBOX)) == 1


def test_wrong_password_is_an_auth_error_and_leaves_the_message(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(
        account={"mailbox": MAILBOX}, destination=destination(exchange, password="wrong-password")
    )
    result = engine.poll(config.accounts[0])
    assert result.status == "auth_error", result
    assert (
        result.error is not None and "login refused" in result.error and "wrong-password" not in result.error
    )
    account_id = engine.ledger.account_id(config.accounts[0].name) or 0
    (row,) = engine.ledger.known_messages(account_id).values()
    assert (row.state, row.attempts) == (MessageState.PENDING, 0)
    assert dovecot.maildir_count(mail_users.source.name) == 1


def test_unknown_mailbox_quarantines_the_message(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(
        account={"mailbox": "nobody@corp.example", "retry": {"max_attempts": 1}},
        destination=destination(exchange),
    )
    result = engine.poll(config.accounts[0])
    assert (result.status, result.failed, result.quarantined) == ("ok", 1, 1), result
    assert any("ErrorNonExistentMailbox" in problem for problem in result.problems), result.problems
    assert dovecot.maildir_count(mail_users.source.name) == 1


def test_oversize_message_is_not_sent_and_stays_on_the_server(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1, size=5000), simple(2)])
    config, engine = make_sync(
        account={"mailbox": MAILBOX},  # quarantined at once, whatever max_attempts allows
        destination=destination(exchange, max_message_size="4KB"),
    )
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.quarantined) == ("ok", 1, 1), result
    assert any("larger than this destination's max_message_size of 4096 bytes" in p for p in result.problems)
    assert [item.mime for item in exchange.items(MAILBOX)] == [simple(2)]
    assert dovecot.maildir_count(mail_users.source.name) == 1
    again = engine.poll(config.accounts[0])
    assert (again.delivered, again.failed) == (0, 0)  # not downloaded or tried again


def test_check_logs_in_and_writes_nothing(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    config, _ = make_sync(account={"mailbox": MAILBOX, "folder": FOLDER}, destination=destination(exchange))
    lines: list[str] = []
    assert run_checks(config, lines.append)
    assert any("destination exchange OK" in line and "creates Hosted, 2025" in line for line in lines), lines
    assert set(exchange.ops()) <= {"GetFolder", "FindFolder"}
    assert exchange.folder_paths(MAILBOX) == ["Inbox"]
    config, _ = make_sync(
        account={"mailbox": MAILBOX}, destination=destination(exchange, password="wrong-password")
    )
    lines.clear()
    assert not run_checks(config, lines.append)
    assert any("destination exchange FAILED" in line and "login refused" in line for line in lines), lines


# --- the session on its own ---------------------------------------------------------------------------


def test_mark_seen_sets_the_read_flag(exchange: EwsServer, message: FetchedMessage) -> None:
    ref = session(exchange, mark_seen=True, folder="Inbox").deliver(message)
    (item,) = exchange.items(MAILBOX, "Inbox")
    assert (item.tag(0x0E07), item.is_read) == ("1", True)
    assert ref == f"ews:{MAILBOX}/Inbox;ItemId={item.id}"


def test_busy_back_off_and_retry_after_are_honoured_and_counted(
    exchange: EwsServer, message: FetchedMessage
) -> None:
    waits = Waits()
    ews = session(exchange, waits=waits)
    exchange.fail("CreateItem", "busy", times=2, back_off_ms=250)
    exchange.fail("FindFolder", "http", status=503, retry_after=2)
    ews.deliver(message)
    assert waits == [2.0, 0.25, 0.25]
    assert ews.throttled == 3
    assert len(exchange.items(MAILBOX, FOLDER)) == 1


def test_unavailable_without_a_hint_gets_a_default_pause_then_gives_up(
    exchange: EwsServer, message: FetchedMessage
) -> None:
    waits = Waits()
    exchange.fail("GetFolder", "http", status=503)
    session(exchange, waits=waits).deliver(message)
    assert len(waits) == 1 and waits[0] > 0  # exchangelib's default pause when the server names none
    exchange.fail("CreateItem", "http", status=503, retry_after=1, times=5)
    with pytest.raises(DestinationTempError, match="still busy"):
        session(exchange, waits=waits).deliver(message)
    assert len(exchange.items(MAILBOX)) == 1


def test_find_needs_the_same_content(exchange: EwsServer, message: FetchedMessage) -> None:
    ews = session(exchange)
    assert ews.find(message) is None  # the folder does not even exist yet
    ref = ews.deliver(message)
    assert ews.find(message) == ref
    other = MessageSpool("uidl-2", "<fallback@pop.example>")
    other.write(simple(1).replace(b"Body of", b"Changed body of"))
    with other.finish() as changed:
        assert changed.message_id == message.message_id
        assert ews.find(changed) is None
    # Exchange keeps InternetMessageId as it parsed it; when that differs from ours the stamp still finds it.
    (item,) = exchange.items(MAILBOX, FOLDER)
    item.mime = item.mime.replace(b"<msg1@example.net>", b"<MSG1@example.net>")
    assert ews.find(message) == ref
    assert exchange.ops().count("FindItem") == 5  # twice for each lookup that found nothing first


def test_a_folder_deleted_during_the_session_is_made_again(
    exchange: EwsServer, message: FetchedMessage
) -> None:
    ews = session(exchange)
    ews.deliver(message)
    exchange.delete_folder(MAILBOX, "Inbox/Hosted/2025")
    ews.deliver(message)
    assert len(exchange.items(MAILBOX, FOLDER)) == 1


def test_resolve_names_as_exchange_answers(exchange: EwsServer) -> None:
    protocol = session(exchange)._account.protocol
    (found,) = protocol.resolve_names([MAILBOX])
    assert found.email_address == MAILBOX
    (missing,) = protocol.resolve_names(["nobody@corp.example"])
    assert isinstance(missing, ErrorNameResolutionNoResults)  # exchangelib hands Exchange's answer back


def test_impersonation_without_the_role_is_refused(ews: EwsServer, message: FetchedMessage) -> None:
    ews.add_user(SERVICE, SERVICE_PASSWORD, impersonation=False)
    ews.add_mailbox(MAILBOX)
    with pytest.raises(DestinationRejectedError, match="ErrorImpersonateUserDenied"):
        session(ews).deliver(message)


def test_delegate_access_to_the_own_mailbox_and_version_probe(
    ews: EwsServer, message: FetchedMessage
) -> None:
    ews.add_user(MAILBOX, "alice-pw")
    own = login(ews, username=MAILBOX, password="alice-pw", version=None, impersonation=False)
    session(own, folder="Inbox").deliver(message)
    assert ews.ops()[0] == "ConvertId"  # no version configured: exchangelib asks the server first
    assert {(r.login, r.impersonated) for r in ews.requests} == {(MAILBOX, None)}
    assert len(ews.items(MAILBOX, "Inbox")) == 1


def test_server_side_size_limit_is_a_rejection(exchange: EwsServer, message: FetchedMessage) -> None:
    exchange.max_item_size = 100
    with pytest.raises(DestinationRejectedError, match="ErrorMessageSizeExceeded"):
        session(exchange).deliver(message)


def test_oauth2_client_credentials(exchange: EwsServer, message: FetchedMessage) -> None:
    exchange.add_client("app-id", "app-secret")

    def app(secret: str) -> EwsDestination:
        return login(
            exchange,
            auth="oauth2",
            username=None,
            password=None,
            client_id="app-id",
            client_secret=secret,
            token_url=exchange.token_url,
        )

    session(app("app-secret"), folder="Inbox").deliver(message)
    assert {(r.login, r.impersonated) for r in exchange.requests} == {("app-id", MAILBOX)}
    with pytest.raises(DestinationAuthError) as caught:
        session(app("nope"), folder="Inbox").deliver(message)
    assert "nope" not in str(caught.value)


def test_ntlm_domain_login(ews: EwsServer, message: FetchedMessage) -> None:
    ews.add_user("CORP\\svc-import", SERVICE_PASSWORD, impersonation=True)
    ews.add_mailbox(MAILBOX)
    session(login(ews, auth="ntlm", username="CORP\\svc-import"), folder="Inbox").deliver(message)
    assert {(r.login, r.impersonated) for r in ews.requests} == {("CORP\\svc-import", MAILBOX)}
    with pytest.raises(DestinationAuthError):
        session(login(ews, auth="ntlm", username="CORP\\svc-import", password="bad")).check()


def test_untrusted_certificate_and_unreachable_endpoint(exchange: EwsServer) -> None:
    with pytest.raises(DestinationTLSError, match="certificate"):
        session(login(exchange, ca_file=None), folder="Inbox").check()
    unverified = login(exchange, ca_file=None, tls_verify=False)
    assert session(unverified, folder="Inbox").check().endswith("exists")
    closed = login(exchange, service_endpoint="https://127.0.0.1:9/EWS/Exchange.asmx")
    with pytest.raises(DestinationConnectError):
        session(closed).check()


def test_accounts_sharing_a_login_share_one_connection_pool(exchange: EwsServer) -> None:
    exchange.add_mailbox("bob@corp.example")
    first = session(exchange)
    second = session(exchange, mailbox="bob@corp.example")
    assert first._account.protocol is second._account.protocol
    assert first._account.protocol.max_connections == 4
    assert CONFIGURATIONS.get(login(exchange)) is CONFIGURATIONS.get(login(exchange))
    assert CONFIGURATIONS.get(login(exchange, password="changed")) is not CONFIGURATIONS.get(login(exchange))


def test_catch_all_delivers_into_each_impersonated_mailbox(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    bob = "bob@corp.example"
    exchange.add_mailbox(bob)
    both = simple(1).replace(b"To: alice@example.net", b"To: alice@example.org, bob@example.org")
    dovecot.seed(mail_users.source.name, [both, simple(2)])  # simple(2) matches no rule: the default
    routing = {
        "rules": [
            {"match": "alice@example.org", "mailbox": MAILBOX},
            {"match": "bob@example.org", "mailbox": bob},
        ],
        "default": {"mailbox": bob},
    }
    config, engine = make_sync(account={"routing": routing}, destination=destination(exchange))
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.deleted) == ("ok", 3, 2), result
    assert [item.mime for item in exchange.items(MAILBOX)] == [both]
    assert sorted(item.mime for item in exchange.items(bob)) == sorted([both, simple(2)])
    assert {r.impersonated for r in exchange.requests} == {MAILBOX, bob}


# --- several messages per CreateItem (create_batch) ---------------------------------------------------------

SHA256_PROPERTY = ("6f2c6c2e-8f57-4a35-9b0e-5c1a3f0e7d41", "PopConnectorSha256")
# Each CreateItem waits this long on the server (a far Exchange): meanwhile the fetching thread has the
# next messages ready, so every batch is full.
SLOW_CREATE = 0.15
# Opening the session takes this long (a far Exchange's TLS and login): the poll opens it while the first
# messages are fetched (DestinationPool.open_ahead), so its first batch is full too.
SLOW_OPEN = 0.3


def slow_to_open(engine: SyncEngine) -> None:
    def opened(destination: Destination, account: Account) -> DestinationSession:
        time.sleep(SLOW_OPEN)
        return open_destination(destination, account)

    engine.connections = replace(engine.connections, open_destination=opened)


def spooled(n: int, *, size: int = 0) -> FetchedMessage:
    spool = MessageSpool(f"uidl-{n}", "<fallback@pop.example>")
    spool.write(simple(n, size=size))
    return spool.finish()


def assert_stamped_once(ews: EwsServer, messages: list[bytes]) -> None:
    """Each message is in the mailbox exactly once, with the SHA-256 of what was sent as its property."""
    items = ews.items(MAILBOX)
    assert sorted(item.mime for item in items) == sorted(messages)
    for item in items:
        assert item.properties[SHA256_PROPERTY] == hashlib.sha256(item.stored_mime).hexdigest()


def test_deliver_many_creates_every_item_in_one_request(exchange: EwsServer) -> None:
    ews = session(exchange)
    assert ews.max_batch() == 10  # create_batch's default
    messages = [spooled(n) for n in range(3)]
    refs = ews.deliver_many(messages)
    items = exchange.items(MAILBOX, FOLDER)
    assert exchange.batches() == [3]
    assert [item.mime for item in items] == [simple(n) for n in range(3)]
    assert refs == [f"ews:{MAILBOX}/{FOLDER};ItemId={item.id}" for item in items]
    for message, item in zip(messages, items, strict=True):
        assert item.properties[SHA256_PROPERTY] == message.sha256
        assert item.tag(0x0E07) == "0" and item.tag(0x0039) == SENT
        assert ews.find(message) == f"ews:{MAILBOX}/{FOLDER};ItemId={item.id}"


def test_deliver_many_sends_nothing_when_a_message_is_over_the_limit(exchange: EwsServer) -> None:
    ews = session(login(exchange, max_message_size=2000))
    assert ews.deliver_many([spooled(1), spooled(2, size=3000), spooled(3)]) is None
    assert "CreateItem" not in exchange.ops()


def test_deliver_many_over_the_request_budget_sends_nothing(
    exchange: EwsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ews_module, "BATCH_REQUEST_BYTES", 500)
    assert session(exchange).deliver_many([spooled(1), spooled(2), spooled(3)]) is None
    assert "CreateItem" not in exchange.ops()


def test_deliver_many_refused_whole_is_none(exchange: EwsServer) -> None:
    # Every item refused (each its own error response message): nothing created, one by one names them.
    exchange.max_item_size = 100
    assert session(exchange).deliver_many([spooled(1), spooled(2)]) is None
    # The request refused as a whole: one error response message for it, or a SOAP fault.
    exchange.max_item_size = None
    exchange.fail("CreateItem", "error", code="ErrorAccessDenied", text="Access is denied.")
    assert session(exchange).deliver_many([spooled(1), spooled(2)]) is None
    ews = session(exchange, folder="Inbox")
    ews.check()  # the folder is known: the CreateItem itself is refused (a SOAP fault)
    exchange.impersonators.discard(SERVICE)
    assert ews.deliver_many([spooled(1), spooled(2)]) is None
    assert exchange.ops()[-1] == "CreateItem"
    assert exchange.items(MAILBOX) == []


@pytest.mark.parametrize("stop", [False, True])
def test_deliver_many_partly_created_is_a_temporary_error(exchange: EwsServer, stop: bool) -> None:
    exchange.fail("CreateItem", "item_error", item=2, stop=stop, code="ErrorInternalServerError", text="oops")
    messages = [spooled(n) for n in range(1, 5)]
    with pytest.raises(DestinationTempError) as caught:
        session(exchange).deliver_many(messages)
    created = 1 if stop else 3
    assert f"{created} of 4 items created" in caught.value.message
    assert "message uidl-2: ErrorInternalServerError: oops" in caught.value.message
    assert "looked up before it is delivered again" in caught.value.message
    assert len(exchange.items(MAILBOX)) == created
    assert exchange.batches() == [4]  # never sent again: that would create the first items twice


def test_deliver_many_answer_broken_off_is_a_temporary_error_never_resent(
    exchange: EwsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_call = ews_module._CreateEach.call

    def broken_off(self: Any, **kwargs: Any) -> Iterator[Any]:
        results = real_call(self, **kwargs)
        yield next(results)
        raise MalformedResponseError("No Items elements in ResponseMessage")

    monkeypatch.setattr(ews_module._CreateEach, "call", broken_off)
    with pytest.raises(DestinationTempError) as caught:
        session(exchange).deliver_many([spooled(1), spooled(2), spooled(3)])
    assert "1 of 3 items created, the others not or not known" in caught.value.message
    assert "the answer broke off: MalformedResponseError" in caught.value.message
    assert exchange.batches() == [3] and len(exchange.items(MAILBOX)) == 3  # created, and not sent again


def test_deliver_many_waits_out_a_busy_server_and_sends_once_more(exchange: EwsServer) -> None:
    waits = Waits()
    exchange.fail("CreateItem", "busy", back_off_ms=500)
    refs = session(exchange, waits=waits).deliver_many([spooled(1), spooled(2)])
    assert refs is not None and len(refs) == 2
    assert waits == [0.5] and exchange.batches() == [2, 2]  # the busy answer created nothing
    assert len(exchange.items(MAILBOX)) == 2


def test_a_migration_goes_in_batches_of_create_batch(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    messages = [simple(n) for n in range(25)]
    dovecot.seed(mail_users.source.name, messages)
    exchange.delays["CreateItem"] = SLOW_CREATE
    config, engine = make_sync(account={"mailbox": MAILBOX}, destination=destination(exchange))
    slow_to_open(engine)
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.deleted) == ("ok", 25, 25), result
    # Whole batches of create_batch (10).
    assert exchange.batches() == [10, 10, 5]
    assert [item.mime for item in exchange.items(MAILBOX)] == messages
    assert_stamped_once(exchange, messages)
    with engine.ledger.engine.connect() as db:
        refs = db.scalars(select(MessageRow.destination_ref)).all()
    assert sorted(refs) == sorted(f"ews:{MAILBOX}/INBOX;ItemId={item.id}" for item in exchange.items())


def test_create_batch_1_sends_one_request_per_message(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    messages = [simple(n) for n in range(5)]
    dovecot.seed(mail_users.source.name, messages)
    exchange.delays["CreateItem"] = SLOW_CREATE
    config, engine = make_sync(
        account={"mailbox": MAILBOX}, destination=destination(exchange, create_batch=1)
    )
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered) == ("ok", 5), result
    assert exchange.batches() == [1] * 5
    assert_stamped_once(exchange, messages)


def test_an_oversized_message_in_a_batch_is_refused_alone(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    messages = [simple(n, size=5000 if n == 4 else 0) for n in range(8)]
    dovecot.seed(mail_users.source.name, messages)
    exchange.delays["CreateItem"] = SLOW_CREATE
    config, engine = make_sync(
        account={"mailbox": MAILBOX}, destination=destination(exchange, max_message_size="4KB")
    )
    slow_to_open(engine)
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.quarantined, result.failed) == ("ok", 7, 1, 1), result
    assert sum("max_message_size of 4096 bytes" in problem for problem in result.problems) == 1
    # The batch of all eight went one by one (the oversized one is never sent), the others once each.
    assert exchange.batches() == [1] * 7
    assert_stamped_once(exchange, [m for n, m in enumerate(messages) if n != 4])
    assert dovecot.maildir_count(mail_users.source.name) == 1
    account_id = engine.ledger.account_id(config.accounts[0].name) or 0
    states = [row.state for row in engine.ledger.known_messages(account_id).values()]
    assert states.count(MessageState.FAILED) == 1


def test_a_partly_created_batch_stops_the_poll_and_the_next_recovers_it(
    exchange: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    messages = [simple(n) for n in range(25)]
    dovecot.seed(mail_users.source.name, messages)
    exchange.delays["CreateItem"] = SLOW_CREATE
    # The first batch, messages 0-9: items 1-4 created, item 5 fails, the rest is not processed.
    exchange.fail("CreateItem", "item_error", item=5, stop=True, code="ErrorInternalServerError", text="oops")
    config, engine = make_sync(account={"mailbox": MAILBOX}, destination=destination(exchange))
    slow_to_open(engine)
    account = config.accounts[0]
    first = engine.poll(account)
    assert (first.status, first.delivered, first.recovered) == ("error", 0, 0), first
    assert first.error is not None and "4 of 10 items created" in first.error
    assert exchange.batches() == [10]  # the poll stopped delivering
    assert [item.mime for item in exchange.items(MAILBOX)] == messages[:4]
    account_id = engine.ledger.account_id(account.name) or 0
    rows = engine.ledger.known_messages(account_id)
    assert len(rows) == 10  # the batch's ten are recorded (not delivered), with no attempt spent
    assert sum(row.attempts for row in rows.values()) == 0
    assert dovecot.maildir_count(mail_users.source.name) == 25

    second = engine.poll(account)
    assert (second.status, second.recovered, second.delivered) == ("ok", 4, 21), second
    assert_stamped_once(exchange, messages)  # messages 1-4 were looked up, not created again
    assert dovecot.maildir_count(mail_users.source.name) == 0
