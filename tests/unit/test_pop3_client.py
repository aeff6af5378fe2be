"""Pop3Client against the scripted POP3 server: real sockets on 127.0.0.1, no Dovecot needed."""

from __future__ import annotations

import io
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.errors import (
    SourceAuthError,
    SourceConnectError,
    SourceError,
    SourceInUseError,
    SourceLoginDelayError,
    SourceMessageError,
    SourceNoUidlError,
    SourcePermError,
    SourceProtocolError,
    SourceTempError,
    SourceTLSError,
)
from connector.message import MessageSpool
from connector.pop3 import ListEntry, MessageInfo, Pop3Client, Streamed, Unlisted, connect_pop3
from connector.pop3.wire import BodyDecoder
from connector.tls import TlsMode, make_ssl_context
from tests.servers.scripted_pop3 import (
    CloseConnection,
    Pop3Session,
    ScriptedPop3Server,
    StoredMessage,
    canonical,
    tls_contexts,
)

TIMEOUT = 5.0
HELLO = b"From: a@example.com\r\nSubject: hello\r\n\r\nHello there.\r\n"
SECOND = b"From: b@example.com\r\nSubject: second\r\n\r\nSecond body\r\nline two\r\n"


class RecordingSink:
    """A sink that remembers how the body arrived, to check it was streamed."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.writes: list[int] = []

    def write(self, data: bytes, /) -> int:
        self.writes.append(len(data))
        return self.buffer.write(data)

    @property
    def value(self) -> bytes:
        return self.buffer.getvalue()


@pytest.fixture
def server() -> Iterator[ScriptedPop3Server]:
    with ScriptedPop3Server([StoredMessage("uid-1", HELLO), StoredMessage("uid-2", SECOND)]) as srv:
        yield srv
    assert srv.recorded.errors == []


def connect(srv: ScriptedPop3Server, **kwargs: object) -> Pop3Client:
    options: dict[str, object] = {"tls": "none", "ssl_context": None, "timeout": TIMEOUT}
    options.update(kwargs)
    return connect_pop3(srv.host, srv.port, **options)  # type: ignore[arg-type]


def logged_in(srv: ScriptedPop3Server) -> Pop3Client:
    client = connect(srv)
    client.login("alice", "secret")
    return client


def retr_bytes(srv: ScriptedPop3Server, content: bytes | None = None, wire: bytes | None = None) -> bytes:
    srv.messages = [StoredMessage("only", content if content is not None else b"", wire=wire)]
    with logged_in(srv) as client:
        sink = io.BytesIO()
        written = client.retr(1, sink).octets
    assert written == len(sink.getvalue())
    return sink.getvalue()


# --- connecting ---------------------------------------------------------------------------------------------


def test_greeting_and_capabilities(server: ScriptedPop3Server) -> None:
    with connect(server) as client:
        assert client.greeting.reply.ok
        assert client.greeting.apop_timestamp == "<1896.697170952@scripted.example>"
        assert client.capabilities.has("UIDL") and client.capabilities.expire_never
        assert not client.capabilities.has("PIPELINING")
        assert client.peer == f"127.0.0.1:{server.port}"


def test_server_without_capa_has_no_capabilities() -> None:
    with ScriptedPop3Server(capa_supported=False) as srv, connect(srv) as client:
        assert not client.capabilities.has("UIDL")
        client.login("alice", "secret")
        assert client.stat() == (0, 0)


def test_connection_refused_names_host_and_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(SourceConnectError, match=f"127.0.0.1:{port}"):
        connect_pop3("127.0.0.1", port, tls="none", ssl_context=None, timeout=TIMEOUT)


def test_server_closing_after_greeting_is_a_connect_error() -> None:
    # Depending on timing the client sees end-of-file or a reset: both are a connect error.
    with (
        ScriptedPop3Server(close_after_greeting=True) as srv,
        pytest.raises(SourceConnectError, match=f"127.0.0.1:{srv.port}.*CAPA"),
    ):
        connect(srv)


def test_reset_reads_as_a_closed_connection(server: ScriptedPop3Server) -> None:
    def reset(session: Pop3Session, argument: str) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raise CloseConnection

    server.on("STAT", reset)
    with (
        logged_in(server) as client,
        pytest.raises(SourceConnectError, match=r"closed the connection \(reset\) during STAT"),
    ):
        client.stat()


def test_silent_server_times_out() -> None:
    with ScriptedPop3Server(greeting=b"") as srv, pytest.raises(SourceConnectError, match="timed out"):
        connect(srv, timeout=0.3)


def test_error_greeting_is_temporary() -> None:
    with (
        ScriptedPop3Server(greeting=b"-ERR too many connections\r\n") as srv,
        pytest.raises(SourceTempError, match="too many connections"),
    ):
        connect(srv)


def test_garbage_greeting_is_a_protocol_error() -> None:
    with (
        ScriptedPop3Server(greeting=b"220 smtp.example ESMTP\r\n") as srv,
        pytest.raises(SourceProtocolError),
    ):
        connect(srv)


def test_oversized_status_line_is_a_protocol_error() -> None:
    with (
        ScriptedPop3Server(greeting=b"+OK " + b"x" * 9000 + b"\r\n") as srv,
        pytest.raises(SourceProtocolError, match="longer than"),
    ):
        connect(srv)


# --- login --------------------------------------------------------------------------------------------------


def test_login_user_pass(server: ScriptedPop3Server) -> None:
    with connect(server) as client:
        client.login("alice", "secret")
        assert client.stat() == (2, len(HELLO) + len(SECOND))
    assert server.recorded.commands[-3:] == ["PASS secret", "STAT", "QUIT"]


def test_login_apop(server: ScriptedPop3Server) -> None:
    with connect(server) as client:
        client.login("alice", "secret", method="apop")
        assert client.stat()[0] == 2
    assert not any(command.startswith(("USER", "PASS")) for command in server.recorded.commands)


@pytest.mark.parametrize("method", ["user", "apop"])
def test_wrong_password_is_an_auth_error(server: ScriptedPop3Server, method: str) -> None:
    with connect(server) as client:
        with pytest.raises(SourceAuthError) as raised:
            client.login("alice", "wrong-password", method=method)  # type: ignore[arg-type]
        assert "wrong-password" not in str(raised.value)
        assert "invalid login" in str(raised.value)
        assert client.usable


def test_apop_needs_a_greeting_timestamp() -> None:
    with ScriptedPop3Server(timestamp=None) as srv, connect(srv) as client:
        with pytest.raises(SourceAuthError, match="does not offer APOP"):
            client.login("alice", "secret", method="apop")
        assert "APOP" not in " ".join(srv.recorded.commands)


def test_line_break_in_password_is_refused_without_quoting_it(server: ScriptedPop3Server) -> None:
    with connect(server) as client, pytest.raises(SourceAuthError) as raised:
        client.login("alice", "pw\r\nDELE 1")
    assert "DELE" not in str(raised.value)
    assert not any("DELE" in command for command in server.recorded.commands)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("-ERR [IN-USE] maildrop locked", SourceInUseError),
        ("-ERR [LOGIN-DELAY] wait 15 minutes", SourceLoginDelayError),
        ("-ERR [SYS/TEMP] backend unavailable", SourceTempError),
        ("-ERR [SYS/PERM] account disabled", SourcePermError),
        ("-ERR [AUTH] bad credentials", SourceAuthError),
        ("-ERR nope", SourceAuthError),
    ],
)
def test_response_codes_at_pass(server: ScriptedPop3Server, reply: str, expected: type[SourceError]) -> None:
    server.fail("PASS", reply)
    with connect(server) as client:
        with pytest.raises(expected) as raised:
            client.login("alice", "secret")
        assert type(raised.value) is expected
        assert "PASS" in str(raised.value) and reply.split("] ")[-1] in str(raised.value)
        assert "secret" not in str(raised.value)


def test_second_session_gets_in_use(server: ScriptedPop3Server) -> None:
    with logged_in(server), connect(server) as second, pytest.raises(SourceInUseError):
        second.login("alice", "secret")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("-ERR [SYS/TEMP] disk busy", SourceTempError), ("-ERR no such message", SourceMessageError)],
)
def test_errors_at_retr_leave_the_session_usable(
    server: ScriptedPop3Server, reply: str, expected: type[SourceError]
) -> None:
    server.fail("RETR", reply, times=1)
    with logged_in(server) as client:
        with pytest.raises(expected, match="RETR"):
            client.retr(1, io.BytesIO())
        assert client.usable
        sink = io.BytesIO()
        client.retr(1, sink)
        assert sink.getvalue() == HELLO


# --- listings -----------------------------------------------------------------------------------------------


def test_uidl_and_list(server: ScriptedPop3Server) -> None:
    with logged_in(server) as client:
        assert [(e.number, e.uidl) for e in client.uidl()] == [(1, "uid-1"), (2, "uid-2")]
        assert [(e.number, e.size) for e in client.list_sizes()] == [(1, len(HELLO)), (2, len(SECOND))]


@pytest.mark.parametrize("pipelining", [False, True])
def test_listing(pipelining: bool) -> None:
    messages = [StoredMessage(f"uid-{n}", HELLO * n) for n in range(1, 4)]
    pending_at_uidl: list[bytes] = []

    def on_uidl(session: Pop3Session, argument: str) -> None:
        # A pipelining client has already sent LIST; a waiting one sends nothing until UIDL is answered.
        pending_at_uidl.append(session.wait_for_input(2.0 if pipelining else 0.3))
        session.default("UIDL", argument)

    with ScriptedPop3Server(messages, pipelining=pipelining) as srv:
        srv.on("UIDL", on_uidl)
        with logged_in(srv) as client:
            assert client.capabilities.has("PIPELINING") is pipelining
            listing = client.listing()
    assert listing == [MessageInfo(n, f"uid-{n}", len(HELLO) * n) for n in range(1, 4)]
    assert pending_at_uidl == ([b"LIST\r\n"] if pipelining else [b""])


@pytest.mark.parametrize("pipelining", [False, True])
def test_server_without_uidl(pipelining: bool) -> None:
    with ScriptedPop3Server([StoredMessage("a", HELLO)], pipelining=pipelining) as srv:
        srv.fail("UIDL", "-ERR command not implemented")
        with logged_in(srv) as client:
            with pytest.raises(SourcePermError, match="server does not support UIDL"):
                client.listing()
            client.noop()  # the pipelined LIST reply was consumed: the stream is still in step
    assert ("LIST" in srv.recorded.commands) is pipelining


def test_uidl_with_a_temporary_code_is_not_unsupported(server: ScriptedPop3Server) -> None:
    server.fail("UIDL", "-ERR [SYS/TEMP] index rebuilding")
    with logged_in(server) as client, pytest.raises(SourceTempError, match="index rebuilding"):
        client.listing()


def test_listing_that_disagrees_is_a_protocol_error(server: ScriptedPop3Server) -> None:
    server.on("LIST", lambda s, a: s.send_multiline("+OK", [b"1 10"]))
    with logged_in(server) as client, pytest.raises(SourceProtocolError, match="not in LIST"):
        client.listing()


def test_malformed_listing_line_leaves_that_message_out(server: ScriptedPop3Server) -> None:
    server.on("UIDL", lambda s, a: s.send_multiline("+OK", [b"1 uid with spaces", b"2 uid-2"]))
    with logged_in(server) as client:
        assert client.uidl() == [MessageInfo(2, "uid-2", 0)]
        assert client.unlisted == [Unlisted(1, "malformed UIDL line '1 uid with spaces'")]
        client.noop()  # the session is still in step


@pytest.mark.parametrize("pipelining", [False, True])
def test_malformed_lines_in_uidl_and_list_leave_those_messages_out(pipelining: bool) -> None:
    messages = [StoredMessage(f"uid-{n}", HELLO) for n in range(1, 5)]
    with ScriptedPop3Server(messages, pipelining=pipelining) as srv:
        srv.on(
            "UIDL",
            lambda s, a: s.send_multiline("+OK", [b"1 uid-1", b"2 " + b"u" * 401, b"3 uid-3", b"4 uid-4"]),
        )
        listing = [b"1 10", b"2 20", b"3 3O", b"4 40"]
        srv.on("LIST", lambda s, a: s.default("LIST", a) if a else s.send_multiline("+OK", listing))
        with logged_in(srv) as client:
            assert client.listing() == [MessageInfo(1, "uid-1", 10), MessageInfo(4, "uid-4", 40)]
            assert [entry.number for entry in client.unlisted] == [2, 3]
            assert "invalid unique-id" in client.unlisted[0].reason
            assert client.unlisted[1].reason == "LIST line '3 3O': invalid message size '3O'"
            assert client.list_sizes_of([4]) == [ListEntry(4, len(HELLO))]


def test_a_malformed_list_reply_for_one_message_leaves_that_message_out(server: ScriptedPop3Server) -> None:
    server.on("LIST", lambda s, a: s.send_line("+OK 1 big") if a == "1" else s.default("LIST", a))
    with logged_in(server) as client:
        assert client.list_sizes_of([1, 2]) == [ListEntry(2, len(SECOND))]
        assert [entry.number for entry in client.unlisted] == [1]


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("sizes", [False, True])
def test_a_requested_listing_is_read_after_the_callers_own_work(pipelining: bool, sizes: bool) -> None:
    messages = [StoredMessage(f"uid-{n}", HELLO * n) for n in range(1, 4)]
    events: list[str] = []
    received = threading.Event()

    def on_uidl(session: Pop3Session, argument: str) -> None:
        events.append("server has UIDL")
        received.set()
        session.default("UIDL", argument)

    with ScriptedPop3Server(messages, pipelining=pipelining) as srv, logged_in(srv) as client:
        expected = client.listing() if sizes else client.uidl()
        srv.on("UIDL", on_uidl)
        pending = client.request_listing(sizes=sizes)
        assert received.wait(TIMEOUT)  # sent at once, not when the reply is read
        events.append("caller's work")
        assert pending.sized is sizes
        assert pending.read() == expected
        assert client.unlisted == []
        client.noop()  # in step
    assert events == ["server has UIDL", "caller's work"]
    tail = ["UIDL", "LIST", "NOOP", "QUIT"] if sizes else ["UIDL", "NOOP", "QUIT"]
    assert srv.recorded.commands[-len(tail) :] == tail


def test_no_other_command_goes_before_a_requested_listing_is_read(server: ScriptedPop3Server) -> None:
    with logged_in(server) as client:
        pending = client.request_listing(sizes=False)
        with pytest.raises(RuntimeError, match="reply to UIDL has not been read"):
            client.noop()
        assert not client.usable
        assert [(e.number, e.uidl) for e in pending.read()] == [(1, "uid-1"), (2, "uid-2")]
        with pytest.raises(RuntimeError, match="already read"):
            pending.read()
        client.noop()
    assert server.recorded.commands[-3:] == ["UIDL", "NOOP", "QUIT"]


def test_a_session_left_with_a_listing_unread_closes_without_quit(server: ScriptedPop3Server) -> None:
    with logged_in(server) as client:
        pending = client.request_listing()
    assert "QUIT" not in server.recorded.commands
    with pytest.raises(SourceConnectError, match="connection is closed"):
        pending.read()


@pytest.mark.parametrize("pipelining", [False, True])
def test_a_requested_listing_refused_raises_when_read(pipelining: bool) -> None:
    with ScriptedPop3Server([StoredMessage("a", HELLO)], pipelining=pipelining) as srv:
        srv.fail("UIDL", "-ERR command not implemented")
        with logged_in(srv) as client:
            pending = client.request_listing()
            with pytest.raises(SourceNoUidlError, match="server does not support UIDL"):
                pending.read()
            client.noop()  # the pipelined LIST reply was consumed: the stream is still in step


def test_a_requested_listing_cut_short_breaks_the_session(server: ScriptedPop3Server) -> None:
    def cut(session: Pop3Session, argument: str) -> None:
        session.send_raw(b"+OK\r\n1 uid-1\r\n")
        raise CloseConnection

    server.on("UIDL", cut)
    with logged_in(server) as client:
        pending = client.request_listing(sizes=False)
        with pytest.raises(SourceConnectError, match="closed the connection during UIDL"):
            pending.read()
        assert not client.usable


@pytest.mark.parametrize("bad", [None, 17_000])
def test_a_long_uidl_listing_parsed_while_it_arrives_is_the_whole_listing(bad: int | None) -> None:
    # Many reads of the socket, parsed piece by piece; a bad line far into it falls back to the whole body.
    count = 30_000
    lines = [b"%d uid-%d" % (n, n) if n != bad else b"%d uid with spaces" % n for n in range(1, count + 1)]
    with ScriptedPop3Server() as srv:
        srv.on("UIDL", lambda s, a: s.send_multiline("+OK", lines))
        with logged_in(srv) as client:
            listing = client.uidl()
            client.noop()
    assert [(e.number, e.uidl) for e in listing] == [(n, f"uid-{n}") for n in range(1, count + 1) if n != bad]
    assert [entry.number for entry in client.unlisted] == ([] if bad is None else [bad])


def test_runaway_listing_is_bounded(server: ScriptedPop3Server) -> None:
    server.on("UIDL", lambda s, a: s.send_multiline("+OK", [f"{n} u{n}".encode() for n in range(1, 2000)]))
    client = connect(server)
    client.login("alice", "secret")
    client._max_listing_bytes = 1000
    with client, pytest.raises(SourceProtocolError, match="longer than 1000 bytes"):
        client.uidl()
    assert not client.usable


# --- RETR / TOP ---------------------------------------------------------------------------------------------


def test_retr_unstuffs_dot_lines(server: ScriptedPop3Server) -> None:
    content = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n...three\r\nend.\r\n"
    assert retr_bytes(server, content) == content


def test_retr_of_a_one_megabyte_line_is_streamed(server: ScriptedPop3Server) -> None:
    content = b"Subject: big\r\n\r\n." + b"x" * (1024 * 1024) + b"\r\nafter\r\n"
    server.messages = [StoredMessage("big", content)]
    sink = RecordingSink()
    with logged_in(server) as client:
        assert client.retr(1, sink) == Streamed(len(content), repaired=False)
    assert sink.value == content
    assert len(sink.writes) > 4 and max(sink.writes) <= 2 * 64 * 1024


def test_retr_last_line_without_crlf_ends_with_crlf(server: ScriptedPop3Server) -> None:
    result = retr_bytes(server, b"Subject: x\r\n\r\nno final newline")
    assert result == b"Subject: x\r\n\r\nno final newline\r\n"


def test_retr_normalises_bare_lf_from_a_sloppy_server(server: ScriptedPop3Server) -> None:
    wire = b"Subject: lf\n\nline one\n..stuffed\nline three\n.\n"
    assert retr_bytes(server, wire=wire) == b"Subject: lf\r\n\r\nline one\r\n.stuffed\r\nline three\r\n"


def test_retr_turns_bare_cr_into_crlf(server: ScriptedPop3Server) -> None:
    wire = b"Subject: cr\r\n\r\none\rtwo\r\nthree\r\r\n.\r\n"
    assert retr_bytes(server, wire=wire) == b"Subject: cr\r\n\r\none\r\ntwo\r\nthree\r\n\r\n"


def test_retr_cr_split_across_chunks_is_not_doubled(server: ScriptedPop3Server) -> None:
    line = b"y" * (64 * 1024 - 1) + b"\r\n"  # the CR is the last byte of the first 64 KiB chunk
    wire = b"Subject: split\r\n\r\n" + line + b".\r\n"
    assert retr_bytes(server, wire=wire) == b"Subject: split\r\n\r\n" + line


@given(
    lines=st.lists(st.binary(max_size=30).filter(lambda line: b"\n" not in line), max_size=8),
    chunk=st.integers(min_value=1, max_value=12),
)
def test_body_decoder_is_independent_of_chunking(lines: list[bytes], chunk: int) -> None:
    # readline(limit) hands over pieces of at most `chunk` bytes, the last one ending in LF.
    decoder = BodyDecoder()
    output = b""
    for line in lines:
        wire = (b"." + line if line.startswith(b".") else line) + b"\r\n"
        for start in range(0, len(wire), chunk):
            output += decoder.feed(wire[start : start + chunk])
        assert decoder.at_line_start
    assert output == b"".join(line.replace(b"\r", b"\r\n") + b"\r\n" for line in lines)


def test_retr_keeps_8bit_headers(server: ScriptedPop3Server) -> None:
    content = "Subject: Grüße aus Köln\r\nFrom: Jörg <j@example.de>\r\n\r\nÄpfel\r\n".encode()
    assert retr_bytes(server, content) == content


def test_retr_into_a_message_spool(server: ScriptedPop3Server) -> None:
    spool = MessageSpool("uid-1", "<fallback@example>")
    with logged_in(server) as client:
        client.retr(1, spool)
    with spool.finish() as fetched:
        assert fetched.read_bytes() == b"Message-ID: <fallback@example>\r\n" + HELLO
        assert fetched.message_id_added


def test_retr_max_bytes_breaks_the_session(server: ScriptedPop3Server) -> None:
    server.messages = [StoredMessage("big", b"Subject: big\r\n\r\n" + b"z" * 100_000 + b"\r\n")]
    client = logged_in(server)
    with client:
        with pytest.raises(SourceProtocolError, match="longer than 1000 bytes"):
            client.retr(1, io.BytesIO(), max_bytes=1000)
        assert not client.usable
        with pytest.raises(SourceConnectError, match="unusable"):
            client.noop()
    assert server.recorded.commands[-1] == "RETR 1"  # no QUIT on a broken session


def test_max_bytes_allows_a_message_within_the_bound(server: ScriptedPop3Server) -> None:
    with logged_in(server) as client:
        sink = io.BytesIO()
        client.retr(1, sink, max_bytes=len(HELLO))
        assert sink.getvalue() == HELLO


def test_connection_closed_mid_retr(server: ScriptedPop3Server) -> None:
    server.messages = [StoredMessage("cut", b"", wire=b"Subject: cut\r\n\r\nhalf a li")]

    def retr_then_close(session: Pop3Session, argument: str) -> None:
        session.default("RETR", argument)
        raise CloseConnection

    server.on("RETR", retr_then_close)
    with logged_in(server) as client:
        with pytest.raises(SourceConnectError, match="closed"):
            client.retr(1, io.BytesIO())
        assert not client.usable


def test_failing_sink_propagates_and_breaks_the_session(server: ScriptedPop3Server) -> None:
    class FullDisk:
        def write(self, data: bytes, /) -> int:
            raise OSError(28, "No space left on device")

    with logged_in(server) as client:
        with pytest.raises(OSError, match="No space left"):
            client.retr(1, FullDisk())
        assert not client.usable


def test_top(server: ScriptedPop3Server) -> None:
    with logged_in(server) as client:
        sink = io.BytesIO()
        client.top(2, 1, sink)
    assert sink.getvalue() == b"From: b@example.com\r\nSubject: second\r\n\r\nSecond body\r\n"


# --- DELE / QUIT --------------------------------------------------------------------------------------------


def test_quit_commits_deletions(server: ScriptedPop3Server) -> None:
    client = logged_in(server)
    client.dele(1)
    client.quit()
    assert server.recorded.deleted == ["uid-1"]
    assert not client.usable
    with pytest.raises(SourceConnectError, match="closed"):
        client.noop()


def test_rset_unmarks(server: ScriptedPop3Server) -> None:
    with logged_in(server) as client:
        client.dele(1)
        client.rset()
        assert client.stat()[0] == 2
    assert server.recorded.deleted == []


def test_failed_quit_is_temporary_and_deletes_nothing(server: ScriptedPop3Server) -> None:
    server.fail("QUIT", "-ERR [SYS/PERM] could not expunge")
    client = logged_in(server)
    client.dele(1)
    with pytest.raises(SourceTempError, match="not deleted"):
        client.quit()
    assert server.recorded.deleted == []
    assert not client.usable


def test_close_without_quit_deletes_nothing(server: ScriptedPop3Server) -> None:
    client = logged_in(server)
    client.dele(1)
    client.close()
    client.close()
    assert "QUIT" not in server.recorded.commands
    assert server.recorded.deleted == []


def test_exit_on_exception_still_quits(server: ScriptedPop3Server) -> None:
    with pytest.raises(RuntimeError, match="delivery failed"), logged_in(server) as client:
        client.dele(1)
        raise RuntimeError("delivery failed")
    assert server.recorded.deleted == ["uid-1"]


def test_quit_failure_does_not_mask_the_original_exception(server: ScriptedPop3Server) -> None:
    server.fail("QUIT", "-ERR [SYS/TEMP] nope")
    with pytest.raises(RuntimeError, match="original") as raised, logged_in(server):
        raise RuntimeError("original")
    assert raised.value.__context__ is None


def test_exit_without_exception_reports_a_failed_quit(server: ScriptedPop3Server) -> None:
    server.fail("QUIT", "-ERR nope")
    with pytest.raises(SourceTempError), logged_in(server):
        pass


def test_dele_of_a_missing_message(server: ScriptedPop3Server) -> None:
    with logged_in(server) as client, pytest.raises(SourcePermError, match="DELE"):
        client.dele(9)


# --- protocol trace -----------------------------------------------------------------------------------------


def test_trace_redacts_secrets(server: ScriptedPop3Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="connector.pop3.wire")
    with connect(server) as client:
        client.login("alice", "secret")
        client.retr(1, io.BytesIO())
    with connect(server) as client:
        client.login("alice", "secret", method="apop")
    messages = [r.getMessage() for r in caplog.records if r.name == "connector.pop3.wire"]
    assert "C: USER alice" in messages
    assert "C: PASS ****" in messages
    assert "C: APOP ****" in messages
    assert "C: RETR 1" in messages
    assert any(m.startswith("S: +OK") for m in messages)
    assert not any("secret" in m for m in messages)
    assert not any("Hello there" in m for m in messages)  # bodies are not traced


def test_trace_redacts_a_password_the_server_echoes(
    server: ScriptedPop3Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="connector.pop3.wire")
    server.on("PASS", lambda session, argument: session.send_line(f"-ERR [AUTH] bad password {argument}"))
    with connect(server) as client, pytest.raises(SourceAuthError) as caught:
        client.login("alice", "s3cret-Echo")
    messages = [r.getMessage() for r in caplog.records if r.name == "connector.pop3.wire"]
    assert "S: -ERR [AUTH] bad password ****" in messages
    assert "s3cret-Echo" not in str(caught.value) + " ".join(messages)


# --- TLS ----------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_context, ca_file = tls_contexts(tmp_path)
    return server_context, make_ssl_context(ca_file=ca_file)


def test_starttls_without_stls_never_downgrades(server: ScriptedPop3Server) -> None:
    with pytest.raises(SourceTLSError, match="does not offer STLS"):
        connect(server, tls="starttls")
    assert "STLS" not in server.recorded.commands
    assert "USER alice" not in server.recorded.commands


def test_stls_refused_is_a_tls_error(tls_files: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls_files
    srv = ScriptedPop3Server(tls_context=server_context, stls=True)
    srv.fail("STLS", "-ERR TLS not available right now")
    with srv, pytest.raises(SourceTLSError, match="refused STLS"):
        connect(srv, tls="starttls", ssl_context=client_context)
    assert "USER alice" not in srv.recorded.commands


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_modes(tls_files: tuple[ssl.SSLContext, ssl.SSLContext], mode: TlsMode) -> None:
    server_context, client_context = tls_files
    srv = ScriptedPop3Server(
        [StoredMessage("a", HELLO)],
        tls_context=server_context,
        stls=mode == "starttls",
        implicit_tls=mode == "implicit",
    )
    with srv, connect(srv, tls=mode, ssl_context=client_context) as client:
        assert not client.capabilities.has("STLS")  # CAPA was asked again over TLS
        client.login("alice", "secret")
        sink = io.BytesIO()
        client.retr(1, sink)
        assert sink.getvalue() == HELLO
    assert srv.recorded.commands.count("CAPA") == (2 if mode == "starttls" else 1)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_untrusted_certificate(tls_files: tuple[ssl.SSLContext, ssl.SSLContext], mode: TlsMode) -> None:
    server_context, _ = tls_files
    srv = ScriptedPop3Server(
        tls_context=server_context, stls=mode == "starttls", implicit_tls=mode == "implicit"
    )
    with srv, pytest.raises(SourceTLSError, match=rf"127\.0\.0\.1:{srv.port}.*certificate"):
        connect(srv, tls=mode, ssl_context=make_ssl_context())


def test_plaintext_injected_after_stls_is_refused(tls_files: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls_files
    srv = ScriptedPop3Server(tls_context=server_context, stls=True)
    srv.on("STLS", lambda s, a: s.send_raw(b"+OK begin\r\n+OK injected\r\n"))
    with srv, pytest.raises(SourceTLSError, match="plaintext"):
        connect(srv, tls="starttls", ssl_context=client_context)


def test_canonical_helper_matches_what_clients_receive() -> None:
    assert canonical(b"a\nb") == b"a\r\nb\r\n"


# --- pipelined RETR and DELE --------------------------------------------------------------------------------


def _retr_all(client: Pop3Client, numbers: list[int], window: int) -> list[bytes | str]:
    results: list[bytes | str] = []
    for reply in client.retr_many(numbers, window=window):
        sink = io.BytesIO()
        try:
            reply.into(sink)
        except SourceError as exc:
            results.append(type(exc).__name__)
        else:
            results.append(sink.getvalue())
    return results


@pytest.mark.parametrize("pipelining", [False, True])
def test_retr_many_gives_every_message_in_order(pipelining: bool) -> None:
    contents = [HELLO, SECOND, b"Subject: dots\r\n\r\n.\r\n..\r\n", HELLO * 3000]
    messages = [StoredMessage(f"uid-{n}", content) for n, content in enumerate(contents)]
    waiting_at_first_retr: list[bytes] = []

    def on_retr(session: Pop3Session, argument: str) -> None:
        if not waiting_at_first_retr:
            waiting_at_first_retr.append(session.wait_for_input(2.0 if pipelining else 0.3))
        session.default("RETR", argument)

    with ScriptedPop3Server(messages, pipelining=pipelining) as srv:
        srv.on("RETR", on_retr)
        with logged_in(srv) as client:
            assert _retr_all(client, [1, 2, 3, 4], window=8) == [canonical(c) for c in contents]
            client.noop()
    assert waiting_at_first_retr == ([b"RETR 2\r\nRETR 3\r\nRETR 4\r\n"] if pipelining else [b""])


def test_retr_many_keeps_going_after_an_error_reply() -> None:
    messages = [StoredMessage("a", HELLO), StoredMessage("b", SECOND)]
    with ScriptedPop3Server(messages, pipelining=True) as srv, logged_in(srv) as client:
        assert _retr_all(client, [1, 7, 2], window=3) == [HELLO, "SourceMessageError", SECOND]
        assert client.usable


def test_closing_retr_many_early_discards_what_is_in_flight() -> None:
    messages = [StoredMessage(f"u{n}", HELLO) for n in range(6)]
    with ScriptedPop3Server(messages, pipelining=True) as srv, logged_in(srv) as client:
        replies = client.retr_many(range(1, 7), window=4)
        first = next(replies)
        assert first.into(io.BytesIO()) == Streamed(len(HELLO), repaired=False)
        next(replies)  # not read: discarded too
        replies.close()
        assert client.usable
        client.noop()
    assert srv.recorded.commands[-2:] == ["NOOP", "QUIT"]


def test_a_failing_sink_in_retr_many_breaks_the_session() -> None:
    class FullDisk:
        def write(self, data: bytes, /) -> int:
            raise OSError(28, "No space left on device")

    with ScriptedPop3Server([StoredMessage("a", HELLO), StoredMessage("b", SECOND)], pipelining=True) as srv:
        client = logged_in(srv)
        with client:
            replies = client.retr_many([1, 2], window=2)
            with pytest.raises(OSError, match="No space"):
                next(replies).into(FullDisk())
            replies.close()
            assert not client.usable


BARE_LF_WIRE = b"Subject: lf\n\nbody\n.\r\n"


def test_each_reply_says_whether_its_line_endings_were_repaired() -> None:
    repaired = len(b"Subject: lf\r\n\r\nbody\r\n")
    messages = [StoredMessage("lf", b"", wire=BARE_LF_WIRE), StoredMessage("crlf", HELLO)]
    with ScriptedPop3Server(messages, pipelining=True) as srv, logged_in(srv) as client:
        assert client.retr(1, io.BytesIO()) == Streamed(repaired, repaired=True)
        assert client.retr(2, io.BytesIO()) == Streamed(len(HELLO), repaired=False)
        assert client.top(2, 0, io.BytesIO()) == Streamed(HELLO.index(b"Hello"), repaired=False)
        replies = [reply.into(io.BytesIO()) for reply in client.retr_many([2, 1, 2], window=3)]
    assert replies == [Streamed(len(HELLO)), Streamed(repaired, repaired=True), Streamed(len(HELLO))]
    assert not hasattr(client, "last_body_repaired")


@pytest.mark.parametrize("pipelining", [False, True])
def test_dele_many(pipelining: bool) -> None:
    messages = [StoredMessage(f"u{n}", HELLO) for n in range(5)]
    with ScriptedPop3Server(messages, pipelining=pipelining) as srv, logged_in(srv) as client:
        client.dele_many([1, 3, 5], batch=2)
        with pytest.raises(SourcePermError, match="DELE"):
            client.dele_many([2, 9, 4])
        client.noop()  # every reply of the failed batch was read
    # Pipelined, the DELE after the failing one was already sent; one at a time, it never is.
    assert [m.uidl for m in srv.messages] == ([] if pipelining else ["u3"])


@pytest.mark.parametrize("pipelining", [False, True])
def test_list_sizes_of_single_messages(pipelining: bool) -> None:
    messages = [StoredMessage(f"u{n}", HELLO * n) for n in range(1, 5)]
    with ScriptedPop3Server(messages, pipelining=pipelining) as srv, logged_in(srv) as client:
        assert client.list_sizes_of([2, 4]) == [ListEntry(2, len(HELLO) * 2), ListEntry(4, len(HELLO) * 4)]
        with pytest.raises(SourcePermError, match="LIST"):
            client.list_sizes_of([1, 9])
        client.noop()
