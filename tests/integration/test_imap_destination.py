"""The IMAP destination against the real Dovecot (and, for what Dovecot never does, a scripted socket)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import ssl
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest

from connector.destinations.imap import ImapSession, Where, command_refused, open_imap
from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationError,
    DestinationFullError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTLSError,
    DestinationTooLargeError,
)
from connector.message import FetchedMessage, MessageSpool, fallback_message_id
from connector.tls import TlsMode, make_ssl_context
from tests.servers.dovecot import Dovecot, MailUser, MailUsers

pytestmark = pytest.mark.integration

RECEIVED = datetime(2025, 6, 3, 8, 15, 5, tzinfo=UTC)
REFERENCE_RE = re.compile(r"^imap:(?P<folder>[^;]+);UIDVALIDITY=(?P<validity>\d+);UID=(?P<uid>\d+)$")

Opener = Callable[..., ImapSession]


def raw_message(n: int = 1, *, body: str = "Hello", message_id: str | None = None) -> bytes:
    message_id = message_id or f"<dest-{n}@hosted.example>"
    return (
        f"Received: from mx.example by pop.hosted.example; Tue, 03 Jun 2025 08:15:05 +0000\r\n"
        f"From: Sender <sender@example.com>\r\nTo: alice@hosted.example\r\nSubject: test {n}\r\n"
        f"Date: Tue, 03 Jun 2025 07:58:00 +0000\r\nMessage-ID: {message_id}\r\n\r\n{body}\r\n"
    ).encode()


def fetched(raw: bytes, uidl: str = "UIDL1") -> FetchedMessage:
    spool = MessageSpool(uidl, fallback_message_id("acct", "pop.example", "alice", uidl))
    spool.write(raw)
    return spool.finish()


def large_message(size: int) -> bytes:
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
    header = raw_message(99, body="")[:-2]
    return header + line * ((size - len(header)) // len(line) + 1)


@pytest.fixture
def open_destination(dovecot: Dovecot, mail_users: MailUsers) -> Iterator[Opener]:
    """``open_destination(**overrides)``: a session on the destination user, plain IMAP, folder INBOX."""
    sessions: list[ImapSession] = []

    def factory(**overrides: Any) -> ImapSession:
        user: MailUser = overrides.pop("user", mail_users.destination)
        arguments: dict[str, Any] = {
            "host": dovecot.host,
            "port": dovecot.ports.imap,
            "tls": "none",
            "ssl_context": None,
            "timeout": 20.0,
            "username": user.name,
            "password": user.password,
            "folder": "INBOX",
            "mark_seen": False,
            **overrides,
        }
        session = open_imap(**arguments)
        sessions.append(session)
        return session

    yield factory
    for session in sessions:
        session.close()


# --- delivery ------------------------------------------------------------------------------------------


def test_deliver_creates_a_missing_nested_folder(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    raw = raw_message()
    session = open_destination(folder="Imported/Hosted")
    assert session.mailbox == "Imported.Hosted"
    with fetched(raw) as message:
        reference = session.deliver(message)
    assert {"Imported", "Imported.Hosted"} <= set(dovecot.folders(mail_users.destination.name))
    (stored,) = dovecot.imap_fetch(mail_users.destination.name, "Imported.Hosted")
    assert stored.body == raw
    assert stored.internal_date == RECEIVED
    assert stored.flags == ()
    match = REFERENCE_RE.match(reference)
    assert match is not None, reference
    assert match["folder"] == "Imported/Hosted" and int(match["uid"]) == stored.uid


def test_second_delivery_reuses_the_folder_and_references_differ(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    session = open_destination(folder="Archive")
    with fetched(raw_message(1)) as first, fetched(raw_message(2), "UIDL2") as second:
        references = [session.deliver(first), session.deliver(second)]
    assert references[0] != references[1]
    assert dovecot.imap_messages(mail_users.destination.name, "Archive") == [raw_message(1), raw_message(2)]


def test_mark_seen_sets_only_seen(dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener) -> None:
    session = open_destination(mark_seen=True)
    with fetched(raw_message()) as message:
        session.deliver(message)
    (stored,) = dovecot.imap_fetch(mail_users.destination.name)
    assert stored.flags == (b"\\Seen",)


def test_folder_that_appears_meanwhile_is_fine(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    with dovecot.imap(mail_users.destination.name) as other:
        other.create_folder("Imported")
        other.create_folder("Imported.Hosted")
    session = open_destination(folder="Imported/Hosted")
    real_exists = session._exists
    asked: set[str] = set()

    def stale_exists(mailbox: str, uidl: str | None) -> bool:
        # The first look says "missing", as if another client created it right after we listed.
        if mailbox not in asked:
            asked.add(mailbox)
            return False
        return real_exists(mailbox, uidl)

    monkeypatch.setattr(session, "_exists", stale_exists)
    with fetched(raw_message()) as message:
        session.deliver(message)
    assert len(dovecot.imap_messages(mail_users.destination.name, "Imported.Hosted")) == 1


def test_non_ascii_folder_name(dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener) -> None:
    session = open_destination(folder="Archiv/Grüße")
    with fetched(raw_message()) as message:
        session.deliver(message)
    assert "Archiv.Grüße" in dovecot.folders(mail_users.destination.name)


def test_twenty_megabytes_are_delivered_with_one_copy_in_memory(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    raw = large_message(20 * 1024 * 1024)
    session = open_destination(folder="Big")
    with fetched(raw) as message:
        assert message.size == len(raw)
        tracemalloc.start()
        try:
            reference = session.deliver(message)
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The one copy from the spool, plus small change; imaplib.append() would have needed two.
        assert peak < len(raw) * 1.25, peak
        assert session.find(message) == reference
    (stored,) = dovecot.imap_messages(mail_users.destination.name, "Big")
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(raw).hexdigest()


# --- find ------------------------------------------------------------------------------------------------


def test_find_returns_the_reference_after_delivery(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    with fetched(raw_message()) as message:
        reference = open_destination(folder="Imported/Hosted").deliver(message)
        # A new session, as after a crash between APPEND and the ledger update.
        assert open_destination(folder="Imported/Hosted").find(message) == reference
    (stored,) = dovecot.imap_fetch(mail_users.destination.name, "Imported.Hosted")
    assert stored.flags == ()  # find must not mark it read


def test_find_ignores_same_message_id_with_other_content(open_destination: Opener) -> None:
    session = open_destination()
    with fetched(raw_message(body="original")) as delivered:
        session.deliver(delivered)
    with fetched(raw_message(body="changed!")) as other:  # same size, same Message-ID
        assert other.size == delivered.size and other.message_id == delivered.message_id
        assert open_destination().find(other) is None


def test_find_picks_the_matching_copy_among_candidates(open_destination: Opener) -> None:
    session = open_destination()
    with fetched(raw_message(body="first")) as decoy, fetched(raw_message(body="second")) as wanted:
        session.deliver(decoy)
        reference = session.deliver(wanted)
        assert open_destination().find(wanted) == reference


def test_find_in_a_missing_folder_is_none(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    with fetched(raw_message()) as message:
        assert open_destination(folder="Nowhere/Here").find(message) is None
    assert dovecot.folders(mail_users.destination.name) == ["INBOX"]


def test_find_with_an_added_message_id(open_destination: Opener) -> None:
    raw = b"From: a@example.com\r\nSubject: no id\r\n\r\nbody\r\n"
    with fetched(raw) as message:
        assert message.message_id_added
        reference = open_destination().deliver(message)
        assert open_destination().find(message) == reference


# --- check -----------------------------------------------------------------------------------------------


def test_check_writes_nothing(dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener) -> None:
    session = open_destination(folder="Imported/Hosted")
    result = session.check()
    assert (result.exists, result.to_create) == (False, ("Imported", "Imported.Hosted"))
    assert dovecot.folders(mail_users.destination.name) == ["INBOX"]
    with fetched(raw_message()) as message:
        session.deliver(message)
    assert open_destination(folder="Imported/Hosted").check().exists


def test_missing_folder_without_create_is_rejected(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    session = open_destination(folder="Missing", create_folder=False)
    with pytest.raises(DestinationRejectedError, match="Missing"):
        session.check()
    with fetched(raw_message()) as message, pytest.raises(DestinationRejectedError, match="TRYCREATE"):
        session.deliver(message)
    assert dovecot.folders(mail_users.destination.name) == ["INBOX"]


# --- server refusals -------------------------------------------------------------------------------------


def test_over_quota_is_destination_full(dovecot: Dovecot, open_destination: Opener) -> None:
    full = dovecot.new_user("full", quota="20K")
    try:
        session = open_destination(user=full, folder="Imported")
        with (
            fetched(large_message(30 * 1024), "BIGUIDL") as message,
            pytest.raises(DestinationFullError, match="OVERQUOTA") as caught,
        ):
            session.deliver(message)
        assert dovecot.host in str(caught.value) and "'Imported'" in str(caught.value)
        assert caught.value.uidl == "BIGUIDL"
    finally:
        dovecot.remove_user(full.name)


def test_message_over_the_size_limit_is_rejected(dovecot: Dovecot, open_destination: Opener) -> None:
    limited = dovecot.new_user("limited", userdb_fields={"quota_max_mail_size": "10K"})
    try:
        session = open_destination(user=limited)
        with (
            fetched(large_message(30 * 1024)) as message,
            pytest.raises(DestinationRejectedError, match="LIMIT"),
        ):
            session.deliver(message)
    finally:
        dovecot.remove_user(limited.name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[OVERQUOTA] Quota exceeded (mailbox for user is full)", DestinationFullError),
        ("Over quota", DestinationFullError),  # Cyrus: no response code
        ("Quota exceeded", DestinationFullError),
        ("[TOOBIG] Message too large", DestinationTooLargeError),
        ("[CANNOT] Invalid message", DestinationRejectedError),
        ("[LIMIT] Too many messages, quota exceeded", DestinationRejectedError),
        ("[UNAVAILABLE] Backend down", DestinationTempError),
        ("[INUSE] Mailbox locked", DestinationTempError),
        ("Something else went wrong", DestinationRejectedError),
    ],
)
def test_refusal_classification(text: str, expected: type[DestinationError]) -> None:
    error = command_refused(Where("imap.example", 143, "Imported"), "APPEND", text)
    assert type(error) is expected
    assert "imap.example:143" in str(error) and "'Imported'" in str(error) and text in str(error)


def test_wrong_password_is_an_auth_error(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    wrong = MailUser(mail_users.destination.name, "not-the-password-42")
    with pytest.raises(DestinationAuthError, match="AUTHENTICATIONFAILED") as caught:
        open_destination(user=wrong)
    assert "not-the-password-42" not in str(caught.value)
    assert mail_users.destination.name in str(caught.value)


def test_kicked_session_is_a_connect_error(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    session = open_destination()
    session.check()
    dovecot.doveadm("kick", mail_users.destination.name)
    with fetched(raw_message()) as message, pytest.raises(DestinationConnectError):
        session.deliver(message)
    session.close()  # on a dead connection: must not raise


def test_closed_port_is_a_connect_error(open_destination: Opener) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DestinationConnectError, match=f"127.0.0.1:{port}"):
        open_destination(port=port)


# --- TLS -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_tls_with_the_fixture_ca(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener, tls: TlsMode
) -> None:
    port = dovecot.ports.imaps if tls == "implicit" else dovecot.ports.imap
    session = open_destination(tls=tls, port=port, ssl_context=make_ssl_context(ca_file=dovecot.ca_file))
    assert session._client.socket().version() is not None  # really encrypted
    with fetched(raw_message()) as message:
        session.deliver(message)
    assert dovecot.imap_messages(mail_users.destination.name) == [raw_message()]


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_untrusted_certificate_is_a_tls_error(
    dovecot: Dovecot, open_destination: Opener, tls: TlsMode
) -> None:
    port = dovecot.ports.imaps if tls == "implicit" else dovecot.ports.imap
    with pytest.raises(DestinationTLSError, match="certificate"):
        open_destination(tls=tls, port=port, ssl_context=make_ssl_context())


CAPABILITIES = b"IMAP4rev1 AUTH=PLAIN"


def _answer(connection: socket.socket) -> None:
    """Answer CAPABILITY (imaplib asks after the greeting) and LOGOUT; refuse anything else."""
    with connection.makefile("rb") as lines:
        for line in lines:
            tag, _, command = line.strip().partition(b" ")
            if command.upper() == b"CAPABILITY":
                connection.sendall(b"* CAPABILITY " + CAPABILITIES + b"\r\n" + tag + b" OK done\r\n")
            elif command.upper() == b"LOGOUT":
                connection.sendall(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            else:
                connection.sendall(tag + b" BAD not scripted\r\n")


@contextmanager
def scripted_server(greeting: bytes | None) -> Iterator[int]:
    """A one-connection IMAP server that greets with ``greeting`` (or stays silent when None)."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            if greeting is None:
                done.wait(10)
                return
            connection.sendall(greeting)
            with contextlib.suppress(OSError):
                _answer(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        listener.close()


def test_starttls_not_offered_is_refused(open_destination: Opener) -> None:
    greeting = b"* OK [CAPABILITY " + CAPABILITIES + b"] no TLS here\r\n"
    with scripted_server(greeting) as port, pytest.raises(DestinationTLSError, match="STARTTLS"):
        open_destination(port=port, tls="starttls", ssl_context=ssl.create_default_context())


def test_silent_server_times_out(open_destination: Opener) -> None:
    with scripted_server(None) as port, pytest.raises(DestinationConnectError, match="timed out"):
        open_destination(port=port, timeout=0.5)


def test_busy_greeting_is_a_connect_error(open_destination: Opener) -> None:
    with (
        scripted_server(b"* BYE Too many connections\r\n") as port,
        pytest.raises(DestinationConnectError, match="Too many connections"),
    ):
        open_destination(port=port)


def test_find_after_delivery_of_a_message_with_nul_bytes(open_destination: Opener) -> None:
    # IMAP cannot carry NUL: it is stored as 0x80, and recovery after a crash must still recognise it.
    with fetched(b"Message-ID: <nul@x>\r\nSubject: s\r\n\r\na\0b\r\n") as message:
        reference = open_destination().deliver(message)
        assert open_destination().find(message) == reference


@pytest.mark.parametrize("literal_plus", [True, False])
def test_append_with_and_without_a_non_synchronizing_literal(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener, literal_plus: bool
) -> None:
    # Dovecot offers LITERAL+; turning it off here exercises imaplib's synchronizing literal as well.
    session = open_destination()
    session._literal_plus, session._literal_minus = literal_plus, False
    raws = [raw_message(n, body=f"body {n}") for n in range(3)]
    for n, raw in enumerate(raws):
        with fetched(raw, uidl=f"U{n}") as message:
            assert ";UID=" in session.deliver(message)
    assert dovecot.imap_messages(mail_users.destination.name) == raws


# --- MULTIAPPEND --------------------------------------------------------------------------------------


def test_deliver_many_stores_a_batch_in_order_with_a_reference_each(
    dovecot: Dovecot, mail_users: MailUsers, open_destination: Opener
) -> None:
    session = open_destination(folder="Batch", mark_seen=True)
    assert session.max_batch() > 1  # Dovecot offers MULTIAPPEND and LITERAL+
    raws = [raw_message(n, body=f"body {n}") for n in range(5)]
    with contextlib.ExitStack() as stack:
        messages = [stack.enter_context(fetched(raw, f"U{n}")) for n, raw in enumerate(raws)]
        references = session.deliver_many(messages)
    stored = dovecot.imap_fetch(mail_users.destination.name, "Batch")
    assert [message.body for message in stored] == raws
    assert all(message.internal_date == RECEIVED and message.flags == (b"\\Seen",) for message in stored)
    assert references is not None
    assert [int(REFERENCE_RE.match(ref)["uid"]) for ref in references] == [m.uid for m in stored]  # type: ignore[index]


def test_a_refused_batch_stores_nothing(dovecot: Dovecot, open_destination: Opener) -> None:
    # Each message fits the quota on its own, the batch does not: the server refuses all of it.
    small = dovecot.new_user("small", quota="20K")
    try:
        session = open_destination(user=small)
        with contextlib.ExitStack() as stack:
            messages = [stack.enter_context(fetched(large_message(8 * 1024), f"U{n}")) for n in range(3)]
            assert session.deliver_many(messages) is None
        assert dovecot.imap_messages(small.name) == []
    finally:
        dovecot.remove_user(small.name)


def test_no_batches_without_a_non_synchronizing_literal(open_destination: Opener) -> None:
    session = open_destination()
    session._literal_plus, session._literal_minus = False, False
    assert session.max_batch() == 1


def test_multiappend_can_be_turned_off(open_destination: Opener) -> None:
    assert open_destination(multiappend=False).max_batch() == 1
