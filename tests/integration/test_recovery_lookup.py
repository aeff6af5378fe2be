"""Crash recovery against destinations that do not store what they are given, and lookups that fail.

Issue 12.1: pymap (it drops the last line break of a message without body, so RFC822.SIZE and SHA-256
differ) and a proxy in front of Dovecot that puts a header of its own first in every stored message; an
APPEND whose answer is lost (the server stored the message, the connection dropped) must be found by the
next poll, for single APPENDs and MULTIAPPEND batches: zero duplicates, zero losses.
Issue 12.3: a lookup the destination does not answer (NO/BAD to EXAMINE, SEARCH, FETCH; an EWS FindItem
error) stops the poll as destination trouble: the account backs off, no attempt is counted, the message
stays pending and is not delivered again.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from connector.config import Account
from connector.destinations.imap import ImapSession, open_imap
from connector.ledger.records import MessageState
from connector.message import FetchedMessage, MessageSpool, fallback_message_id, stamp_key
from connector.poll.engine import SyncEngine
from tests.configs import EWS_MAILBOX, EWS_SERVICE, EWS_SERVICE_PASSWORD, ews_destination
from tests.delivery import assert_exactly_once, without_stamp
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.ews import EwsServer
from tests.servers.imap_rewriter import ImapRewriter
from tests.servers.pymap import Pymap

pytestmark = pytest.mark.integration

PROXY_HEADER = b"X-Archived-By: rewriting test proxy\r\n"
_MESSAGE_ID_RE = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def header_only(n: int) -> bytes:
    """A message that is all header (no blank line, no body): pymap stores it without its last CRLF."""
    return simple(n).split(b"\r\n\r\n", 1)[0] + b"\r\n"


def mixed(count: int) -> list[bytes]:
    """Messages pymap changes and ones it keeps, one without Message-ID (the connector adds one)."""
    return [header_only(n) if n % 2 == 0 else simple(n, size=3_000, message_id=n != 3) for n in range(count)]


def message_ids(stored: list[bytes]) -> Counter[bytes]:
    counts: Counter[bytes] = Counter()
    for data in stored:
        match = _MESSAGE_ID_RE.search(data)
        assert match is not None, data[:300]
        counts[match.group(1)] += 1
    return counts


def assert_each_once(originals: list[bytes], stored: list[bytes]) -> None:
    """Every original in the destination exactly once, by Message-ID (pymap changed the bytes); the one
    without Message-ID has the connector's."""
    counts = message_ids(stored)
    assert all(n == 1 for n in counts.values()), f"delivered more than once: {counts}"
    own = [m for m in originals if _MESSAGE_ID_RE.search(m)]
    assert {_MESSAGE_ID_RE.search(m).group(1) for m in own} <= set(counts)  # type: ignore[union-attr]
    assert len(stored) == len(originals), f"{len(stored)} stored for {len(originals)} messages"


def poll_until_done(engine: SyncEngine, account: Account, limit: int = 30) -> list[Any]:
    results = []
    for _ in range(limit):
        result = engine.poll(account)
        results.append(result)
        if result.status == "ok" and result.delivered == 0 and result.recovered == 0:
            return results
    raise AssertionError(f"not done after {limit} polls: {[(r.status, r.error) for r in results]}")


def fetched(raw: bytes, uidl: str, account: str = "acct") -> FetchedMessage:
    spool = MessageSpool(
        uidl,
        fallback_message_id(account, "pop.example", "alice", uidl),
        stamp_key=stamp_key(account, "pop.example", "alice"),
    )
    spool.write(raw)
    return spool.finish()


@contextmanager
def pymap_session(pymap: Pymap, folder: str = "INBOX") -> Iterator[ImapSession]:
    session = open_imap(
        host=pymap.host, port=pymap.port, tls="none", ssl_context=None, timeout=20.0,
        username=pymap.user, password=pymap.password, folder=folder, mark_seen=False,
    )  # fmt: skip
    with session:
        yield session


def pymap_destination(pymap: Pymap, port: int | None = None, **extra: Any) -> dict[str, Any]:
    login = {"username": pymap.user, "password": pymap.password}
    return {"host": pymap.host, "port": port or pymap.port, **login, **extra}


# --- 12.1: pymap --------------------------------------------------------------------------------------------


def test_pymap_stores_other_bytes_and_find_still_finds_each_message(pymap: Pymap) -> None:
    raws = [header_only(1), simple(2), b"Subject: no id\r\n"]
    # Two different messages with one Message-ID and the same dates (so the same INTERNALDATE).
    twin_a, twin_b = simple(7), simple(7).replace(b"Subject: test message 7", b"Subject: test message 7 (v2)")
    with pymap_session(pymap) as session:
        messages = [fetched(raw, f"U{n}") for n, raw in enumerate([*raws, twin_a])]
        references = [session.deliver(message) for message in messages]
        stored = pymap.stored()
        assert stored[0] != messages[0].read_bytes()  # pymap rewrote it: size and hash differ
        assert len(stored[0]) != messages[0].size
    other = fetched(twin_b, "U9")
    messages.append(other)
    with pymap_session(pymap) as session:
        assert session.find(other) is None  # same Message-ID, same INTERNALDATE: not ours
        assert [session.find(message) for message in messages[:-1]] == references
        other_reference = session.deliver(other)
    with pymap_session(pymap) as session:
        assert session.find(other) == other_reference
        assert session.find(messages[-2]) == references[-1]
    for message in messages:
        message.close()


def test_pymap_without_namespace_gets_nested_folders_and_lookups(pymap: Pymap) -> None:
    # pymap offers no NAMESPACE (and answers it BAD): the levels come from LIST's delimiter instead.
    with pymap.imap() as client:
        assert not client.has_capability("NAMESPACE")
    with fetched(header_only(1), "U1") as message:
        with pymap_session(pymap, "Imported/Hosted") as session:
            reference = session.deliver(message)
            assert session.mailbox == "Imported/Hosted"
        with pymap_session(pymap, "Imported/Hosted") as session:
            assert session.find(message) == reference
    assert len(pymap.stored("Imported/Hosted")) == 1


@pytest.mark.parametrize("multiappend", [False, True], ids=["append", "multiappend"])
def test_lost_append_answers_on_pymap_are_found_not_repeated(
    pymap: Pymap, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, multiappend: bool
) -> None:
    messages = mixed(12)
    dovecot.seed(mail_users.source.name, messages)
    with ImapRewriter(pymap.host, pymap.port) as proxy:
        # The answer of every third APPEND (MULTIAPPEND: every third batch), from the first, never arrives.
        proxy.lose_append_answers = set(range(1, 40, 3))
        config, engine = make_sync(destination=pymap_destination(pymap, proxy.port, multiappend=multiappend))
        results = poll_until_done(engine, config.accounts[0])
    assert any(r.status == "error" for r in results), "no answer was lost"
    assert sum(r.recovered for r in results) >= 1
    stored = pymap.stored()
    assert [without_stamp(s) for s in stored] != [m for m in messages]  # pymap changed what it stored
    assert_each_once(messages, stored)
    assert dovecot.maildir_count(mail_users.source.name) == 0


# --- 12.1: a proxy in front of Dovecot that adds a header ---------------------------------------------------


def unwrapped(stored: bytes) -> bytes:
    """A message stored through the rewriting proxy, without the proxy's header and the connector's stamp."""
    assert stored.startswith(PROXY_HEADER), stored[:100]
    return without_stamp(stored[len(PROXY_HEADER) :])


@pytest.mark.parametrize("multiappend", [False, True], ids=["append", "multiappend"])
def test_lost_append_answers_through_a_rewriting_proxy_are_found_not_repeated(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, multiappend: bool
) -> None:
    messages = [simple(n, size=2_000, message_id=n != 4) for n in range(20)]
    dovecot.seed(mail_users.source.name, messages)
    with ImapRewriter(dovecot.host, dovecot.ports.imap, add_header=PROXY_HEADER) as proxy:
        proxy.lose_append_answers = set(range(2, 60, 3))
        config, engine = make_sync(destination={"port": proxy.port, "multiappend": multiappend})
        results = poll_until_done(engine, config.accounts[0])
    assert sum(r.recovered for r in results) >= 3, [(r.status, r.recovered) for r in results]
    stored = [m.stored for m in dovecot.imap_fetch(mail_users.destination.name)]
    assert_exactly_once(messages, [unwrapped(s) for s in stored])
    assert dovecot.maildir_count(mail_users.source.name) == 0


# --- 12.3: a lookup that cannot answer stops the poll -------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        ("LIST", "NO"),
        ("EXAMINE", "NO"),
        ("EXAMINE", "BAD"),
        ("SEARCH", "NO"),
        ("SEARCH", "BAD"),
        ("FETCH", "NO"),
    ],
)
def test_a_refused_lookup_stops_the_poll_and_delivers_nothing(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, command: str, answer: str
) -> None:
    messages = [simple(n) for n in range(3)]
    dovecot.seed(mail_users.source.name, messages)
    destination = mail_users.destination.name
    with ImapRewriter(dovecot.host, dovecot.ports.imap) as proxy:
        proxy.lose_append_answers = {2}  # message 1 is stored, its answer lost: pending
        config, engine = make_sync(destination={"port": proxy.port, "multiappend": False})
        account = config.accounts[0]
        first = engine.poll(account)
        # The lost answer drops the connection; the poll goes on with a new one (issue 12.6).
        assert (first.status, first.delivered) == ("error", 2), first
        account_id = engine.ledger.account_id(account.name) or 0
        before = engine.ledger.known_messages(account_id)
        pending = [row for row in before.values() if row.state is MessageState.PENDING]
        assert len(pending) == 1
        assert len(dovecot.imap_messages(destination)) == 3

        proxy.refuse = {command: answer}
        second = engine.poll(account)
        assert command in proxy.refused, "the lookup never asked"
        assert (second.status, second.delivered, second.recovered) == ("error", 0, 0), second
        assert second.error is not None and "not delivered again now" in second.error
        assert engine.ledger.consecutive_failures(account_id) == 2  # backs off as for destination trouble
        after = engine.ledger.known_messages(account_id)
        (row,) = (after[p.uidl] for p in pending)
        assert (row.state, row.attempts) == (MessageState.PENDING, pending[0].attempts)  # no attempt counted
        assert len(dovecot.imap_messages(destination)) == 3  # nothing delivered, nothing twice

        proxy.refuse = {}
        third = engine.poll(account)
    assert (third.status, third.recovered, third.delivered) == ("ok", 1, 0), third
    assert_exactly_once(messages, dovecot.imap_messages(destination))
    assert dovecot.maildir_count(mail_users.source.name) == 0


@pytest.mark.parametrize("code", ["ErrorInvalidRestriction", "ErrorMailboxStoreUnavailable"])
def test_an_ews_finditem_error_stops_the_poll_and_delivers_nothing(
    ews: EwsServer, dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, code: str
) -> None:
    ews.add_user(EWS_SERVICE, EWS_SERVICE_PASSWORD, impersonation=True)
    ews.add_mailbox(EWS_MAILBOX)
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"mailbox": EWS_MAILBOX}, destination=ews_destination(ews))
    account = config.accounts[0]
    ews.fail("CreateItem", "drop_after")  # created; the answer never arrives
    first = engine.poll(account)
    assert (first.status, len(ews.items(EWS_MAILBOX))) == ("error", 1), first
    account_id = engine.ledger.account_id(account.name) or 0
    (row,) = engine.ledger.known_messages(account_id).values()
    assert row.state is MessageState.PENDING

    ews.fail("FindItem", "error", code=code, text="The restriction cannot be evaluated.")
    ews.requests.clear()
    second = engine.poll(account)
    assert "FindItem" in ews.ops() and "CreateItem" not in ews.ops()
    assert (second.status, second.delivered, second.recovered) == ("error", 0, 0), second
    assert len(ews.items(EWS_MAILBOX)) == 1
    (after,) = engine.ledger.known_messages(account_id).values()
    assert (after.state, after.attempts) == (MessageState.PENDING, row.attempts)
    assert engine.ledger.consecutive_failures(account_id) == 2

    third = engine.poll(account)
    assert (third.status, third.recovered, third.delivered) == ("ok", 1, 0), third
    assert len(ews.items(EWS_MAILBOX)) == 1


# --- the rule against Dovecot, which keeps bytes ------------------------------------------------------------


@contextmanager
def dovecot_session(dovecot: Dovecot, mail_users: MailUsers) -> Iterator[ImapSession]:
    user = mail_users.destination
    session = open_imap(
        host=dovecot.host, port=dovecot.ports.imap, tls="none", ssl_context=None, timeout=20.0,
        username=user.name, password=user.password, folder="INBOX", mark_seen=False,
    )  # fmt: skip
    with session:
        yield session


def test_a_copy_delivered_before_stamps_existed_is_found_by_its_bytes(
    dovecot: Dovecot, mail_users: MailUsers
) -> None:
    # Pending after a crash of the previous version, looked for by this one after the upgrade.
    raw = simple(1)
    old = MessageSpool("U1", fallback_message_id("acct", "pop.example", "alice", "U1"))
    old.write(raw)
    with old.finish() as unstamped, fetched(raw, "U1") as stamped:
        assert unstamped.stamp is None and stamped.stamp is not None
        with dovecot_session(dovecot, mail_users) as session:
            reference = session.deliver(unstamped)
        with dovecot_session(dovecot, mail_users) as session:
            assert session.find(stamped) == reference
    changed = simple(1).replace(b"Body of", b"Text of")
    with fetched(changed, "U1") as other, dovecot_session(dovecot, mail_users) as session:
        assert session.find(other) is None  # same Message-ID and size, other bytes


def test_the_same_message_delivered_for_another_account_is_not_taken_for_ours(
    dovecot: Dovecot, mail_users: MailUsers
) -> None:
    raw = simple(1)
    with fetched(raw, "U1", account="bob") as bobs, fetched(raw, "U1", account="alice") as alices:
        with dovecot_session(dovecot, mail_users) as session:
            session.deliver(bobs)
        with dovecot_session(dovecot, mail_users) as session:
            assert session.find(alices) is None
            reference = session.deliver(alices)
        with dovecot_session(dovecot, mail_users) as session:
            assert session.find(alices) == reference
