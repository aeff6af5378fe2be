"""`pop-connector reconcile` against a real IMAP server: a message deleted by hand from the destination and a
duplicate added by hand are both found and named; an intact migration reconciles clean."""

from __future__ import annotations

from dataclasses import replace

import pytest

from connector.cli.reconcile import check
from connector.connections import Connections
from tests.configs import EWS_MAILBOX, EWS_SERVICE, EWS_SERVICE_PASSWORD, ews_destination
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.ews import EwsServer

pytestmark = pytest.mark.integration


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def test_reconcile_finds_a_message_deleted_by_hand_and_a_duplicate_added_by_hand(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(4)])
    config, engine = make_sync()
    account = config.accounts[0]
    assert engine.poll(account).delivered == 4
    entries = [entry for entry, _ in engine.ledger.journal.deliveries(account.name)]

    assert check(config, account, entries, Connections()) == []

    with dovecot.imap(mail_users.destination.name) as client:
        client.select_folder("INBOX")
        uids = sorted(client.search("ALL"))
        stored = client.fetch([uids[2]], ["BODY.PEEK[]"])[uids[2]][b"BODY[]"]
        client.delete_messages([uids[1]])  # deleted by hand
        client.expunge()
        client.append("INBOX", stored)  # a second copy of the third message, added by hand
        client.append("INBOX", simple(99))  # someone else's mail: not reported

    found = check(config, account, entries, Connections())

    described = sorted(d.describe().split(":")[0] for d in found)
    assert described == ["duplicated", "missing"]
    missing = next(d for d in found if d.missing)
    duplicated = next(d for d in found if not d.missing)
    assert missing.entry.uidl == entries[1].uidl and (missing.expected, missing.found) == (1, 0)
    assert duplicated.entry.uidl == entries[2].uidl and (duplicated.expected, duplicated.found) == (1, 2)
    assert (entries[1].message_id or "") in missing.describe()


def test_the_command_exits_1_and_names_each_message(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from connector.cli import main

    dovecot.seed(mail_users.source.name, [simple(n) for n in range(2)])
    config, engine = make_sync()
    account = config.accounts[0]
    engine.poll(account)
    assert config.source is not None
    assert main(["--config", str(config.source), "reconcile", "--account", account.name]) == 0
    assert "2 journaled deliveries checked: 0 missing, 0 duplicated" in capsys.readouterr().out

    with dovecot.imap(mail_users.destination.name) as client:
        client.select_folder("INBOX")
        client.delete_messages(sorted(client.search("ALL"))[:1])
        client.expunge()

    assert main(["--config", str(config.source), "reconcile", "--account", account.name]) == 1
    out = capsys.readouterr().out
    assert "missing: <" in out and "1 missing, 0 duplicated" in out


def test_reconcile_reads_an_exchange_folder_by_the_items_sha256_property(
    ews: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    ews.add_user(EWS_SERVICE, EWS_SERVICE_PASSWORD, impersonation=True)
    ews.add_mailbox(EWS_MAILBOX)
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    config, engine = make_sync(
        account={"mailbox": EWS_MAILBOX, "folder": "Inbox/Hosted"},
        destination={**ews_destination(ews), "version": "Exchange2016"},
    )
    account = config.accounts[0]
    assert engine.poll(account).delivered == 3
    entries = [entry for entry, _ in engine.ledger.journal.deliveries(account.name)]
    assert check(config, account, entries, Connections()) == []

    [gone] = check(
        config, account, [*entries, replace(entries[0], stamp="f" * 32, sha256="0" * 64)], Connections()
    )
    assert gone.missing and gone.entry.stamp == "f" * 32
