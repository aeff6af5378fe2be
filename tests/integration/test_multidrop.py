"""Catch-all (multidrop) delivery against the real Dovecot: each local mailbox gets each message once,
logged in to as a Dovecot master user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from connector.ledger.models import RecipientRow
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUser, MailUsers


@pytest.fixture
def people(dovecot: Dovecot) -> Iterator[dict[str, MailUser]]:
    """Four local mailboxes on the destination: alice, bob, carol and the postmaster."""
    users = {name: dovecot.new_user(name) for name in ("alice", "bob", "carol", "postmaster")}
    yield users
    for user in users.values():
        dovecot.remove_user(user.name)


def addressed(n: int, *lines: str) -> bytes:
    return simple(n).replace(b"To: alice@example.net\r\n", "".join(f"{line}\r\n" for line in lines).encode())


def routing(people: dict[str, MailUser], *, default: bool = True) -> dict[str, Any]:
    table: dict[str, Any] = {
        "rules": [
            {"match": "alice@example.org", "mailbox": people["alice"].name},
            {"match": "bob@example.org", "mailbox": people["bob"].name},
            {"match": "*@sales.example.org", "mailbox": people["carol"].name},
        ]
    }
    if default:
        table["default"] = {"mailbox": people["postmaster"].name}
    return table


def master(dovecot: Dovecot, **extra: Any) -> dict[str, Any]:
    return {"master_username": dovecot.master.name, "master_password": dovecot.master.password, **extra}


@pytest.mark.parametrize("master_login", ["sasl", "separator"])
def test_a_message_for_three_people_reaches_each_once(
    dovecot: Dovecot,
    mail_users: MailUsers,
    make_sync: SyncFactory,
    people: dict[str, MailUser],
    master_login: str,
) -> None:
    message = addressed(
        1,
        "To: alice@example.org, Bob <bob@example.org>, x@sales.example.org, ALICE@example.org",
        "Cc: z@x.example",
    )
    only_bob = addressed(2, "To: bob@example.org")
    dovecot.seed(mail_users.source.name, [message, only_bob])
    _, engine = make_sync(
        account={"routing": routing(people)}, destination=master(dovecot, master_login=master_login)
    )
    account = engine.config.accounts[0]
    result = engine.poll(account)
    assert result.ok, result
    assert result.delivered == 4
    for name, count in (("alice", 1), ("bob", 2), ("carol", 1), ("postmaster", 0)):
        assert len(dovecot.imap_messages(people[name].name)) == count, name
    assert dovecot.imap_messages(mail_users.destination.name) == []
    assert dovecot.maildir_count(mail_users.source.name) == 0  # deleted once every recipient had it
    # The delivery journal has one row per recipient, naming it.
    journaled = sorted((entry.recipient or "") for entry, _ in engine.ledger.journal.deliveries(account.name))
    assert journaled == sorted(
        [people["alice"].name, people["bob"].name, people["bob"].name, people["carol"].name]
    )
    again = engine.poll(account)
    assert again.ok and again.delivered == 0
    assert len(dovecot.imap_messages(people["alice"].name)) == 1


def test_envelope_headers_route_bcc_and_list_mail(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, people: dict[str, MailUser]
) -> None:
    bcc = addressed(
        1, "Delivered-To: catchall@hosted.example", "X-Original-To: bob@example.org", "To: a@else.example"
    )
    listed = addressed(2, "Delivered-To: alice@example.org", "To: list@lists.example", "Cc: bob@example.org")
    dovecot.seed(mail_users.source.name, [bcc, listed])
    _, engine = make_sync(account={"routing": routing(people)}, destination=master(dovecot))
    result = engine.poll(engine.config.accounts[0])
    assert result.ok and result.delivered == 2, result
    assert [b"Subject: test message 1" in body for body in dovecot.imap_messages(people["bob"].name)] == [
        True
    ]
    assert [b"Subject: test message 2" in body for body in dovecot.imap_messages(people["alice"].name)] == [
        True
    ]
    assert dovecot.imap_messages(people["postmaster"].name) == []


def test_unmatched_mail_goes_to_the_default_mailbox(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, people: dict[str, MailUser]
) -> None:
    dovecot.seed(mail_users.source.name, [addressed(1, "To: stranger@elsewhere.example")])
    _, engine = make_sync(account={"routing": routing(people)}, destination=master(dovecot))
    result = engine.poll(engine.config.accounts[0])
    assert result.ok and result.delivered == 1, result
    assert len(dovecot.imap_messages(people["postmaster"].name)) == 1
    assert dovecot.maildir_count(mail_users.source.name) == 0


def test_unmatched_mail_without_a_default_is_quarantined_on_the_server(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, people: dict[str, MailUser]
) -> None:
    dovecot.seed(
        mail_users.source.name,
        [addressed(1, "To: stranger@elsewhere.example"), addressed(2, "To: bob@example.org")],
    )
    _, engine = make_sync(account={"routing": routing(people, default=False)}, destination=master(dovecot))
    result = engine.poll(engine.config.accounts[0])
    assert result.delivered == 1 and result.quarantined == 1, result
    assert dovecot.maildir_count(mail_users.source.name) == 1
    [quarantined] = engine.ledger.quarantine.messages(engine.config.accounts[0].name)
    assert "no routing rule matches" in (quarantined.last_error or "")
    again = engine.poll(engine.config.accounts[0])
    assert again.ok and again.delivered == 0 and dovecot.maildir_count(mail_users.source.name) == 1


def test_only_missing_recipients_are_delivered_after_an_interruption(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, people: dict[str, MailUser]
) -> None:
    """Bob's copy arrived but was not recorded (a crash): the next poll finds it and only adds Carol's."""
    message = addressed(1, "To: alice@example.org, bob@example.org, x@sales.example.org")
    dovecot.seed(mail_users.source.name, [message])
    _, engine = make_sync(account={"routing": routing(people)}, destination=master(dovecot))
    account = engine.config.accounts[0]
    ledger = engine.ledger
    original = ledger.recipients.record_delivered
    calls = 0

    def crash_on_second(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # stands in for a crash: nothing after it runs
        original(*args, **kwargs)

    ledger.recipients.record_delivered = crash_on_second  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        engine.poll(account)
    ledger.recipients.record_delivered = original  # type: ignore[method-assign]
    assert dovecot.maildir_count(mail_users.source.name) == 1
    result = engine.poll(account)
    assert result.ok and result.recovered == 1 and result.delivered == 1, result
    for name in ("alice", "bob", "carol"):
        assert len(dovecot.imap_messages(people[name].name)) == 1, name
    assert dovecot.maildir_count(mail_users.source.name) == 0
    with ledger.engine.connect() as connection:
        states = connection.execute(RecipientRow.__table__.select()).all()  # type: ignore[attr-defined]
    assert sum(1 for row in states if row.state == "delivered") >= 3


def test_a_recipient_refusing_the_message_does_not_cost_the_others(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, people: dict[str, MailUser]
) -> None:
    # Dovecot refuses APPENDs over quota_max_mail_size for good (NO [LIMIT]): a permanent refusal.
    small = dovecot.new_user("small", userdb_fields={"quota_max_mail_size": "1K"})
    table = routing(people)
    table["rules"].append({"match": "small@example.org", "mailbox": small.name})
    big = simple(1, size=4000).replace(b"To: alice@example.net", b"To: small@example.org, alice@example.org")
    dovecot.seed(mail_users.source.name, [big])
    _, engine = make_sync(
        account={"routing": table, "retry": {"max_attempts": 2}}, destination=master(dovecot)
    )
    account = engine.config.accounts[0]
    first = engine.poll(account)
    assert (first.delivered, first.failed, first.quarantined) == (1, 1, 0), first
    assert len(dovecot.imap_messages(people["alice"].name)) == 1
    assert dovecot.maildir_count(mail_users.source.name) == 1  # not every recipient has it: kept
    second = engine.poll(account)  # alice is not given a second copy; small refuses again: quarantined
    assert (second.delivered, second.quarantined) == (0, 1), second
    assert len(dovecot.imap_messages(people["alice"].name)) == 1
    assert dovecot.maildir_count(mail_users.source.name) == 1
    dovecot.remove_user(small.name)
