"""Limits and selection (issue 4) against the real Dovecot: max_message_size, max_messages_per_poll,
start = "new"."""

from __future__ import annotations

import pytest

from connector.ledger.records import MessageState
from connector.ledger.store import Ledger
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def rows(engine: object, name: str) -> dict[str, MessageState]:
    ledger: Ledger = engine.ledger  # type: ignore[attr-defined]
    return {row.uidl: row.state for row in ledger.known_messages(ledger.account_id(name) or 0).values()}


def test_oversize_skip_quarantines_without_downloading(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1), simple(2, size=40_000), simple(3)])
    config, engine = make_sync(account={"max_message_size": "20K"})
    account = config.accounts[0]
    result = engine.poll(account)
    assert (result.delivered, result.quarantined, result.deleted) == (2, 1, 2)
    assert any("over max_message_size" in problem for problem in result.problems)
    (quarantined,) = engine.ledger.quarantine.messages(account.name)
    assert quarantined.size is None and quarantined.pop_size is not None and quarantined.pop_size > 20_000
    assert "not downloaded" in (quarantined.last_error or "")
    assert dovecot.maildir_count(mail_users.source.name) == 1
    again = engine.poll(account)
    assert (again.delivered, again.quarantined, again.problems) == (0, 0, [])
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 2


def test_oversize_headers_only_delivers_headers_and_keeps_the_original(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    big = simple(2, size=40_000)
    dovecot.seed(mail_users.source.name, [simple(1), big])
    config, engine = make_sync(account={"max_message_size": "20K", "oversize": "headers_only"})
    account = config.accounts[0]
    result = engine.poll(account)
    assert (result.delivered, result.deleted) == (2, 1)
    bodies = sorted(dovecot.imap_messages(mail_users.destination.name), key=len)
    headers_only = next(body for body in bodies if b"test message 2" in body)
    assert b"Message-ID: <msg2@example.net>" in headers_only and b"xxxxxxxx" not in headers_only
    assert b"left on the POP3 server" in headers_only and len(headers_only) < 2000
    assert dovecot.maildir_count(mail_users.source.name) == 1  # the whole message stays
    again = engine.poll(account)
    assert (again.delivered, again.deleted) == (0, 0)
    assert dovecot.maildir_count(mail_users.source.name) == 1


def test_max_messages_per_poll(dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory) -> None:
    messages = [simple(n) for n in range(5)]
    dovecot.seed(mail_users.source.name, messages)
    config, engine = make_sync(account={"max_messages_per_poll": 2})
    assert [engine.poll(config.accounts[0]).delivered for _ in range(3)] == [2, 2, 1]
    assert dovecot.imap_messages(mail_users.destination.name) == messages  # oldest first, in order


def test_start_new_leaves_existing_mail_alone(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    config, engine = make_sync(account={"start": "new"})
    account = config.accounts[0]
    dry = engine.poll(account, dry_run=True)
    assert dry.plan is not None and dry.plan.deliver == [] and dry.plan.seen == 3
    first = engine.poll(account)
    assert (first.status, first.delivered, first.deleted) == ("ok", 0, 0)
    dovecot.seed(mail_users.source.name, [simple(7)])
    second = engine.poll(account)
    assert (second.delivered, second.deleted) == (1, 1)
    assert dovecot.imap_messages(mail_users.destination.name) == [simple(7)]
    # Mail that was there before the baseline is never deleted: it was not delivered by us.
    assert dovecot.maildir_count(mail_users.source.name) == 3
    states = list(rows(engine, account.name).values())
    assert states.count(MessageState.SEEN) == 3 and states.count(MessageState.DELETED) == 1
