"""What the POP3 server's sizes are trusted for (issue 11, cases 2 and 8), against the real Dovecot as the
destination (and as the source where it can play the part), the scripted POP3 server playing the
misbehaving one: a RETR far shorter than its LIST size, an absurd LIST size, a reply past the hard
ceiling, a spool directory without room for the next message."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine

from connector.ledger.database import open_database
from connector.ledger.records import KnownMessage, MessageState
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from tests.integration.conftest import SyncFactory, scripted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import Pop3Session, ScriptedPop3Server, StoredMessage, dot_stuffed

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
# What a store hiccup served for a 20 KB message: a few header lines, no body (about 60 bytes).
HICCUP = [b"Subject: test message 2", b"Message-ID: <msg2@example.net>", b""]
HICCUP_BYTES = sum(len(line) + 2 for line in HICCUP)


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def ledger_of(engine: SyncEngine) -> Ledger:
    return engine.ledger


def row(engine: SyncEngine, account: str, uidl: str) -> KnownMessage | None:
    ledger = ledger_of(engine)
    return ledger.known_messages(ledger.account_id(account) or 0).get(uidl)


def serve_short(uidl: str, lines: list[bytes], *, times: int | None = None) -> Any:
    """A RETR hook: message ``uidl`` (whatever its number in the session) is answered with ``lines``, the
    first ``times`` times or always; every other message normally."""
    served = 0

    def hook(session: Pop3Session, argument: str) -> None:
        nonlocal served
        found = session.message(argument)
        if found is None:
            return  # answered -ERR already
        if found[1].uidl == uidl and (times is None or served < times):
            served += 1
            session.send_raw(b"+OK\r\n" + dot_stuffed(lines))
            return
        session.default("RETR", argument)

    return hook


def three(big: bytes) -> list[StoredMessage]:
    return [StoredMessage("a", simple(1)), StoredMessage("short", big), StoredMessage("c", simple(3))]


# --- 11.2: a RETR far shorter than its LIST size --------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
def test_retr_far_shorter_than_list_is_never_delivered_nor_deleted(
    pipelining: bool, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    # LIST says 20 KB, RETR sends 60 bytes. Delivered as if it were the message, the truncated copy would be
    # recorded "delivered" and the original DELEted: the real message lost for good.
    big = simple(2, size=20_000)
    with ScriptedPop3Server(three(big), pipelining=pipelining) as server:
        server.on("RETR", serve_short("short", HICCUP))
        config, engine = make_sync(account=scripted(server, retry={"max_attempts": 2}))
        account = config.accounts[0]
        listed = server.messages[1].size

        first = engine.poll(account)
        assert [m.uidl for m in server.messages] == ["short"]  # left on the server
        assert dovecot.imap_messages(mail_users.destination.name) == [simple(1), simple(3)]
        assert (first.status, first.delivered, first.failed, first.short_retrs) == ("ok", 2, 1, 1), first
        assert first.quarantined == 0 and first.deleted == 2
        (problem,) = first.problems
        assert "'short'" in problem and f"LIST gives {listed} bytes" in problem and "RETR returned" in problem
        pending = row(engine, account.name, "short")
        assert pending is not None and (pending.state, pending.attempts) == (MessageState.PENDING, 1)

        second = engine.poll(account)  # the hiccup persists: out of attempts, quarantined
        assert (second.status, second.delivered, second.quarantined, second.short_retrs) == ("ok", 0, 1, 1)
        assert [m.uidl for m in server.messages] == ["short"]

        third = engine.poll(account)  # left alone now, still on the server
        assert (third.delivered, third.failed, third.deleted) == (0, 0, 0)
        assert [m.uidl for m in server.messages] == ["short"]
    (quarantined,) = ledger_of(engine).quarantine.messages(account.name)
    assert quarantined.uidl == "short" and quarantined.attempts == 2 and quarantined.pop_size == listed
    assert f"RETR returned {HICCUP_BYTES} bytes but LIST gives {listed} bytes" in (
        quarantined.last_error or ""
    )
    assert sorted(dovecot.imap_messages(mail_users.destination.name)) == sorted([simple(1), simple(3)])


def test_short_retr_that_heals_is_delivered_whole_at_the_next_poll(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    big = simple(2, size=20_000)
    with ScriptedPop3Server(three(big)) as server:
        server.on("RETR", serve_short("short", [], times=1))  # an empty body, once
        config, engine = make_sync(account=scripted(server))
        account = config.accounts[0]
        first = engine.poll(account)
        assert [m.uidl for m in server.messages] == ["short"]
        assert (first.delivered, first.failed, first.short_retrs) == (2, 1, 1)
        second = engine.poll(account)
        assert (second.status, second.delivered, second.failed, second.deleted) == ("ok", 1, 0, 1), second
        assert server.messages == []
    delivered = row(engine, account.name, "short")
    assert delivered is not None and delivered.state is MessageState.DELETED
    messages = dovecot.imap_messages(mail_users.destination.name)
    assert sorted(messages) == sorted([simple(1), big, simple(3)])  # whole, once


def test_short_retr_from_an_expire_0_server_ends_the_session_without_quit(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    # EXPIRE 0: the server deletes whatever was retrieved at QUIT, the short-served message too.
    big = simple(2, size=20_000)
    with ScriptedPop3Server(three(big), capabilities=["TOP", "UIDL", "USER", "EXPIRE 0"]) as server:
        server.on("RETR", serve_short("short", HICCUP))
        config, engine = make_sync(account=scripted(server))
        first = engine.poll(config.accounts[0])
        assert "QUIT" not in server.recorded.commands and server.recorded.deleted == []
        assert len(server.messages) == 3
        assert (first.delivered, first.failed, first.short_retrs) == (2, 1, 1)
        assert any("EXPIRE 0" in problem for problem in first.problems)


@dataclass
class Listed(StoredMessage):
    """A message whose LIST size is ``listed``, whatever its content."""

    listed: int = 0

    @property
    def size(self) -> int:
        return self.listed


@pytest.mark.parametrize(
    ("listed", "served"),
    [(20_000, 11_000), (20_000, 20_100)],
    ids=["list-an-estimate", "x-uidl-added"],
)
def test_list_sizes_a_little_off_are_delivered_as_served(
    listed: int, served: int, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    # Exchange estimates LIST sizes; GNU Mailutils adds an X-UIDL: header it did not count.
    message = simple(2, size=served)
    with ScriptedPop3Server([Listed("m", message, listed=listed)]) as server:
        config, engine = make_sync(account=scripted(server))
        result = engine.poll(config.accounts[0])
        assert (result.status, result.delivered, result.deleted, result.problems) == ("ok", 1, 1, [])
    assert dovecot.imap_messages(mail_users.destination.name) == [message]


# --- 11.8: the hard size ceiling ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [None, "25MB"], ids=["uidl-listing", "with-max-message-size"])
def test_absurd_list_size_is_quarantined_without_being_fetched(
    limit: str | None, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    # 18 digits: the RETR bound (2 x LIST + 16 MiB) would be no bound at all, on disk then in memory.
    messages = [StoredMessage("a", simple(1)), Listed("absurd", simple(2), listed=10**18 - 1)]
    messages.append(StoredMessage("c", simple(3)))
    extra = {"max_message_size": limit} if limit else {}
    with ScriptedPop3Server(messages) as server:
        config, engine = make_sync(account=scripted(server, **extra))
        account = config.accounts[0]
        result = engine.poll(account)
        assert (result.status, result.delivered, result.quarantined, result.deleted) == ("ok", 2, 1, 2)
        assert "RETR 2" not in server.recorded.commands  # never asked for
        assert [m.uidl for m in server.messages] == ["absurd"]
        again = engine.poll(account)
        assert (again.delivered, again.quarantined, again.problems) == (0, 0, [])
    (quarantined,) = ledger_of(engine).quarantine.messages(account.name)
    assert quarantined.pop_size == 10**18 - 1 and quarantined.size is None
    assert "over message_size_ceiling (209715200); not downloaded" in (quarantined.last_error or "")
    assert sorted(dovecot.imap_messages(mail_users.destination.name)) == sorted([simple(1), simple(3)])


def test_message_over_a_configured_ceiling_stays_on_dovecot(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1), simple(2, size=100_000), simple(3)])
    config, engine = make_sync(account={"message_size_ceiling": "64KB"})
    account = config.accounts[0]
    result = engine.poll(account)
    assert (result.delivered, result.quarantined, result.deleted) == (2, 1, 2)
    assert any("over message_size_ceiling (65536)" in problem for problem in result.problems)
    assert dovecot.maildir_count(mail_users.source.name) == 1
    assert sorted(dovecot.imap_messages(mail_users.destination.name)) == sorted([simple(1), simple(3)])


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
def test_reply_past_the_ceiling_is_cut_off_and_quarantined(
    pipelining: bool, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    # LIST says 10 KB, RETR runs on to 200 KB: under the usual bound (2 x LIST + 16 MiB), over the ceiling.
    runaway = simple(2, size=200_000)
    messages = [StoredMessage("a", simple(1)), Listed("runaway", runaway, listed=10_000)]
    messages.append(StoredMessage("c", simple(3)))
    with ScriptedPop3Server(messages, pipelining=pipelining) as server:
        config, engine = make_sync(account=scripted(server, message_size_ceiling="64KB"))
        account = config.accounts[0]
        first = engine.poll(account)
        assert first.status == "error" and first.quarantined == 1, first
        assert "longer than 65536 bytes (message_size_ceiling is 65536 bytes)" in (first.error or "")
        second = engine.poll(account)
        assert second.status == "ok", second
        assert [m.uidl for m in server.messages] == ["runaway"]  # left on the server
    (quarantined,) = ledger_of(engine).quarantine.messages(account.name)
    assert "message_size_ceiling is 65536 bytes" in (quarantined.last_error or "")
    assert sorted(dovecot.imap_messages(mail_users.destination.name)) == sorted([simple(1), simple(3)])


# --- 11.8: the spool's free space -----------------------------------------------------------------------


def free_bytes(free: int) -> Any:
    """``shutil.disk_usage`` as if the disk had only ``free`` bytes left."""
    real = shutil.disk_usage
    return lambda path: real(path)._replace(free=free)


@pytest.mark.parametrize(
    "capabilities",
    [None, ["TOP", "UIDL", "USER", "PIPELINING"], ["TOP", "UIDL", "USER", "EXPIRE 0"]],
    ids=["one-by-one", "pipelined", "fetch-then-deliver"],
)
def test_spool_without_room_stops_the_poll_before_fetching(
    capabilities: list[str] | None,
    dovecot: Dovecot,
    mail_users: MailUsers,
    make_sync: SyncFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = simple(2, size=2 * MIB)
    written: list[int] = []
    real_usage = shutil.disk_usage
    # Under 2 MiB + the margin. (raising=False: the code before this fix had no such check to inject into.)
    monkeypatch.setattr("connector.poll.fetch.disk_usage", free_bytes(32 * MIB), raising=False)
    with ScriptedPop3Server(three(big), capabilities=capabilities) as server:
        config, engine = make_sync(account=scripted(server))
        account = config.accounts[0]
        first = engine.poll(account)
        assert first.status == "error" and first.delivered == 1, first
        assert "spool directory" in (first.error or "") and "'short'" in (first.error or "")
        assert f"has {32 * MIB} bytes free" in (first.error or "")
        assert row(engine, account.name, "short") is None  # no attempt counted: not the message's fault
        assert row(engine, account.name, "c") is None  # nothing fetched after it
        assert [m.uidl for m in server.messages] == ["short", "c"]

        monkeypatch.setattr(
            "connector.poll.fetch.disk_usage", lambda path: written.append(1) or real_usage(path)
        )
        second = engine.poll(account)
        assert (second.status, second.delivered) == ("ok", 2), second
        assert written  # the check ran, against the real disk this time
        assert server.messages == []
    short = row(engine, account.name, "short")
    assert short is not None and short.attempts == 1
    assert sorted(dovecot.imap_messages(mail_users.destination.name)) == sorted([simple(1), big, simple(3)])


# --- the ledger's part, on both backends ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    url = str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))
    engine: Engine = open_database(url)
    yield Ledger(engine)
    engine.dispose()


def test_fetch_failures_count_until_quarantine_and_keep_an_earlier_attempt(ledger: Ledger) -> None:
    account = ledger.account_id("fetch-failures")
    assert account is not None
    state = ledger.record_fetch_failure(account, "new", 20_000, "short", max_attempts=2)
    assert state is MessageState.PENDING
    assert ledger.record_fetch_failure(account, "new", 20_000, "short again", max_attempts=2) is (
        MessageState.FAILED
    )
    (quarantined,) = ledger.quarantine.messages("fetch-failures")
    assert (quarantined.uidl, quarantined.attempts, quarantined.pop_size) == ("new", 2, 20_000)
    assert quarantined.last_error == "short again"
    # A message whose earlier attempt may have reached the destination keeps what that attempt recorded.
    ledger.record_pending(account, "tried", pop_size=20_000, size=20_010, message_id="<t@x>", sha256="a" * 64)
    assert ledger.record_fetch_failure(account, "tried", 20_000, "short", max_attempts=5) is (
        MessageState.PENDING
    )
    tried = ledger.known_messages(account)["tried"]
    assert (tried.attempts, tried.message_id, tried.sha256, tried.size) == (2, "<t@x>", "a" * 64, 20_010)
