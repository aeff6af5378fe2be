"""One malformed line in a UIDL or LIST listing (issue 11.7): that message is left on the server and
reported (a problem the first time, the account's identity note in `status`, the poll result's
``unidentified`` count behind the metric); the others are delivered, and the account does not fail.
The POP3 side is the scriptable server; the destination is the real Dovecot."""

from __future__ import annotations

from typing import Any

import pytest

from connector.cli.report import status_records, status_text
from connector.poll.result import PollResult
from tests.integration.conftest import SyncFactory, scripted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import ScriptedPop3Server, StoredMessage, canonical

pytestmark = pytest.mark.integration

LONG_UIDL = "L" * 401  # over what the connector accepts (RFC 1939 says 70; up to 400 are taken)


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def ok_without_problems(result: PollResult) -> bool:
    return result.status == "ok" and not result.problems and not result.failed and not result.skipped


BAD_LINES = {
    "uidl-too-long": {"uidl_line": b"{n} " + LONG_UIDL.encode()},
    "uidl-control-character": {"uidl_line": b"{n} uid\x01two"},
    "uidl-bad-number": {"uidl_line": b"{n}x uid-two"},
    "uidl-missing": {"uidl_line": b"{n}"},
    "list-bad-size": {"list_line": b"{n} 12k"},
    "list-bad-number": {"list_line": b"two 120"},
    "list-garbage": {"list_line": b"\xff\xfe"},
}


@pytest.mark.parametrize("fields", ["quick", "full"], ids=["uidl-then-list-n", "uidl-and-list"])
@pytest.mark.parametrize("bad", sorted(BAD_LINES))
def test_one_malformed_listing_line(
    dovecot: Dovecot,
    mail_users: MailUsers,
    pop3: ScriptedPop3Server,
    make_sync: SyncFactory,
    bad: str,
    fields: str,
) -> None:
    # "full": max_message_size makes every poll ask for UIDL and LIST at once; else UIDL, then LIST n.
    extra: dict[str, Any] = {"max_message_size": "10M"} if fields == "full" else {}
    for attribute, line in BAD_LINES[bad].items():
        setattr(pop3.messages[1], attribute, line)
    config, engine = make_sync(account=scripted(pop3, **extra))
    account = config.accounts[0]
    first = engine.poll(account)
    assert first.status == "ok" and first.delivered == 2 and first.unidentified == 1, first
    assert len(first.problems) == 1 and "left on the server" in first.problems[0], first.problems
    assert [m.uidl for m in pop3.messages] == ["uid-1"]
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 2
    # Reported once: the next polls leave it there without failing or reporting the account again.
    second = engine.poll(account)
    assert ok_without_problems(second) and second.unidentified == 1, second
    text = status_text(status_records(config.accounts, engine.ledger.statuses()))
    assert "identity: 1 line(s) of the UIDL or LIST listing malformed" in text
    # Once the server lists it properly, it is delivered like any other.
    pop3.messages[0].uidl_line = pop3.messages[0].list_line = None
    third = engine.poll(account)
    assert ok_without_problems(third) and third.delivered == 1 and third.unidentified == 0, third
    assert pop3.messages == []
    assert "identity:" not in status_text(status_records(config.accounts, engine.ledger.statuses()))


def test_a_delivered_message_listed_wrongly_is_not_forgotten(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    """Kept on the server and delivered; for one poll its line is malformed. Its ledger row must stay,
    or the next poll would deliver it again. (max_message_size: UIDL and LIST are both read.)"""
    config, engine = make_sync(account=scripted(pop3, retention="keep", max_message_size="10M"))
    account = config.accounts[0]
    assert engine.poll(account).delivered == 3
    pop3.messages[1].list_line = b"{n} twelve"
    pop3.messages[2].uidl_line = b"{n} " + LONG_UIDL.encode()
    broken = engine.poll(account)
    assert broken.status == "ok" and broken.delivered == 0 and broken.unidentified == 2, broken
    for message in pop3.messages:
        message.uidl_line = message.list_line = None
    again = engine.poll(account)
    assert ok_without_problems(again) and again.delivered == 0, again
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3


def test_every_line_malformed_forgets_nothing(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    config, engine = make_sync(account=scripted(pop3, retention="keep"))
    account = config.accounts[0]
    assert engine.poll(account).delivered == 3
    for message in pop3.messages:
        message.uidl_line = b"? ?"
    broken = engine.poll(account)
    assert broken.status == "ok" and broken.unidentified == 3, broken
    for message in pop3.messages:
        message.uidl_line = None
    assert engine.poll(account).delivered == 0
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3


def test_a_long_but_valid_uidl_is_accepted(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    """Over RFC 1939's 70 characters but otherwise valid: taken as it is, delivered once."""
    uidl = "U" * 300
    with ScriptedPop3Server([StoredMessage(uidl, simple(1))]) as server:
        config, engine = make_sync(account=scripted(server, retention="keep"))
        account = config.accounts[0]
        first = engine.poll(account)
        assert ok_without_problems(first) and first.delivered == 1, first
        assert ok_without_problems(engine.poll(account))
        assert list(engine.ledger.known_messages(engine.ledger.account_id(account.name) or 0)) == [uidl]
    assert dovecot.imap_messages(mail_users.destination.name) == [canonical(simple(1))]
