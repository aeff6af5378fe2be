"""A small POP3 server for tests: a real listening socket on 127.0.0.1, an in-memory maildrop, and a hook
per command so that a test can make the server misbehave in exactly one place.

Typical use::

    server = ScriptedPop3Server([StoredMessage("uid-1", b"Subject: hi\\r\\n\\r\\nbody\\r\\n")])
    server.fail("PASS", "-ERR [IN-USE] maildrop locked")
    with server:
        client = connect_pop3(server.host, server.port, tls="none", ssl_context=None, timeout=5)

A hook is ``handler(session, argument)``; it answers with ``session.send_line``/``send_raw`` or hands over
to the normal behaviour with ``session.default(verb, argument)``. Raising ``CloseConnection`` drops the
connection. Subclasses may also override ``do_<VERB>`` methods.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import ipaddress
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

Handler = Callable[["Pop3Session", str], None]

DEFAULT_TIMESTAMP = "<1896.697170952@scripted.example>"


class CloseConnection(Exception):
    """Raised by a hook to drop the connection at once (no reply)."""


def crlf_lines(content: bytes) -> list[bytes]:
    """The message's lines without their endings (CRLF or bare LF), ignoring a final line break."""
    lines = re.split(rb"\r?\n", content)
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def canonical(content: bytes) -> bytes:
    """The message as a client should receive it: CRLF line endings, ending with CRLF."""
    return b"".join(line + b"\r\n" for line in crlf_lines(content))


def dot_stuffed(lines: Iterable[bytes]) -> bytes:
    """A multi-line reply body as RFC 1939 puts it on the wire, terminator included."""
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return body + b".\r\n"


def tls_contexts(directory: Path, hostname: str = "localhost") -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate for ``hostname`` and 127.0.0.1, and the CA file a client must
    trust to verify it. Needs the ``cryptography`` package (a dev dependency)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = x509.SubjectAlternativeName(
        [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(alt_names, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / "pop3-cert.pem"
    key_file = directory / "pop3-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


@dataclass
class StoredMessage:
    """One message in the maildrop. ``wire``, when set, is sent verbatim after the ``+OK`` of RETR
    (terminator included) instead of the correctly stuffed content, to imitate a sloppy server."""

    uidl: str
    content: bytes
    wire: bytes | None = None
    # When set, the whole line of this message in a UIDL (LIST) listing, and the text after "+OK " of a
    # single-message UIDL n (LIST n) reply, "{n}" replaced by its message number: for servers that list
    # a message wrongly.
    uidl_line: bytes | None = None
    list_line: bytes | None = None

    @property
    def size(self) -> int:
        return len(canonical(self.content))


@dataclass
class Recorded:
    """What the server saw: commands (PASS/APOP arguments included, for assertions), committed
    deletions, connections and anything that went wrong in a session thread."""

    commands: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    connections: int = 0
    errors: list[BaseException] = field(default_factory=list)


class Pop3Session:
    """One client connection, served on its own thread."""

    def __init__(self, server: ScriptedPop3Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.rfile: BinaryIO = sock.makefile("rb")
        self.state = "AUTHORIZATION"
        self.user: str | None = None
        self.utf8 = False  # RFC 6856 UTF8 was accepted (see CourierLikePop3Server)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.messages: list[StoredMessage] = []
        self.marked: set[int] = set()
        self.calls: dict[str, int] = {}

    # --- output -------------------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_line(self, line: str | bytes) -> None:
        self.send_raw((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")

    def ok(self, text: str = "") -> None:
        self.send_line(f"+OK {text}".rstrip())

    def err(self, text: str = "") -> None:
        self.send_line(f"-ERR {text}".rstrip())

    def send_multiline(self, status: str, lines: Iterable[bytes]) -> None:
        self.send_raw(f"{status}\r\n".encode() + dot_stuffed(lines))

    # --- input ---------------------------------------------------------------------------------------

    def wait_for_input(self, timeout: float) -> bytes:
        """What the client has sent and the server has not read yet, waiting up to ``timeout`` for
        something to arrive; b"" if nothing did. Tells a pipelining client from one that waits."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(0)
            try:
                data = self.rfile.peek(1)  # type: ignore[attr-defined]
            except OSError:
                data = b""
            finally:
                self.sock.settimeout(None)
            remaining = deadline - time.monotonic()
            if data or remaining <= 0:
                return bytes(data)
            select.select([self.sock], [], [], min(remaining, 0.05))

    def start_tls(self, context: ssl.SSLContext) -> None:
        self.rfile.close()
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.rfile = self.sock.makefile("rb")
        self.tls = True

    # --- dispatch ------------------------------------------------------------------------------------

    def default(self, verb: str, argument: str) -> None:
        """The normal behaviour for ``verb``, bypassing any hook."""
        method = getattr(self.server, f"do_{verb}", None)
        if method is None:
            self.err("unknown command")
        else:
            method(self, argument)

    def dispatch(self, verb: str, argument: str) -> None:
        self.calls[verb] = self.calls.get(verb, 0) + 1
        hook = self.server.hooks.get(verb)
        if hook is not None:
            hook(self, argument)
        else:
            self.default(verb, argument)

    def serve(self) -> None:
        self.server.send_greeting(self)
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            self.server.recorded.commands.append(text)
            verb, _, argument = text.partition(" ")
            self.dispatch(verb.upper(), argument)
            if self.state == "CLOSED":
                return

    def message(self, argument: str) -> tuple[int, StoredMessage] | None:
        """The message a numeric argument names, or None (after answering -ERR)."""
        token = argument.split(" ")[0]
        if self.state != "TRANSACTION" or not token.isdigit():
            self.err("no such message")
            return None
        number = int(token)
        if not 1 <= number <= len(self.messages) or number in self.marked:
            self.err("no such message")
            return None
        return number, self.messages[number - 1]

    def live(self) -> list[tuple[int, StoredMessage]]:
        return [(n, m) for n, m in enumerate(self.messages, 1) if n not in self.marked]


class ScriptedPop3Server:
    """A threaded POP3 server on 127.0.0.1:<ephemeral port> with one maildrop."""

    def __init__(
        self,
        messages: Iterable[StoredMessage] = (),
        *,
        username: str = "alice",
        password: str = "secret",
        timestamp: str | None = DEFAULT_TIMESTAMP,
        greeting: bytes | None = None,
        capabilities: list[str] | None = None,
        pipelining: bool = False,
        capa_supported: bool = True,
        auth_failure: str = "-ERR invalid login",
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        stls: bool = False,
        close_after_greeting: bool = False,
    ) -> None:
        self.messages = list(messages)
        self.username = username
        self.password = password
        self.timestamp = timestamp
        self.greeting = greeting
        self.extra_capabilities = capabilities
        self.pipelining = pipelining
        self.capa_supported = capa_supported
        self.auth_failure = auth_failure
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.stls = stls
        self.close_after_greeting = close_after_greeting
        self.hooks: dict[str, Handler] = {}
        self.recorded = Recorded()
        self._lock = threading.Lock()
        self._holder: Pop3Session | None = None
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()

    # --- hooks ------------------------------------------------------------------------------------------

    def on(self, verb: str, handler: Handler) -> None:
        self.hooks[verb.upper()] = handler

    def fail(self, verb: str, reply: str, *, times: int | None = None) -> None:
        """Answer ``verb`` with ``reply`` (a whole status line) the first ``times`` times, or always."""
        used = 0

        def handler(session: Pop3Session, argument: str) -> None:
            nonlocal used
            if times is not None and used >= times:
                session.default(verb.upper(), argument)
                return
            used += 1
            session.send_line(reply)

        self.on(verb, handler)

    # --- lifecycle ----------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        assert self._port is not None, "server not started"
        return self._port

    def start(self) -> ScriptedPop3Server:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._port = int(self._listener.getsockname()[1])
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            # Wake the blocking accept() so the loop sees the stop flag at once.
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        for sock in [*self._sockets, *([self._listener] if self._listener else [])]:
            # shutdown, not only close: a thread blocked in recv on this socket must wake up.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> ScriptedPop3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._stopping.is_set():
                conn.close()
                return
            self.recorded.connections += 1
            self._sockets.append(conn)
            self._spawn(functools.partial(self._serve, conn))

    def _serve(self, conn: socket.socket) -> None:
        session: Pop3Session | None = None
        try:
            if self.implicit_tls:
                assert self.tls_context is not None
                conn = self.tls_context.wrap_socket(conn, server_side=True)
                self._sockets.append(conn)
            session = Pop3Session(self, conn)
            session.serve()
        except (CloseConnection, ConnectionResetError, BrokenPipeError):
            pass  # a hook ended the session, or the client went away: both are normal in these tests
        except Exception as exc:
            # Kept for the test to look at: an exception on this thread would otherwise go unseen.
            if not self._stopping.is_set():
                self.recorded.errors.append(exc)
        finally:
            self._release(session)
            with contextlib.suppress(OSError):
                (session.sock if session else conn).close()

    def _release(self, session: Pop3Session | None) -> None:
        with self._lock:
            if session is not None and self._holder is session:
                self._holder = None

    # --- behaviour -------------------------------------------------------------------------------------

    def send_greeting(self, session: Pop3Session) -> None:
        if self.greeting is not None:
            session.send_raw(self.greeting)
        else:
            stamp = f" {self.timestamp}" if self.timestamp else ""
            session.ok(f"scripted POP3 ready{stamp}")
        if self.close_after_greeting:
            raise CloseConnection

    def capability_lines(self, session: Pop3Session) -> list[str]:
        if self.extra_capabilities is not None:
            lines = list(self.extra_capabilities)
        else:
            lines = ["TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "EXPIRE NEVER"]
            lines += ["PIPELINING"] if self.pipelining else []
        if self.stls and not session.tls and "STLS" not in lines:
            lines.append("STLS")
        return lines

    def do_CAPA(self, session: Pop3Session, argument: str) -> None:
        if not self.capa_supported:
            session.err("unknown command")
            return
        lines = [line.encode() for line in self.capability_lines(session)]
        session.send_multiline("+OK capability list follows", lines)

    def do_STLS(self, session: Pop3Session, argument: str) -> None:
        if not self.stls or session.tls or self.tls_context is None or session.state != "AUTHORIZATION":
            session.err("STLS not available")
            return
        session.ok("begin TLS negotiation")
        session.start_tls(self.tls_context)

    def do_USER(self, session: Pop3Session, argument: str) -> None:
        if session.state != "AUTHORIZATION":
            session.err("already authenticated")
            return
        session.user = argument
        session.ok("send PASS")

    def do_PASS(self, session: Pop3Session, argument: str) -> None:
        if session.state != "AUTHORIZATION" or session.user is None:
            session.err("USER first")
            return
        self._authenticate(session, session.user == self.username and argument == self.password)

    def do_APOP(self, session: Pop3Session, argument: str) -> None:
        user, _, digest = argument.partition(" ")
        if session.state != "AUTHORIZATION" or self.timestamp is None:
            session.err("APOP not available")
            return
        expected = hashlib.md5((self.timestamp + self.password).encode(), usedforsecurity=False).hexdigest()
        self._authenticate(session, user == self.username and digest == expected)

    def _authenticate(self, session: Pop3Session, accepted: bool) -> None:
        if not accepted:
            session.send_line(self.auth_failure)
            return
        with self._lock:
            if self._holder is not None:
                session.err("[IN-USE] maildrop already locked")
                return
            self._holder = session
            session.messages = list(self.messages)
        session.state = "TRANSACTION"
        session.ok("maildrop locked and ready")

    def do_STAT(self, session: Pop3Session, argument: str) -> None:
        if session.state != "TRANSACTION":
            session.err("not authenticated")
            return
        live = session.live()
        session.ok(f"{len(live)} {sum(m.size for _, m in live)}")

    def _listing(
        self,
        session: Pop3Session,
        argument: str,
        value: Callable[[StoredMessage], str],
        line: Callable[[StoredMessage], bytes | None],
    ) -> None:
        def listed(number: int, message: StoredMessage) -> bytes:
            given = line(message)
            if given is None:
                return f"{number} {value(message)}".encode()
            return given.replace(b"{n}", str(number).encode())

        if argument:
            found = session.message(argument)
            if found is not None:
                session.send_line(b"+OK " + listed(*found))
            return
        if session.state != "TRANSACTION":
            session.err("not authenticated")
            return
        lines = [listed(n, m) for n, m in session.live()]
        session.send_multiline("+OK listing follows", lines)

    def do_LIST(self, session: Pop3Session, argument: str) -> None:
        self._listing(session, argument, lambda m: str(m.size), lambda m: m.list_line)

    def do_UIDL(self, session: Pop3Session, argument: str) -> None:
        self._listing(session, argument, lambda m: m.uidl, lambda m: m.uidl_line)

    def do_RETR(self, session: Pop3Session, argument: str) -> None:
        found = session.message(argument)
        if found is None:
            return
        message = found[1]
        if message.wire is not None:
            session.send_raw(f"+OK {message.size} octets\r\n".encode() + message.wire)
        else:
            session.send_multiline(f"+OK {message.size} octets", crlf_lines(message.content))

    def do_TOP(self, session: Pop3Session, argument: str) -> None:
        parts = argument.split(" ")
        found = session.message(argument)
        if found is None:
            return
        if len(parts) != 2 or not parts[1].isdigit():
            session.err("usage: TOP msg n")
            return
        lines = crlf_lines(found[1].content)
        end = lines.index(b"") if b"" in lines else len(lines)
        session.send_multiline("+OK top of message follows", lines[: end + 1 + int(parts[1])])

    def do_DELE(self, session: Pop3Session, argument: str) -> None:
        found = session.message(argument)
        if found is not None:
            session.marked.add(found[0])
            session.ok(f"message {found[0]} deleted")

    def do_NOOP(self, session: Pop3Session, argument: str) -> None:
        if session.state == "TRANSACTION":
            session.ok()
        else:
            session.err("not authenticated")

    def do_RSET(self, session: Pop3Session, argument: str) -> None:
        if session.state != "TRANSACTION":
            session.err("not authenticated")
            return
        session.marked.clear()
        session.ok()

    def do_QUIT(self, session: Pop3Session, argument: str) -> None:
        if session.state == "TRANSACTION":
            self.commit(session)
        session.ok("bye")
        session.state = "CLOSED"

    def commit(self, session: Pop3Session) -> None:
        """The UPDATE state: remove this session's marked messages from the maildrop."""
        gone = [session.messages[n - 1] for n in sorted(session.marked)]
        with self._lock:
            self.messages = [m for m in self.messages if all(m is not g for g in gone)]
        self.recorded.deleted.extend(m.uidl for m in gone)


def has_raw_utf8_headers(content: bytes) -> bool:
    """Whether the header section carries bytes beyond ASCII (RFC 6532 headers, unencoded)."""
    lines = crlf_lines(content)
    header = lines[: lines.index(b"")] if b"" in lines else lines
    return any(byte > 0x7F for line in header for byte in line)


def unicode_placeholder(content: bytes, boundary: str = "=_placeholder") -> bytes:
    """What Courier POP3 serves for a message with raw UTF-8 headers to a client that did not send UTF8:
    a notice of its own, without the original's Date or Message-ID, the original attached as
    message/global (RFC 6532)."""
    return (
        b"From: Mail Delivery Subsystem <postmaster>\r\nSubject: Cannot display Unicode content\r\n"
        b"Mime-Version: 1.0\r\n"
        + f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'.encode()
        + b"Content-Type: text/plain\r\n\r\nThis E-mail message was determined to be Unicode-formatted\r\n"
        b"but your E-mail reader does not support Unicode E-mail.\r\n\r\n"
        + f"--{boundary}\r\nContent-Type: message/global\r\n\r\n".encode()
        + canonical(content)
        + f"\r\n--{boundary}--\r\n".encode()
    )


class CourierLikePop3Server(ScriptedPop3Server):
    """Plays Courier POP3 1.0 on RFC 6856: CAPA offers ``UTF8 USER``, the UTF8 command is accepted in the
    AUTHORIZATION state, and until it was sent RETR serves a message with raw UTF-8 headers as Courier's
    placeholder."""

    def capability_lines(self, session: Pop3Session) -> list[str]:
        return [*super().capability_lines(session), "UTF8 USER", "IMPLEMENTATION Courier Mail Server"]

    def do_UTF8(self, session: Pop3Session, argument: str) -> None:
        if session.state != "AUTHORIZATION":
            session.err("UTF8 is only valid before logging in")
            return
        session.utf8 = True
        session.ok("UTF8 enabled")

    def do_RETR(self, session: Pop3Session, argument: str) -> None:
        found = session.message(argument)
        if found is None:
            return
        content = found[1].content
        if not session.utf8 and has_raw_utf8_headers(content):
            content = unicode_placeholder(content)
        session.send_multiline(f"+OK {len(canonical(content))} octets", crlf_lines(content))


def popa3d_message(content: bytes) -> StoredMessage:
    """A message as popa3d 1.0.3 lists it: its UIDL is a hash of its content, so identical copies (a
    message delivered twice by the MTA) share one UIDL."""
    return StoredMessage(hashlib.md5(canonical(content), usedforsecurity=False).hexdigest(), content)


def popa3d_like(messages: Iterable[StoredMessage] = ()) -> ScriptedPop3Server:
    """A server that behaves as popa3d 1.0.3 does: a bare "+OK" greeting (no APOP timestamp), CAPA
    answered with -ERR (so no PIPELINING, no STLS, no RESP-CODES), USER/PASS, UIDL, TOP, LIST.
    Give it messages made with ``popa3d_message``."""
    return ScriptedPop3Server(messages, timestamp=None, greeting=b"+OK\r\n", capa_supported=False)
