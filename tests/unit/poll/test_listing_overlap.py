"""Issue 16: a poll reads the ledger while the POP3 server prepares the listing. The real POP3 client against
the scripted server, the fake destination, a ledger that notes when the poll reads it."""

from __future__ import annotations

import threading
from datetime import datetime

from connector.config import Account
from connector.connections import Connections
from connector.ledger.database import open_database
from connector.ledger.records import KnownMessages, MessageState
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from connector.pop3 import Pop3Client, connect_pop3
from tests.messages import simple
from tests.servers.scripted_pop3 import Pop3Session, ScriptedPop3Server, StoredMessage
from tests.unit.poll.conftest import Rig, RigFactory
from tests.waiting import wait_until

# Only reached when the order is wrong (the test then fails); never a measure of speed.
PATIENCE = 5.0


class NotingLedger(Ledger):
    """A ledger that, once ``watch`` is set, waits (briefly) for the server to have received UIDL before
    reading what the poll plans with, and notes the read in ``events``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.events: list[str] = []
        self.watch = False
        self.uidl_received = threading.Event()
        self.read_done = threading.Event()

    def known_to_plan(self, account_id: int, deletable_until: datetime | None) -> KnownMessages:
        if self.watch:
            self.uidl_received.wait(PATIENCE)
        known = super().known_to_plan(account_id, deletable_until)
        if self.watch:
            self.events.append("ledger read")
            self.read_done.set()
        return known


def test_the_ledger_is_read_between_sending_uidl_and_reading_its_reply(make_rig: RigFactory) -> None:
    rig = make_rig(0, account={"retention": "keep"})
    database = rig.config.service.database
    assert database is not None
    ledger = NotingLedger(open_database(database, migrate=False), clock=rig.clock)
    messages = [StoredMessage(f"uid-{n}", simple(n)) for n in range(1, 4)]

    def on_uidl(session: Pop3Session, argument: str) -> None:
        ledger.events.append("server has UIDL")
        ledger.uidl_received.set()
        # The reply is held back until the poll has read the ledger (or would never read it first).
        ledger.read_done.wait(PATIENCE)
        ledger.events.append("server answers UIDL")
        session.default("UIDL", argument)

    with ScriptedPop3Server(messages, pipelining=True) as server:
        engine = SyncEngine(rig.config, ledger, _connections_to(server, rig), clock=rig.clock)
        first = engine.poll(rig.account)
        assert (first.status, first.delivered) == ("ok", 3), first
        server.messages.append(StoredMessage("uid-4", simple(4)))
        server.on("UIDL", on_uidl)
        ledger.watch = True
        second = engine.poll(rig.account)
        # Nothing was deleted, so the poll did not wait for QUIT's reply: the server may still be reading it.
        wait_until(lambda: server.recorded.commands[-1:] == ["QUIT"], "the server to receive QUIT")
    assert (second.status, second.delivered, second.deleted) == ("ok", 1, 0), second
    assert ledger.events == ["server has UIDL", "ledger read", "server answers UIDL"]
    # The same listing as before: UIDL alone, then the size of the one message to fetch.
    assert server.recorded.commands[-4:] == ["UIDL", "LIST 4", "RETR 4", "QUIT"]
    assert [message.uidl for message in rig.destination.stored] == [f"uid-{n}" for n in range(1, 5)]


def test_a_session_that_deleted_nothing_does_not_wait_for_quits_reply(make_rig: RigFactory) -> None:
    """With no DELE sent, nothing depends on QUIT's reply (a server with a big maildrop takes long to give
    it): the poll sends QUIT and ends, its deliveries and result committed, while the server answers."""
    rig = make_rig(0, account={"retention": "keep"})
    messages = [StoredMessage(f"uid-{n}", simple(n)) for n in range(1, 3)]
    poll_ended = threading.Event()
    # Whether the poll had ended when the server answered QUIT (it could not have, had it waited).
    answered_after_the_poll: list[bool] = []

    def on_quit(session: Pop3Session, argument: str) -> None:
        answered_after_the_poll.append(poll_ended.wait(PATIENCE))
        session.default("QUIT", argument)

    with ScriptedPop3Server(messages, pipelining=True) as server:
        connections = _connections_to(server, rig)
        server.on("QUIT", on_quit)
        result = SyncEngine(rig.config, rig.ledger, connections, clock=rig.clock).poll(rig.account)
        poll_ended.set()
        wait_until(lambda: answered_after_the_poll, "the server to answer QUIT")
    assert answered_after_the_poll == [True]
    assert (result.status, result.delivered, result.deleted) == ("ok", 2, 0), result
    assert server.recorded.commands[-1] == "QUIT" and server.recorded.deleted == []
    assert rig.states() == {"uid-1": MessageState.DELIVERED, "uid-2": MessageState.DELIVERED}
    status = rig.status()
    assert (status.last_result, status.last_delivered) == ("ok", 2)
    assert [message.uidl for message in rig.destination.stored] == ["uid-1", "uid-2"]


def _connections_to(server: ScriptedPop3Server, rig: Rig) -> Connections:
    """The rig's fake destinations, with the POP3 source a real session with ``server``."""

    def open_source(_account: Account) -> Pop3Client:
        client = connect_pop3(server.host, server.port, tls="none", ssl_context=None, timeout=PATIENCE)
        client.login(server.username, server.password)
        return client

    fakes = rig.engine().connections
    return Connections(open_source, fakes.open_destination, fakes.open_recipient)
