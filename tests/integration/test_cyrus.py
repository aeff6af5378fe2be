"""Interoperability with a second, different real server: Cyrus IMAP 3.6, as POP3 source and as IMAP
destination, with Dovecot on the other side and on its own. The same configuration fields as for Dovecot;
nothing Cyrus-specific is set: the connector must cope with ``INBOX/`` folders, ``1795670867.1`` UIDLs and
``NO Over quota`` without a response code by itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.config import Config, load_config
from connector.destinations.imap import open_imap
from connector.errors import DestinationFullError
from connector.ledger.database import open_database
from connector.ledger.records import MessageState
from connector.ledger.store import Ledger
from connector.message import MessageSpool
from connector.poll.engine import SyncEngine
from connector.poll.result import PollResult
from tests.configs import write_tables
from tests.delivery import assert_exactly_once
from tests.messages import simple
from tests.servers.cyrus import Cyrus, CyrusError
from tests.servers.dovecot import Dovecot, MailUser, MailUsers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cyrus() -> Iterator[Cyrus]:
    try:
        server = Cyrus().start()
    except CyrusError as exc:
        pytest.fail(f"cannot run the Cyrus test server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def _source(server: Cyrus | Dovecot, user: MailUser) -> dict[str, Any]:
    port = server.pop3_port if isinstance(server, Cyrus) else server.ports.pop3
    return {"name": user.name, "host": server.host, "port": port, "tls": "none", "username": user.name,
            "password": user.password, "destination": "d", "timeout": "20s"}  # fmt: skip


def _destination(server: Cyrus | Dovecot, user: MailUser) -> dict[str, Any]:
    port = server.imap_port if isinstance(server, Cyrus) else server.ports.imap
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


def test_cyrus_to_cyrus_into_a_nested_folder(tmp_path: Path, cyrus: Cyrus) -> None:
    source, target = cyrus.new_user("src"), cyrus.new_user("dst")
    cyrus.seed(source.name, _messages())
    sync = Sync(tmp_path, {**_source(cyrus, source), "folder": "Imported/Hosted", "retention": "keep"},
                _destination(cyrus, target))  # fmt: skip
    first = sync.poll()
    assert (first.status, first.delivered) == ("ok", 3), first.error
    # Cyrus's personal namespace is INBOX/ with "/" as delimiter: read from NAMESPACE, not configured.
    assert "INBOX/Imported/Hosted" in cyrus.folders(target.name)
    assert_exactly_once(_messages(), cyrus.imap_messages(target.name, "INBOX/Imported/Hosted"))
    assert all(re.fullmatch(r"\d+\.\d+", uidl) for uidl in sync.uidls()), sync.uidls()
    second = sync.poll()
    assert (second.status, second.delivered) == ("ok", 0)


def test_cyrus_pop3_source_into_dovecot_deletes_after_delivery(
    tmp_path: Path, cyrus: Cyrus, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    source = cyrus.new_user("src")
    cyrus.seed(source.name, _messages())
    sync = Sync(tmp_path, _source(cyrus, source), _destination(dovecot, mail_users.destination))
    assert sync.poll().delivered == 3
    assert_exactly_once(_messages(), dovecot.imap_messages(mail_users.destination.name))
    assert cyrus.imap_messages(source.name) == []  # DELE + QUIT expunged them on Cyrus
    assert set(sync.uidls().values()) == {MessageState.DELETED}
    assert sync.poll().delivered == 0


def test_dovecot_source_into_cyrus_imap(
    tmp_path: Path, cyrus: Cyrus, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    target = cyrus.new_user("dst")
    dovecot.seed(mail_users.source.name, _messages())
    sync = Sync(tmp_path, _source(dovecot, mail_users.source), _destination(cyrus, target))
    assert sync.poll().delivered == 3
    assert_exactly_once(_messages(), cyrus.imap_messages(target.name))
    assert dovecot.maildir_count(mail_users.source.name) == 0


def test_over_quota_without_a_response_code_pauses_the_account(tmp_path: Path, cyrus: Cyrus) -> None:
    source, target = cyrus.new_user("src"), cyrus.new_user("dst", quota_kb=1)
    cyrus.seed(source.name, [simple(1, size=3000), simple(2, size=3000)])
    sync = Sync(tmp_path, _source(cyrus, source), _destination(cyrus, target))
    result = sync.poll()
    # "NO Over quota": a full destination, not a refused message; no attempt is counted against it.
    assert result.status == "error" and result.error is not None and "Over quota" in result.error
    assert result.quarantined == 0 and result.delivered <= 1
    assert len(cyrus.imap_messages(source.name)) == 2 - result.delivered


def _imap_options(cyrus: Cyrus, user: MailUser, folder: str) -> dict[str, Any]:
    return {"host": cyrus.host, "port": cyrus.imap_port, "tls": "none", "ssl_context": None, "timeout": 20,
            "username": user.name, "password": user.password, "folder": folder,
            "mark_seen": False}  # fmt: skip


def test_crash_recovery_lookup_on_cyrus(cyrus: Cyrus) -> None:
    """find() after a crash between APPEND and the ledger update, on Cyrus (SEARCH HEADER, partial FETCH)."""
    target = cyrus.new_user("dst")
    options = _imap_options(cyrus, target, "Imported/Hosted")
    spool = MessageSpool("UIDL1", "<pop-connector.fallback@x>")
    spool.write(simple(7, message_id=False, size=3 * 1024 * 1024))
    with spool.finish() as message:
        with open_imap(**options) as session:
            reference = session.deliver(message)
        with open_imap(**options) as session:
            assert session.find(message) == reference
    assert "UIDVALIDITY=" in reference and "UID=1" in reference


def test_over_quota_is_destination_full_on_cyrus(cyrus: Cyrus) -> None:
    target = cyrus.new_user("dst", quota_kb=1)
    spool = MessageSpool("UIDL1", "<f@x>")
    spool.write(simple(1, size=5000))
    with (
        spool.finish() as message,
        open_imap(**_imap_options(cyrus, target, "INBOX")) as session,
        pytest.raises(DestinationFullError, match="Over quota"),
    ):
        session.deliver(message)
