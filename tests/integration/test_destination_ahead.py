"""The account's destination is opened while the first message is fetched (``DestinationPool.open_ahead``),
not after: its connect and login overlap the source's RETR. Real Dovecot IMAP as the destination, the
scripted POP3 server as the source (its RETR hook waits to see the destination being opened)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from connector.config import Account, Destination
from connector.connections import Connections, open_destination
from connector.destinations.base import DestinationSession
from connector.poll.engine import SyncEngine
from tests.integration.conftest import SyncFactory, scripted
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import CloseConnection, Pop3Session, ScriptedPop3Server

pytestmark = pytest.mark.integration


def _engine(make_sync: SyncFactory, pop3: ScriptedPop3Server) -> tuple[Account, SyncEngine]:
    config, engine = make_sync(account=scripted(pop3, retention="keep"))
    return config.accounts[0], engine


def test_the_destination_is_opened_while_the_first_message_is_fetched(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    opening = threading.Event()
    answered: list[bool] = []

    def retr_once_opening(session: Pop3Session, argument: str) -> None:
        # The first RETR is answered once the destination is being opened (10 s at most): opened after
        # the first message, it would only start once this reply had come.
        answered.append(answered[0] if answered else opening.wait(10))
        session.default("RETR", argument)

    def opened(destination: Destination, account: Account) -> DestinationSession:
        opening.set()
        return open_destination(destination, account)

    pop3.on("RETR", retr_once_opening)
    account, engine = _engine(make_sync, pop3)
    engine.connections = replace(Connections(), open_destination=opened)
    result = engine.poll(account)
    assert (result.status, result.delivered) == ("ok", 3), result
    assert answered and answered[0], "the destination was opened only after the first RETR's reply"
    assert len(dovecot.imap_fetch(mail_users.destination.name)) == 3


def test_a_poll_that_fails_before_delivering_does_not_wait_for_the_destination(
    dovecot: Dovecot, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    """The source drops the connection at the first RETR while the destination is still logging in: the
    poll ends at once (it does not wait for the destination's timeout), and the session opened after that
    is logged out, not left open."""
    release, closed = threading.Event(), threading.Event()
    # True: released by the test once the poll had ended; False: the poll waited out the 10 s.
    released: list[bool] = []

    class Watched:
        def __init__(self, session: DestinationSession) -> None:
            self._session = session

        def close(self) -> None:
            closed.set()
            self._session.close()

    def slow_open(destination: Destination, account: Account) -> DestinationSession:
        released.append(release.wait(10))
        return Watched(open_destination(destination, account))  # type: ignore[return-value]

    def drop(_session: Pop3Session, _argument: str) -> None:
        raise CloseConnection

    pop3.on("RETR", drop)
    account, engine = _engine(make_sync, pop3)
    engine.connections = replace(Connections(), open_destination=slow_open)
    result = engine.poll(account)
    release.set()
    assert result.status == "error" and result.delivered == 0, result
    assert closed.wait(10), "the session opened ahead was never closed"
    assert released == [True], "the poll waited for the destination to open"
