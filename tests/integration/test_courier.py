"""Interoperability with a third real server: Courier-IMAP 5.0 and Courier POP3 1.0, as POP3 source and as
IMAP destination, with Dovecot on the other side and on its own. The same configuration fields as for
Dovecot; nothing Courier-specific is set: the connector must cope with ``INBOX.`` folders, ``UID1-...``
UIDLs, a missing UNSELECT and MULTIAPPEND, POP3's Unicode placeholder (issue 11.3) and the read-only
selection an EXAMINE leaves behind (issue 12.2) by itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from imapclient.exceptions import IMAPClientError

from connector.config import Account, Config, Destination, load_config
from connector.connections import Connections, open_destination
from connector.destinations.base import DestinationSession
from connector.destinations.imap import open_imap
from connector.errors import DestinationConnectError, DestinationError
from connector.ledger.database import open_database
from connector.ledger.records import MessageState
from connector.ledger.store import Ledger
from connector.message import FetchedMessage, MessageSpool
from connector.poll.engine import SyncEngine
from connector.poll.result import PollResult
from tests.configs import write_tables
from tests.delivery import assert_exactly_once, normalised
from tests.messages import simple
from tests.servers.courier import Courier
from tests.servers.dovecot import Dovecot, MailUser, MailUsers
from tests.servers.scripted_pop3 import CourierLikePop3Server, StoredMessage

pytestmark = pytest.mark.integration

# Raw UTF-8 in From, Subject and Message-ID (RFC 6532), as a modern sender writes them.
UNICODE = (
    "Received: from mx.example.net by pop.example.net; Tue, 03 Jun 2025 08:15:05 +0000\r\n"
    "From: Jörg Müller <jörg@例え.jp>\r\nTo: alice@example.net\r\nSubject: Grüße aus Zürich\r\n"
    "Date: Tue, 03 Jun 2025 07:58:00 +0000\r\nMessage-ID: <grüße.1@example.net>\r\n\r\nHallo!\r\n"
).encode()
UNICODE_RECEIVED = datetime(2025, 6, 3, 8, 15, 5, tzinfo=UTC)


def _source(server: Courier | Dovecot, user: MailUser) -> dict[str, Any]:
    port = server.pop3_port if isinstance(server, Courier) else server.ports.pop3
    return {"name": user.name, "host": server.host, "port": port, "tls": "none", "username": user.name,
            "password": user.password, "destination": "d", "timeout": "20s"}  # fmt: skip


def _destination(server: Courier | Dovecot, user: MailUser) -> dict[str, Any]:
    port = server.imap_port if isinstance(server, Courier) else server.ports.imap
    return {"name": "d", "type": "imap", "host": server.host, "port": port, "tls": "none",
            "username": user.name, "password": user.password}  # fmt: skip


class Sync:
    def __init__(self, tmp_path: Path, source: dict[str, Any], destination: dict[str, Any]) -> None:
        database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        self.config: Config = load_config(
            write_tables(tmp_path / "c.toml", database, [destination], [source])
        )
        self.engine = open_database(database)
        self.sync = SyncEngine(self.config, Ledger(self.engine))

    def poll(self) -> PollResult:
        return self.sync.poll(self.config.accounts[0])

    def uidls(self) -> dict[str, MessageState]:
        ledger = self.sync.ledger
        account_id = ledger.account_id(self.config.accounts[0].name)
        assert account_id is not None
        return {uidl: known.state for uidl, known in ledger.known_messages(account_id).items()}


def _messages() -> list[bytes]:
    return [simple(1), simple(2, message_id=False), simple(3, size=200_000)]


# --- Courier as source and destination -----------------------------------------------------------------


def test_courier_to_courier_into_a_nested_folder(tmp_path: Path, courier: Courier) -> None:
    source, target = courier.new_user("src"), courier.new_user("dst")
    courier.seed(source.name, _messages())
    sync = Sync(tmp_path, {**_source(courier, source), "folder": "Imported/Hosted"},
                _destination(courier, target))  # fmt: skip
    first = sync.poll()
    assert (first.status, first.delivered, first.deleted) == ("ok", 3, 3), first.error
    # Courier's personal namespace is INBOX. with "." as delimiter: read from NAMESPACE, not configured.
    assert "INBOX.Imported.Hosted" in courier.folders(target.name)
    assert_exactly_once(_messages(), courier.imap_messages(target.name, "INBOX.Imported.Hosted"))
    assert all(re.fullmatch(r"UID\d+-\d+", uidl) for uidl in sync.uidls()), sync.uidls()
    assert courier.maildir_count(source.name) == 0
    second = sync.poll()
    assert (second.status, second.delivered) == ("ok", 0)


def test_dovecot_source_into_courier_imap(
    tmp_path: Path, courier: Courier, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    target = courier.new_user("dst")
    dovecot.seed(mail_users.source.name, _messages())
    sync = Sync(tmp_path, _source(dovecot, mail_users.source), _destination(courier, target))
    assert sync.poll().delivered == 3
    assert_exactly_once(_messages(), courier.imap_messages(target.name))
    assert dovecot.maildir_count(mail_users.source.name) == 0


# --- 11.3: raw UTF-8 headers and Courier POP3's placeholder -------------------------------------------


def test_utf8_headers_arrive_as_the_original_with_its_date(
    tmp_path: Path, courier: Courier, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    """Without UTF8 Courier serves "Cannot display Unicode content" instead, which would be delivered,
    dated at fetch time, while the original is deleted."""
    source = courier.new_user("src")
    courier.seed(source.name, [UNICODE, simple(1)])
    sync = Sync(tmp_path, _source(courier, source), _destination(dovecot, mail_users.destination))
    result = sync.poll()
    assert (result.status, result.delivered, result.deleted) == ("ok", 2, 2), result.error
    delivered = dovecot.imap_fetch(mail_users.destination.name)
    assert [message.body for message in delivered] == [normalised(UNICODE), normalised(simple(1))]
    assert delivered[0].internal_date.astimezone(UTC) == UNICODE_RECEIVED
    assert courier.maildir_count(source.name) == 0


def test_utf8_headers_from_the_scripted_courier_arrive_as_the_original(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    """The same through the whole engine with the scripted server playing Courier, which serves its
    placeholder to a client that did not send UTF8."""
    server = CourierLikePop3Server([StoredMessage("u1", UNICODE), StoredMessage("u2", simple(1))])
    with server:
        source = {"name": "scripted", "host": server.host, "port": server.port, "tls": "none",
                  "username": server.username, "password": server.password, "destination": "d"}  # fmt: skip
        result = Sync(tmp_path, source, _destination(dovecot, mail_users.destination)).poll()
    assert (result.status, result.delivered, result.deleted) == ("ok", 2, 2), result.error
    delivered = dovecot.imap_fetch(mail_users.destination.name)
    assert [message.body for message in delivered] == [normalised(UNICODE), normalised(simple(1))]
    assert delivered[0].internal_date.astimezone(UTC) == UNICODE_RECEIVED
    assert server.recorded.deleted == ["u1", "u2"] and server.recorded.errors == []
    assert [command.split(" ")[0] for command in server.recorded.commands][:3] == ["CAPA", "UTF8", "USER"]


# --- 12.2: a recovery lookup must not leave the folder selected read-only --------------------------------


class _CrashAfterFirstAppend:
    """Stores the first message, then loses the connection before its reply: what a crash between APPEND
    and the delivered record leaves behind (the message stored, the ledger row only pending). The poll
    goes on with the next message (issue 12.6), which is delivered."""

    def __init__(self) -> None:
        self.appended = 0

    def open(self, destination: Destination, account: Account) -> DestinationSession:
        return _Crashing(open_destination(destination, account), self)


class _Crashing:
    def __init__(self, session: DestinationSession, owner: _CrashAfterFirstAppend) -> None:
        self._session = session
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def max_batch(self) -> int:
        return 1

    def deliver(self, message: FetchedMessage) -> str:
        reference = self._session.deliver(message)
        self._owner.appended += 1
        if self._owner.appended > 1:
            return reference
        raise DestinationConnectError(f"connection lost after APPEND ({reference})")

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        raise AssertionError("Courier offers no MULTIAPPEND")


def test_after_a_crash_the_lookup_leaves_courier_taking_every_append(
    tmp_path: Path, courier: Courier, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    target = courier.new_user("dst")
    first_batch = [simple(1), simple(2)]
    dovecot.seed(mail_users.source.name, first_batch)
    sync = Sync(tmp_path, {**_source(dovecot, mail_users.source), "folder": "Imported"},
                _destination(courier, target))  # fmt: skip
    crash = _CrashAfterFirstAppend()
    sync.sync.connections = replace(Connections(), open_destination=crash.open)
    crashed = sync.poll()
    assert crashed.status == "error" and crashed.delivered == 1 and crash.appended == 2
    assert len(courier.imap_messages(target.name, "INBOX.Imported")) == 2

    later = [simple(n) for n in range(3, 7)]
    dovecot.seed(mail_users.source.name, later)
    sync.sync.connections = Connections()
    result = sync.poll()
    # The pending message is found (EXAMINE) and recorded; every APPEND after it in the same session works.
    assert (result.status, result.recovered, result.delivered) == ("ok", 1, 4), result.problems
    assert (result.failed, result.quarantined) == (0, 0)
    assert_exactly_once(first_batch + later, courier.imap_messages(target.name, "INBOX.Imported"))
    assert set(sync.uidls().values()) == {MessageState.DELETED}
    assert dovecot.maildir_count(mail_users.source.name) == 0


def _imap_options(server: Courier | Dovecot, user: MailUser, folder: str) -> dict[str, Any]:
    port = server.imap_port if isinstance(server, Courier) else server.ports.imap
    return {"host": server.host, "port": port, "tls": "none", "ssl_context": None, "timeout": 20,
            "username": user.name, "password": user.password, "folder": folder,
            "mark_seen": False}  # fmt: skip


def _spooled(raw: bytes, uidl: str) -> MessageSpool:
    spool = MessageSpool(uidl, f"<pop-connector.fallback.{uidl}@x>")
    spool.write(raw)
    return spool


def test_find_then_deliver_in_one_courier_session(courier: Courier, caplog: pytest.LogCaptureFixture) -> None:
    """Courier offers no UNSELECT: the examined folder is CLOSEd, which expunges nothing read-only."""
    target = courier.new_user("dst")
    options = _imap_options(courier, target, "Imported/Hosted")
    caplog.set_level(logging.DEBUG, logger="imapclient")
    with _spooled(simple(1), "U1").finish() as first, _spooled(simple(2), "U2").finish() as second:
        with open_imap(**options) as session:
            reference = session.deliver(first)
        with open_imap(**options) as session:
            assert session.find(first) == reference
            assert session.find(second) is None
            assert session.deliver(second).startswith("imap:Imported/Hosted;UIDVALIDITY=")
    assert_exactly_once([simple(1), simple(2)], courier.imap_messages(target.name, "INBOX.Imported.Hosted"))
    assert "CLOSE" in caplog.text and "UNSELECT" not in caplog.text


def test_find_unselects_on_dovecot(dovecot: Dovecot, mail_users: MailUsers) -> None:
    """Dovecot offers UNSELECT (RFC 3691), which leaves the folder without expunging even a read-write one."""
    options = _imap_options(dovecot, mail_users.destination, "INBOX")
    with _spooled(simple(1), "U1").finish() as message, open_imap(**options) as session:
        reference = session.deliver(message)
        assert session.find(message) == reference
        assert session._client._imap.state == "AUTH"


def test_a_folder_selected_read_write_is_never_closed(dovecot: Dovecot, mail_users: MailUsers) -> None:
    """Without UNSELECT only CLOSE is left, which expunges a read-write folder: then it stays selected."""
    user = mail_users.destination
    with (
        _spooled(simple(1), "U1").finish() as message,
        open_imap(**_imap_options(dovecot, user, "INBOX")) as session,
    ):
        session.deliver(message)
        client = session._client
        client.select_folder("INBOX")
        client.set_flags(client.search("ALL"), [b"\\Deleted"])
        client.has_capability = lambda name: name.upper() != "UNSELECT"
        session._leave_folder("U1")
        assert client._imap.state == "SELECTED"
    assert len(dovecot.imap_messages(user.name)) == 1


def test_a_failing_lookup_still_leaves_the_folder(dovecot: Dovecot, mail_users: MailUsers) -> None:
    """The lookup's own error is reported, and the examined folder is left all the same."""
    options = _imap_options(dovecot, mail_users.destination, "INBOX")
    with _spooled(simple(1), "U1").finish() as message, open_imap(**options) as session:
        session.deliver(message)
        client = session._client

        def refused(*args: object) -> None:
            raise IMAPClientError("SEARCH failed: NO [SERVERBUG] internal error")

        client.search = refused
        with pytest.raises(DestinationError, match="SERVERBUG"):
            session.find(message)
        assert client._imap.state == "AUTH"
