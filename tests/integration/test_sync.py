"""One poll of one account, end to end against the real Dovecot POP3 and IMAP servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from connector.ledger.records import MessageState
from connector.ledger.store import Ledger
from tests.integration.conftest import SyncFactory
from tests.ledger_statements import counted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration


def ledger_of(engine: object) -> Ledger:
    return engine.ledger  # type: ignore[attr-defined,no-any-return]


def test_fresh_sync_delivers_everything_in_order_and_deletes(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    messages = [simple(n) for n in range(5)]
    dovecot.seed(mail_users.source.name, messages)
    config, engine = make_sync()
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.deleted, result.failed) == ("ok", 5, 5, 0)
    delivered = dovecot.imap_fetch(mail_users.destination.name)
    assert [m.body for m in delivered] == messages
    assert all(m.flags == () for m in delivered)  # new mail is unread
    # INTERNALDATE is when the hosted server received it (newest Received:), not the import time.
    assert delivered[1].internal_date == datetime(2025, 6, 3, 8, 1, 5, tzinfo=UTC)
    assert dovecot.maildir_count(mail_users.source.name) == 0
    rows = ledger_of(engine).known_messages(ledger_of(engine).account_id(config.accounts[0].name) or 0)
    assert {row.state for row in rows.values()} == {MessageState.DELETED}
    assert all(row.sha256 and row.message_id for row in rows.values())


def test_second_sync_delivers_nothing(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    config, engine = make_sync(account={"retention": "keep"})
    assert engine.poll(config.accounts[0]).delivered == 3
    again = engine.poll(config.accounts[0])
    assert (again.status, again.delivered, again.deleted) == ("ok", 0, 0)
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3
    assert dovecot.maildir_count(mail_users.source.name) == 3
    dovecot.seed(mail_users.source.name, [simple(9)])
    third = engine.poll(config.accounts[0])
    assert third.delivered == 1
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 4


def test_an_idle_poll_and_a_keeping_poll_commit_once(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"retention": "keep"})
    engine.poll(config.accounts[0])  # creates the account, delivers one message and keeps it
    with counted(ledger_of(engine).engine) as seen:
        assert engine.poll(config.accounts[0]).delivered == 0
    # The poll's start, its result, and the lease taken and released, together.
    assert len(seen.writes()) == 1
    dovecot.seed(mail_users.source.name, [simple(2)])
    with counted(ledger_of(engine).engine) as seen:
        assert engine.poll(config.accounts[0]).delivered == 1
    # "pending" with the lease's take and the poll's start; then "delivered" with the poll's result
    # and the release: nothing is deleted, so nothing waits for the delivery record before QUIT.
    assert len(seen.writes()) == 2


def test_days_retention_deletes_only_old_deliveries(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(2)])
    config, engine = make_sync(account={"retention": {"mode": "days", "days": 14}})
    account = config.accounts[0]
    assert (engine.poll(account).delivered, dovecot.maildir_count(mail_users.source.name)) == (2, 2)
    engine.clock = lambda: datetime.now(UTC) + timedelta(days=13)
    assert engine.poll(account).deleted == 0
    engine.clock = lambda: datetime.now(UTC) + timedelta(days=15)
    result = engine.poll(account)
    assert (result.deleted, result.delivered) == (2, 0)
    assert dovecot.maildir_count(mail_users.source.name) == 0
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 2


def test_gone_messages_are_pruned_from_the_ledger(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync()
    engine.poll(config.accounts[0])
    account_id = ledger_of(engine).account_id(config.accounts[0].name) or 0
    assert len(ledger_of(engine).known_messages(account_id)) == 1
    engine.poll(config.accounts[0])
    assert ledger_of(engine).known_messages(account_id) == {}


def test_wrong_pop3_password_is_an_auth_error(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"password": "wrong"})
    result = engine.poll(config.accounts[0])
    assert result.status == "auth_error"
    assert result.error is not None and config.accounts[0].name in result.error
    assert "wrong" not in result.error
    assert result.next_poll_at is not None and result.next_poll_at > datetime.now(UTC)
    assert dovecot.maildir_count(mail_users.source.name) == 1
    (status,) = [s for s in ledger_of(engine).statuses() if s.name == config.accounts[0].name]
    assert status.last_result == "auth_error" and status.consecutive_failures == 1


def test_missing_nested_folder_is_created(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"folder": "Imported/Hosted", "mark_seen": True})
    assert engine.poll(config.accounts[0]).delivered == 1
    (message,) = dovecot.imap_fetch(mail_users.destination.name, "Imported.Hosted")
    assert message.flags == (b"\\Seen",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"Subject: no final newline\nMessage-ID: <nf@x>\n\nlast line", None, id="no-final-crlf"),
        pytest.param(b"Subject: lf\nMessage-ID: <lf@x>\n\none\ntwo\n", None, id="bare-lf"),
        pytest.param(
            b"Subject: dots\nMessage-ID: <dot@x>\n\n.\n..two\n.three\n...\n", None, id="leading-dots"
        ),
        pytest.param(
            "Subject: Grüße\nFrom: Jörg <j@x>\nMessage-ID: <8@x>\n\nÄÖÜ\n".encode("latin-1"), None, id="8bit"
        ),
    ],
)
def test_awkward_messages_arrive_byte_for_byte(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, raw: bytes, expected: bytes | None
) -> None:
    dovecot.seed(mail_users.source.name, [raw])
    config, engine = make_sync()
    assert engine.poll(config.accounts[0]).delivered == 1
    (body,) = dovecot.imap_messages(mail_users.destination.name)
    want = raw.replace(b"\n", b"\r\n")
    if not want.endswith(b"\r\n"):
        want += b"\r\n"
    assert body == (expected or want)


def test_message_without_message_id_gets_a_stable_one(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    raw = simple(1, message_id=False)
    dovecot.seed(mail_users.source.name, [raw])
    config, engine = make_sync()
    assert engine.poll(config.accounts[0]).delivered == 1
    (body,) = dovecot.imap_messages(mail_users.destination.name)
    first_line, rest = body.split(b"\r\n", 1)
    assert first_line.startswith(b"Message-ID: <pop-connector.") and rest == raw


def test_dry_run_changes_nothing(dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    config, engine = make_sync()
    result = engine.poll(config.accounts[0], dry_run=True)
    assert result.plan is not None and result.plan.new_count == 3
    assert dovecot.imap_messages(mail_users.destination.name) == []
    assert dovecot.maildir_count(mail_users.source.name) == 3
    assert ledger_of(engine).account_id(config.accounts[0].name, create=False) is None
