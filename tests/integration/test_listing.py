"""Issue 11.1 and 11.4 against real servers: UIDLs used again once their message is gone, and listings that
are empty or short for one poll (the scriptable POP3 server misbehaves; Dovecot is the destination, and the
source where a well-behaved server is wanted)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from connector.cli.report import status_records, status_text
from connector.ledger.models import MessageRow
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from tests.integration.conftest import SyncFactory, scripted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import Pop3Session, ScriptedPop3Server, StoredMessage

pytestmark = pytest.mark.integration


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def by_position(session: Pop3Session, argument: str) -> None:
    """UIDL answered with each message's position: "1" is whichever message is first now."""
    if argument:
        found = session.message(argument)
        if found is not None:
            session.ok(f"{found[0]} {found[0]}")
        return
    session.send_multiline("+OK", [f"{n} {n}".encode() for n, _ in session.live()])


def listing_once(
    server: ScriptedPop3Server, keep: Callable[[list[StoredMessage]], list[StoredMessage]]
) -> None:
    """The next session sees only ``keep(messages)`` (a locked or half-mounted maildrop); later ones all."""
    used = False

    def login(session: Pop3Session, argument: str) -> None:
        nonlocal used
        session.default("PASS", argument)
        if not used and session.state == "TRANSACTION":
            used = True
            session.messages = keep(session.messages)

    server.on("PASS", login)


def later(engine: SyncEngine, delta: timedelta) -> None:
    """Both the poll's and the ledger's clock ``delta`` ahead."""
    engine.clock = lambda: datetime.now(UTC) + delta
    engine.ledger._clock = engine.clock  # the ledger takes its clock at construction


def rows(engine: SyncEngine, name: str) -> dict[str, object]:
    ledger: Ledger = engine.ledger
    return dict(ledger.known_messages(ledger.account_id(name) or 0))


# --- 11.1: a UIDL used again after its message is gone -----------------------------------------------


def test_position_numbered_uidls_reused_after_quit_are_delivered_not_deleted(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.on("UIDL", by_position)
    pop3.messages = [StoredMessage("-", simple(n)) for n in (1, 2, 3)]
    config, engine = make_sync(account=scripted(pop3, retention="delete"))
    account = config.accounts[0]
    first = engine.poll(account)
    assert (first.status, first.delivered, first.deleted) == ("ok", 3, 3), first
    # Three new messages arrive; the server numbers them "1", "2", "3" again.
    pop3.messages = [StoredMessage("-", simple(n)) for n in (4, 5, 6)]
    second = engine.poll(account)
    assert (second.status, second.delivered, second.recovered, second.deleted) == ("ok", 3, 0, 3), second
    assert dovecot.imap_messages(mail_users.destination.name) == [simple(n) for n in range(1, 7)]


def test_a_due_dele_is_not_sent_for_another_message_under_the_same_uidl(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.on("UIDL", by_position)
    pop3.messages = [StoredMessage("-", simple(n)) for n in (1, 2, 3)]
    config, engine = make_sync(account=scripted(pop3, retention={"mode": "days", "days": 1}))
    account = config.accounts[0]
    assert engine.poll(account).delivered == 3
    # Someone removed them (webmail); three new ones of the very same sizes took their numbers.
    new = [StoredMessage("-", simple(n)) for n in (4, 5, 6)]
    assert [m.size for m in new] == [m.size for m in pop3.messages]
    pop3.messages = list(new)
    later(engine, timedelta(days=2))  # the rows of "1", "2", "3" are due for deletion now
    second = engine.poll(account)
    assert (second.status, second.delivered, second.deleted) == ("ok", 3, 0), second
    assert pop3.messages == new and pop3.recorded.deleted == []
    assert dovecot.imap_messages(mail_users.destination.name) == [simple(n) for n in range(1, 7)]
    # Once due themselves, the new ones are deleted: the identity check passes for the right message.
    later(engine, timedelta(days=4))
    third = engine.poll(account)
    assert (third.delivered, third.deleted) == (0, 3) and pop3.messages == []


def test_rows_without_a_header_hash_are_compared_by_list_size(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.on("UIDL", by_position)
    pop3.messages = [StoredMessage("-", simple(n)) for n in (1, 2)]
    config, engine = make_sync(account=scripted(pop3, retention={"mode": "days", "days": 1}))
    account = config.accounts[0]
    assert engine.poll(account).delivered == 2
    with engine.ledger.engine.begin() as connection:  # rows written before header hashes were recorded
        connection.execute(update(MessageRow).values(header_hash=None))
    # Both are gone; two bigger new messages are "1" and "2".
    new = [StoredMessage("-", simple(n, size=4000 + n)) for n in (3, 4)]
    pop3.messages = list(new)
    later(engine, timedelta(days=2))
    second = engine.poll(account)
    assert (second.status, second.delivered, second.deleted) == ("ok", 2, 0), second
    assert not any(command.startswith("TOP") for command in pop3.recorded.commands)
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 4 and pop3.messages == new


def test_a_due_dele_of_the_same_message_still_happens_on_dovecot(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    config, engine = make_sync(account={"retention": {"mode": "days", "days": 1}})
    account = config.accounts[0]
    assert engine.poll(account).delivered == 3
    later(engine, timedelta(days=2))
    second = engine.poll(account)
    assert (second.status, second.delivered, second.recovered, second.deleted) == ("ok", 0, 0, 3), second
    assert dovecot.maildir_count(mail_users.source.name) == 0
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3


def test_a_deletion_the_server_did_not_carry_out_delivers_nothing_twice(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    def quit_keeping_everything(session: Pop3Session, argument: str) -> None:
        session.ok("bye")
        session.state = "CLOSED"

    pop3.on("QUIT", quit_keeping_everything)
    config, engine = make_sync(account=scripted(pop3, retention="delete"))
    account = config.accounts[0]
    assert engine.poll(account).deleted == 3
    again = engine.poll(account)
    # Looked up in the destination first: found there, recorded, deleted again; not delivered twice.
    assert (again.status, again.delivered, again.recovered, again.deleted) == ("ok", 0, 3, 3), again
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3


def test_a_poll_that_stops_before_such_a_message_keeps_its_row_for_the_lookup(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    def quit_keeping_everything(session: Pop3Session, argument: str) -> None:
        session.ok("bye")
        session.state = "CLOSED"

    pop3.on("QUIT", quit_keeping_everything)
    config, engine = make_sync(account=scripted(pop3, retention="delete"))
    account = config.accounts[0]
    assert engine.poll(account).deleted == 3
    stop = threading.Event()
    stop.set()  # as a crash or a shutdown after planning: none of the three is dealt with
    assert engine.poll(account, stop=stop).status == "stopped"
    again = engine.poll(account)
    assert (again.status, again.delivered, again.recovered) == ("ok", 0, 3), again
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3


def test_a_catch_all_deletion_the_server_did_not_carry_out_delivers_nothing_twice(
    dovecot: Dovecot, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    def quit_keeping_everything(session: Pop3Session, argument: str) -> None:
        session.ok("bye")
        session.state = "CLOSED"

    people = [dovecot.new_user(name) for name in ("ann", "ben")]
    try:
        pop3.messages = [
            StoredMessage(
                f"uid-{n}", simple(n).replace(b"To: alice@example.net", b"To: ann@x.org, ben@x.org")
            )
            for n in range(2)
        ]
        pop3.on("QUIT", quit_keeping_everything)
        rules = [{"match": f"{p.name[:3]}@x.org", "mailbox": p.name} for p in people]
        config, engine = make_sync(
            account=scripted(pop3, retention="delete", routing={"rules": rules}),
            destination={"master_username": dovecot.master.name, "master_password": dovecot.master.password},
        )
        account = config.accounts[0]
        assert engine.poll(account).delivered == 4
        again = engine.poll(account)
        # Each recipient's mailbox is looked in first: found, recorded, deleted again.
        assert (again.status, again.delivered, again.recovered, again.deleted) == ("ok", 0, 4, 2), again
        assert [len(dovecot.imap_messages(p.name)) for p in people] == [2, 2]
    finally:
        for person in people:
            dovecot.remove_user(person.name)


# --- 11.4: a listing that is empty or short for one poll ---------------------------------------------


@pytest.mark.parametrize(
    ("keep", "listed"),
    [(lambda messages: [], 0), (lambda messages: messages[2:3], 1)],
    ids=["empty", "one-of-five"],
)
def test_a_short_listing_once_forgets_nothing_and_is_reported(
    dovecot: Dovecot,
    mail_users: MailUsers,
    pop3: ScriptedPop3Server,
    make_sync: SyncFactory,
    keep: Callable[[list[StoredMessage]], list[StoredMessage]],
    listed: int,
) -> None:
    pop3.messages = [StoredMessage(f"uid-{n}", simple(n)) for n in range(5)]
    # Thresholds that a single poll would reach: only the sudden-loss rule protects here.
    config, engine = make_sync(
        account=scripted(pop3, retention="keep", forget_missing_after_polls=1, forget_missing_after="0s")
    )
    account = config.accounts[0]
    assert engine.poll(account).delivered == 5
    listing_once(pop3, keep)
    short = engine.poll(account)
    assert (short.status, short.delivered) == ("ok", 0), short
    forgot = 5 - len(rows(engine, account.name))
    back = engine.poll(account)
    assert (back.status, back.delivered, back.recovered, back.problems) == ("ok", 0, 0, []), back
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 5
    assert forgot == 0
    assert any(f"listed {listed} message(s)" in problem for problem in short.problems), short.problems
    status = status_text(status_records(config.accounts, engine.ledger.statuses()))
    assert "short listing: 20" in status and f"listed {listed} message(s), and " in status, status


def test_a_missing_message_is_forgotten_after_polls_and_time_and_looked_up_when_it_comes_back(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.messages = [StoredMessage(f"uid-{n}", simple(n)) for n in range(5)]
    config, engine = make_sync(account=scripted(pop3, retention="keep", forget_missing_after_polls=2))
    account = config.accounts[0]
    assert engine.poll(account).delivered == 5
    hidden = pop3.messages.pop(1)  # one of five missing: not a sudden loss, counted
    for _ in range(2):
        assert engine.poll(account).problems == []
    row = rows(engine, account.name)["uid-1"]
    assert row.missing_polls == 2  # type: ignore[attr-defined]
    # Two polls, but not yet 24 hours: still known, so its return changes nothing.
    pop3.messages.insert(1, hidden)
    assert (engine.poll(account).delivered, engine.poll(account).recovered) == (0, 0)
    assert rows(engine, account.name)["uid-1"].missing_since is None  # type: ignore[attr-defined]
    # Missing for two polls over more than a day: forgotten. When it comes back, it is looked up first.
    pop3.messages.pop(1)
    engine.poll(account)
    later(engine, timedelta(hours=25))
    engine.poll(account)
    pop3.messages.insert(1, hidden)
    back = engine.poll(account)
    assert (back.status, back.delivered, back.recovered) == ("ok", 0, 1), back
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 5
