"""UIDL trouble (issue 4): no UIDL, duplicated UIDLs (scripted server) and UIDLs that all change at once
(the real Dovecot, after its UID list is thrown away, as a host migration does)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import event

from connector.cli.report import status_records, status_text
from connector.ledger.store import Ledger
from tests.integration.conftest import SyncFactory, scripted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import ScriptedPop3Server, StoredMessage

pytestmark = pytest.mark.integration


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def status(engine: object, config: Any) -> str:
    ledger: Ledger = engine.ledger  # type: ignore[attr-defined]
    return status_text(status_records(config.accounts, ledger.statuses()))


def test_server_without_uidl_identifies_by_header_hash(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.fail("UIDL", "-ERR unknown command")
    config, engine = make_sync(account=scripted(pop3, retention="keep"))
    account = config.accounts[0]
    first = engine.poll(account)
    assert (first.status, first.delivered) == ("ok", 3), first
    assert engine.poll(account).delivered == 0
    pop3.messages.append(StoredMessage("ignored", simple(9)))
    assert engine.poll(account).delivered == 1
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 4
    assert "identity: the server has no UIDL" in status(engine, config)


def test_duplicate_uidls_are_told_apart_by_header_hash(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.messages = [
        StoredMessage("x", simple(1)),
        StoredMessage("x", simple(2)),
        StoredMessage("y", simple(3)),
    ]
    config, engine = make_sync(account=scripted(pop3, retention="keep"))
    account = config.accounts[0]
    first = engine.poll(account)
    assert (first.delivered, first.problems) == (3, [])
    assert "1 UIDL(s) for more than one message" in status(engine, config)
    assert engine.poll(account).delivered == 0
    # One of the pair is gone: "x" is unique now, but still the message delivered as "x/hdr:...".
    pop3.messages.pop(0)
    assert engine.poll(account).delivered == 0
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3


def test_identity_note_is_written_only_when_it_changes(
    pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.messages = [StoredMessage("x", simple(1)), StoredMessage("x", simple(2))]
    config, engine = make_sync(account=scripted(pop3, retention="keep"))
    account = config.accounts[0]
    writes: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("UPDATE accounts") and "identity_note" in statement:
            writes.append(statement)

    event.listen(engine.ledger.engine, "before_cursor_execute", record)
    try:
        assert engine.poll(account).delivered == 2 and len(writes) == 1
        assert "1 UIDL(s) for more than one message" in status(engine, config)
        engine.poll(account)
        assert len(writes) == 1  # the same note: nothing to write
        pop3.messages = []
        engine.poll(account)
        assert len(writes) == 2 and "identity:" not in status(engine, config)
        engine.poll(account)
        assert len(writes) == 2
    finally:
        event.remove(engine.ledger.engine, "before_cursor_execute", record)


def test_identical_messages_under_one_uidl_are_each_delivered(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    # More in test_listing_twins.py (issue 11.6).
    pop3.messages = [StoredMessage("x", simple(1)), StoredMessage("x", simple(1))]
    config, engine = make_sync(account=scripted(pop3))
    result = engine.poll(config.accounts[0])
    assert (result.delivered, result.problems, pop3.messages) == (2, [], [])


def test_changed_uidls_are_rematched_not_delivered_again(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    source = mail_users.source.name
    dovecot.seed(source, [simple(n) for n in range(5)])
    config, engine = make_sync(account={"retention": "keep"})
    account = config.accounts[0]
    assert engine.poll(account).delivered == 5
    ledger: Ledger = engine.ledger  # type: ignore[attr-defined]
    before = set(ledger.known_messages(ledger.account_id(account.name) or 0))
    # What a migration to another host does to UIDLs: Dovecot forgets its UID list and numbers afresh
    # (the new UIDVALIDITY is time-based, hence the pause).
    time.sleep(1.1)
    maildir = dovecot.maildir(source)
    for path in maildir.iterdir():
        if path.name.startswith("dovecot"):
            path.unlink()
    dovecot.seed(source, [simple(9)])
    result = engine.poll(account)
    assert (result.status, result.delivered, result.recovered) == ("ok", 1, 0), result
    assert any("UIDLs changed at once" in problem for problem in result.problems)
    after = set(ledger.known_messages(ledger.account_id(account.name) or 0))
    assert not before & after and len(after) == 6
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 6
    assert "UIDL change:" in status(engine, config) and "5 re-matched" in status(engine, config)
    assert engine.poll(account).delivered == 0


@pytest.mark.parametrize(
    ("account_fields", "before", "forget_hashes", "after", "reported"),
    [
        # Rows written before header hashes were recorded: every message is looked up and found.
        ({"retention": "keep"}, 3, True, (0, 3), "3 unmatched looked up in the destination"),
        # A baseline (TOP n 0 only) recorded hashes too: pre-baseline mail stays undelivered.
        ({"start": "new"}, 0, False, (0, 0), "3 re-matched"),
    ],
)
def test_changed_uidls_on_the_scripted_server(
    dovecot: Dovecot,
    mail_users: MailUsers,
    pop3: ScriptedPop3Server,
    make_sync: SyncFactory,
    account_fields: dict[str, Any],
    before: int,
    forget_hashes: bool,
    after: tuple[int, int],
    reported: str,
) -> None:
    config, engine = make_sync(account=scripted(pop3, **account_fields))
    account = config.accounts[0]
    assert engine.poll(account).delivered == before
    assert ("RETR" in " ".join(pop3.recorded.commands)) == bool(before)  # a baseline reads headers only
    if forget_hashes:
        ledger: Ledger = engine.ledger  # type: ignore[attr-defined]
        with ledger.engine.begin() as connection:
            connection.exec_driver_sql("UPDATE messages SET header_hash = NULL")
    pop3.messages = [StoredMessage(f"moved-{n}", m.content) for n, m in enumerate(pop3.messages)]
    result = engine.poll(account)
    assert (result.delivered, result.recovered) == after, result
    assert any(reported in problem for problem in result.problems), result.problems
    assert len(dovecot.imap_messages(mail_users.destination.name)) == before
    assert len(pop3.messages) == 3  # kept (retention keep) or never delivered by us (seen)
    again = engine.poll(account)
    assert (again.delivered, again.recovered) == (0, 0)
