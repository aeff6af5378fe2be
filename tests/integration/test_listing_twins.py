"""Identical messages under one UIDL (issue 11.6): popa3d derives its UIDLs from the content, so a message
the MTA delivered twice is listed twice under one UIDL. Each copy is delivered exactly once, through
crashes and partial deletions; copies that nothing tells apart are left on the server and reported once.
The POP3 side is the scriptable server behaving as popa3d 1.0.3 does; the destination is the real Dovecot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from connector.cli.report import status_records, status_text
from connector.config import Account
from connector.errors import DestinationConnectError
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from connector.poll.result import PollResult
from connector.pop3 import connect_pop3
from tests.integration.conftest import SyncFactory, scripted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import (
    CloseConnection,
    Pop3Session,
    ScriptedPop3Server,
    StoredMessage,
    canonical,
    popa3d_like,
    popa3d_message,
)

pytestmark = pytest.mark.integration

TWIN = simple(1)
OTHER = simple(2)


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def popa3d() -> Iterator[ScriptedPop3Server]:
    """Two identical copies of one message and one other message, as popa3d lists them."""
    with popa3d_like([popa3d_message(TWIN), popa3d_message(TWIN), popa3d_message(OTHER)]) as server:
        yield server


def delivered(dovecot: Dovecot, users: MailUsers) -> Counter[bytes]:
    """How many copies of each message the destination holds."""
    return Counter(dovecot.imap_messages(users.destination.name))


def clean(result: PollResult) -> bool:
    return result.status == "ok" and not result.problems and not result.failed and not result.skipped


def account_of(
    make_sync: SyncFactory, server: ScriptedPop3Server, **fields: Any
) -> tuple[Account, SyncEngine]:
    config, engine = make_sync(account=scripted(server, **fields))
    return config.accounts[0], engine


def test_popa3d_lists_identical_copies_under_one_uidl(popa3d: ScriptedPop3Server) -> None:
    """The fixture is what popa3d 1.0.3 does: no CAPA, one UIDL for both copies."""
    with connect_pop3(popa3d.host, popa3d.port, tls="none", ssl_context=None, timeout=5) as client:
        assert dict(client.capabilities.entries) == {}
        client.login("alice", "secret")
        uidls = [info.uidl for info in client.uidl()]
    assert uidls[0] == uidls[1] != uidls[2]
    assert popa3d.recorded.commands[0] == "CAPA"


def test_each_identical_copy_is_delivered_once(
    dovecot: Dovecot, mail_users: MailUsers, popa3d: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    account, engine = account_of(make_sync, popa3d)
    first = engine.poll(account)
    assert clean(first) and first.delivered == 3 and first.deleted == 3, first
    assert popa3d.messages == []
    assert delivered(dovecot, mail_users) == {canonical(TWIN): 2, canonical(OTHER): 1}
    again = engine.poll(account)
    assert clean(again) and again.delivered == 0, again


def test_identical_copies_kept_on_the_server_are_not_delivered_again(
    dovecot: Dovecot, mail_users: MailUsers, popa3d: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    account, engine = account_of(make_sync, popa3d, retention="keep")
    assert engine.poll(account).delivered == 3
    second = engine.poll(account)
    assert clean(second) and second.delivered == 0, second
    # A third copy arrives (the MTA retried once more): exactly one more delivery.
    popa3d.messages.append(popa3d_message(TWIN))
    third = engine.poll(account)
    assert clean(third) and third.delivered == 1, third
    # Someone removes two copies with another client: nothing is delivered again, nothing forgotten wrongly.
    del popa3d.messages[0:2]
    assert engine.poll(account).delivered == 0
    # A copy listed again while the removed ones are still counted missing (rows are forgotten only after
    # polls and time, issue 11.4) cannot be told from one of them coming back: it is not delivered again.
    popa3d.messages.append(popa3d_message(TWIN))
    assert engine.poll(account).delivered == 0
    assert delivered(dovecot, mail_users) == {canonical(TWIN): 3, canonical(OTHER): 1}


def test_a_copy_arriving_after_the_first_was_delivered(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    """The first copy was delivered under its plain UIDL; the second makes the UIDL a duplicate."""
    with popa3d_like([popa3d_message(TWIN)]) as server:
        account, engine = account_of(make_sync, server, retention="keep")
        assert engine.poll(account).delivered == 1
        server.messages.append(popa3d_message(TWIN))
        second = engine.poll(account)
        assert clean(second) and second.delivered == 1, second
        assert engine.poll(account).delivered == 0
        server.messages.pop(0)
        assert engine.poll(account).delivered == 0
    assert delivered(dovecot, mail_users) == {canonical(TWIN): 2}


@pytest.mark.parametrize("retention", ["delete", "keep", {"mode": "days", "days": 7}])
def test_one_copy_per_poll(
    dovecot: Dovecot,
    mail_users: MailUsers,
    popa3d: ScriptedPop3Server,
    make_sync: SyncFactory,
    retention: Any,
) -> None:
    """max_messages_per_poll = 1: the first copy is delivered (and, under "delete", removed) before the
    second is looked at. The ledger's row of the removed copy must not make the second look done."""
    account, engine = account_of(make_sync, popa3d, retention=retention, max_messages_per_poll=1)
    results = [engine.poll(account) for _ in range(4)]
    assert [r.delivered for r in results] == [1, 1, 1, 0], results
    assert all(clean(r) for r in results), results
    assert delivered(dovecot, mail_users) == {canonical(TWIN): 2, canonical(OTHER): 1}
    assert len(popa3d.messages) == (0 if retention == "delete" else 3)


def test_crash_after_dele_before_quit(
    dovecot: Dovecot, mail_users: MailUsers, popa3d: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    """Both copies delivered and DELEted, then the connection is lost before QUIT: the server keeps both."""
    account, engine = account_of(make_sync, popa3d)

    def drop(session: Pop3Session, argument: str) -> None:
        raise CloseConnection

    popa3d.on("QUIT", drop)
    first = engine.poll(account)
    assert first.delivered == 3 and len(popa3d.messages) == 3
    del popa3d.hooks["QUIT"]
    second = engine.poll(account)
    assert second.delivered == 0 and second.deleted == 3, second
    assert popa3d.messages == []
    assert delivered(dovecot, mail_users) == {canonical(TWIN): 2, canonical(OTHER): 1}


def test_quit_that_removed_one_of_two_copies(
    dovecot: Dovecot, mail_users: MailUsers, popa3d: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    """The server removes only one of the two DELEted copies and drops the connection instead of +OK."""
    account, engine = account_of(make_sync, popa3d)

    def partial_update(session: Pop3Session, argument: str) -> None:
        popa3d.messages.remove(session.messages[min(session.marked) - 1])
        raise CloseConnection

    popa3d.on("QUIT", partial_update)
    assert engine.poll(account).delivered == 3
    assert len(popa3d.messages) == 2
    del popa3d.hooks["QUIT"]
    second = engine.poll(account)
    assert second.delivered == 0 and second.deleted == 2, second
    assert popa3d.messages == []
    assert delivered(dovecot, mail_users) == {canonical(TWIN): 2, canonical(OTHER): 1}


def test_destination_down_after_the_first_copy(
    dovecot: Dovecot, mail_users: MailUsers, popa3d: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    """The first copy is delivered and deleted; the connection to the destination is lost while the second
    is appended. Whether that APPEND arrived cannot be told from the destination (the first copy is there,
    byte for byte), so the second copy is quarantined, left on the server and reported once: neither lost
    nor delivered twice, even after `quarantine retry` (by then the first copy's row is forgotten)."""
    account, engine = account_of(make_sync, popa3d)
    appends = 0
    original = engine.connections.open_destination

    def flaky(*args: Any, **kwargs: Any) -> Any:
        session = original(*args, **kwargs)
        deliver = session.deliver

        def once(message: Any) -> str:
            nonlocal appends
            appends += 1
            if appends == 2:
                raise DestinationConnectError("connection lost")
            return deliver(message)

        session.deliver = once
        session.max_batch = lambda: 1
        return session

    engine.connections = replace(engine.connections, open_destination=flaky)
    first = engine.poll(account)
    # A connection lost in one APPEND does not stop the poll (issue 12.6): the other message goes too.
    assert first.delivered == 2 and first.deleted == 2, first
    assert popa3d.messages == [popa3d_message(TWIN)]
    second = engine.poll(account)
    assert (second.delivered, second.recovered, second.quarantined) == (0, 0, 1), second
    assert any("identical copy" in problem for problem in second.problems), second.problems
    assert clean(engine.poll(account))
    ledger: Ledger = engine.ledger
    assert ledger.quarantine.release(None, account.name) == 1
    released = engine.poll(account)
    assert (released.delivered, released.recovered, released.quarantined) == (0, 0, 1), released
    assert popa3d.messages == [popa3d_message(TWIN)]
    assert delivered(dovecot, mail_users) == {canonical(TWIN): 1, canonical(OTHER): 1}


def test_pending_copy_with_a_delivered_twin_is_left_on_the_server(
    dovecot: Dovecot, mail_users: MailUsers, popa3d: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    """A crash left the second copy "pending" while the first is delivered: the recovery lookup would find
    the first copy's delivery either way, so it cannot tell. The copy is quarantined (left on the server)
    and reported once; neither delivered again nor recorded as delivered."""
    account, engine = account_of(make_sync, popa3d, retention="keep")
    assert engine.poll(account).delivered == 3
    ledger: Ledger = engine.ledger
    with ledger.engine.begin() as connection:
        changed = connection.exec_driver_sql(
            "UPDATE messages SET state = 'pending', delivered_at = NULL WHERE uidl LIKE '% #2'"
        ).rowcount
    assert changed == 1
    second = engine.poll(account)
    assert (second.delivered, second.recovered, second.quarantined) == (0, 0, 1), second
    assert any("identical copy" in problem for problem in second.problems), second.problems
    third = engine.poll(account)
    assert clean(third) and (third.delivered, third.quarantined) == (0, 0), third
    assert len(popa3d.messages) == 3
    assert delivered(dovecot, mail_users) == {canonical(TWIN): 2, canonical(OTHER): 1}


def test_copies_that_differ_in_size_are_reported_once(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    """One UIDL, the same headers, different sizes: a buggy server; nothing tells which is which."""
    longer = TWIN + b"A longer body.\r\n"
    with popa3d_like(
        [StoredMessage("same", TWIN), StoredMessage("same", longer), popa3d_message(OTHER)]
    ) as server:
        config, engine = make_sync(account=scripted(server))
        account = config.accounts[0]
        first = engine.poll(account)
        assert first.status == "ok" and first.delivered == 1 and first.unidentified == 2, first
        assert any("listed more than once" in problem for problem in first.problems), first.problems
        second = engine.poll(account)
        assert clean(second) and second.delivered == 0 and second.unidentified == 2, second
        assert len(server.messages) == 2
    text = status_text(status_records(config.accounts, engine.ledger.statuses()))
    assert "nothing tells them apart" in text
