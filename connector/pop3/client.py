"""A POP3 client (RFC 1939, CAPA/PIPELINING from RFC 2449, STLS from RFC 2595, UTF8 from RFC 6856).

``Pop3Client`` wraps one connected socket; ``connect_pop3`` builds it (TCP, TLS, greeting, CAPA) and is
the one place tests replace. Replies are parsed by the pure functions in ``replies``. Every socket or TLS
failure leaves here as one of the project's ``Source*`` errors, never as a driver exception.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import itertools
import logging
import socket
import ssl
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence, Set
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, TypeVar

from connector.errors import (
    SourceAuthError,
    SourceConnectError,
    SourceError,
    SourceLoginDelayError,
    SourceNoUidlError,
    SourcePermError,
    SourceProtocolError,
    SourceReplyTooLongError,
    SourceTempError,
    SourceTLSError,
)
from connector.oauth import describe_sasl_error, xoauth2_response
from connector.pop3.replies import (
    MAX_STATUS_LINE,
    Capabilities,
    Greeting,
    ListEntry,
    MessageInfo,
    Reply,
    UidlParser,
    Unlisted,
    error_for,
    join_listings,
    parse_capabilities,
    parse_greeting,
    parse_list_block_lenient,
    parse_list_line,
    parse_stat,
    parse_status,
    printable,
    split_listing,
    strip_eol,
    unlisted_line,
    unstuff_block,
)
from connector.pop3.wire import BodyDecoder, ConnectionClosed, StreamReader
from connector.tls import TlsMode, make_ssl_context, plain_text_hint

_T = TypeVar("_T")

log = logging.getLogger("connector.pop3")
wire_log = logging.getLogger("connector.pop3.wire")

# Lines of CAPA/UIDL/LIST replies are short; a longer one is a broken or hostile server.
_MAX_LISTING_LINE = MAX_STATUS_LINE
# About 400,000 messages with RFC-maximum unique-ids (a million with typical ones): beyond any maildrop a
# POP3 client can work with, yet a server that streams listing lines forever is stopped early. Held as a
# list of lines this costs about three times its size in memory (measured: 128 MiB of listing reached a
# peak RSS of 390 MiB, which is why this is not larger).
DEFAULT_MAX_LISTING_BYTES = 32 * 1024 * 1024
_SECRET_COMMANDS = frozenset({"PASS", "APOP", "AUTH"})
FORBIDDEN_IN_ARGUMENTS = ("\r", "\n", "\0")


class Sink(Protocol):
    """Where a message body goes: a ``MessageSpool``, an open file, a ``BytesIO``."""

    def write(self, data: bytes, /) -> object: ...


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _format_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _trace_line(verb: str, args: Sequence[str]) -> str:
    if verb == "AUTH" and args:
        # The mechanism name is not secret; an initial response (a token, a password) is.
        return f"AUTH {args[0]} ****" if len(args) > 1 else f"AUTH {args[0]}"
    if args and verb in _SECRET_COMMANDS:
        return f"{verb} ****"
    return " ".join((verb, *args))


@dataclass(frozen=True)
class Streamed:
    """What streaming one RETR/TOP body into a sink gave: the ``octets`` written (unstuffed, CRLF line
    endings) and whether any line ending had to be ``repaired`` (a bare LF or CR became CRLF). Returned
    with the body, so the flag always belongs to the reply it describes (the ledger records it)."""

    octets: int
    repaired: bool = False


class _Discard:
    def write(self, data: bytes, /) -> int:
        return len(data)


def _is_continuation(line: bytes) -> bool:
    """A SASL continuation (RFC 5034): ``+`` alone or ``+ `` and a base64 challenge."""
    body = strip_eol(line)
    return body == b"+" or body.startswith(b"+ ")


class RetrReply:
    """One message's reply in ``Pop3Client.retr_many``, next in the stream."""

    def __init__(self, client: Pop3Client, number: int) -> None:
        self.number = number
        self._client = client
        self._started = False
        self._finished = False

    def into(self, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        """Stream the message into ``sink`` like ``Pop3Client.retr``; returns what was written.

        An ``-ERR`` raises ``SourceMessageError`` (the stream stays in step); anything escaping while the
        body is read (a failing sink, ``max_bytes`` exceeded) leaves the session broken.
        """
        if self._started:
            raise RuntimeError(f"the reply to RETR {self.number} was already read")
        self._started = True
        reply, streamed = self._client._read_retr_reply(sink, max_bytes)
        self._finished = True
        if not reply.ok:
            raise error_for("RETR", reply, peer=self._client.peer)
        return streamed

    def finish(self) -> None:
        """Discard the reply if it was not read; refuse to go on if reading it failed half-way."""
        if not self._started:
            try:
                self.into(_Discard())
            except SourceError:
                if not self._finished:
                    raise
        elif not self._finished:
            raise SourceConnectError(
                f"{self._client.peer}: the POP3 connection is unusable after an earlier error"
            )


class PendingListing:
    """A listing asked for with ``Pop3Client.request_listing`` whose reply is still to be read."""

    def __init__(self, client: Pop3Client, *, sized: bool, pipelined: bool) -> None:
        self._client = client
        # True when it was asked with sizes (UIDL and LIST), False for UIDL alone (every size 0).
        self.sized = sized
        self._pipelined = pipelined
        self._read = False

    def read(self, *, apart_from: Set[str] | None = None) -> Sequence[MessageInfo]:
        """The listing, as ``Pop3Client.listing`` (``sized``) or ``Pop3Client.uidl`` would return it; raises
        as they do (``SourceNoUidlError`` for a server without UIDL). Read once. ``apart_from``: unique-ids
        (the ledger's kept messages) whose difference with the listing a UIDL-only listing works out while
        the server sends it (``MessageList.not_in``)."""
        if self._read:
            raise RuntimeError("the listing was already read")
        self._read = True
        return self._client._receive_listing(
            sized=self.sized, pipelined=self._pipelined, apart_from=apart_from
        )


class Pop3Client:
    """One POP3 session over a connected socket. Build it with ``connect_pop3``.

    The constructor reads the greeting and sends CAPA. Any error that leaves the byte stream in an
    unknown place (a dropped connection, garbage, an oversized reply, a failing sink) marks the session
    broken: later commands raise ``SourceConnectError`` and ``__exit__`` closes without QUIT.
    """

    # The secrets of the command in flight, cut out of the trace of its reply (see ``_redact``).
    _trace_secrets: tuple[str, ...] = ()

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: str | None = None,
        max_listing_bytes: int = DEFAULT_MAX_LISTING_BYTES,
    ) -> None:
        self._sock = sock
        self._reader = StreamReader(sock)
        self._peer = peer if peer is not None else self._peer_of(sock)
        self._max_listing_bytes = max_listing_bytes
        self._broken = False
        self._closed = False
        # The command whose reply a ``PendingListing`` has still to read (no other command may go first).
        self._awaiting: str | None = None
        self._capabilities = Capabilities()
        self._utf8 = False
        # The lines of the last listing (UIDL or UIDL+LIST, then LIST or LIST n) that could not be taken
        # in: their messages were left out of what the listing methods returned, so they stay on the server.
        self.unlisted: list[Unlisted] = []
        try:
            self._greeting = self._read_greeting()
            self._capabilities = self.capa()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _peer_of(sock: socket.socket) -> str:
        try:
            address = sock.getpeername()
        except OSError:
            return "pop3 server"
        if isinstance(address, tuple) and len(address) >= 2:
            return _format_peer(str(address[0]), int(address[1]))
        return str(address) or "pop3 server"

    # --- state ------------------------------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def greeting(self) -> Greeting:
        return self._greeting

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def utf8(self) -> bool:
        """Whether the server accepted the UTF8 command (RFC 6856) in this session."""
        return self._utf8

    @property
    def usable(self) -> bool:
        """True while commands can still be sent (not closed, stream position known, no reply pending)."""
        return not self._closed and not self._broken

    def _check_usable(self) -> None:
        if self._awaiting is not None and not self._closed:
            # A caller's mistake, not the server's: the reply it asked for would be read as this one's.
            raise RuntimeError(f"the reply to {self._awaiting} has not been read (PendingListing.read)")
        if self._closed:
            raise SourceConnectError(f"{self._peer}: the POP3 connection is closed")
        if self._broken:
            raise SourceConnectError(f"{self._peer}: the POP3 connection is unusable after an earlier error")

    @contextlib.contextmanager
    def _exchange(self) -> Iterator[None]:
        """Brackets one command and its whole reply. Until the reply has been read to its end the stream
        position is unknown, so anything escaping in between (including a KeyboardInterrupt or a sink
        error) leaves the session broken."""
        self._check_usable()
        self._broken = True
        yield
        self._broken = False

    # --- wire ---------------------------------------------------------------------------------------

    def _encode(self, verb: str, args: Sequence[str]) -> bytes:
        for arg in args:
            if any(bad in arg for bad in FORBIDDEN_IN_ARGUMENTS):
                # The argument itself is not quoted: it may be a password.
                raise SourcePermError(f"{self._peer}: {verb} argument contains a line break or NUL")
        wire_log.debug("C: %s", _trace_line(verb, args))
        return " ".join((verb, *args)).encode("utf-8") + b"\r\n"

    def _send(self, *commands: tuple[str, ...]) -> None:
        """Send one or more commands in a single write (several only when pipelining)."""
        data = b"".join(self._encode(command[0], command[1:]) for command in commands)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            verb = commands[0][0]
            raise SourceConnectError(f"{self._peer}: sending {verb} failed: {_cause(exc)}") from exc

    def _read_failed(self, during: str, exc: OSError) -> SourceConnectError:
        if isinstance(exc, ConnectionResetError):
            # A server that closes with our command still unread sends RST, not FIN: whether the client
            # sees a reset or a clean end is a race, and both mean the same to the admin.
            return SourceConnectError(f"{self._peer}: server closed the connection (reset) during {during}")
        return SourceConnectError(f"{self._peer}: reading the reply to {during}: {_cause(exc)}")

    def _readline(self, limit: int, during: str) -> bytes:
        try:
            data = self._reader.readline(limit)
        except OSError as exc:
            raise self._read_failed(during, exc) from exc
        if not data:
            raise SourceConnectError(f"{self._peer}: server closed the connection during {during}")
        return data

    def _read_full_line(self, limit: int, during: str) -> bytes:
        line = self._readline(limit + 2, during)
        if line.endswith(b"\n"):
            return line
        if len(line) < limit + 2:
            raise SourceConnectError(f"{self._peer}: server closed the connection during {during}")
        raise SourceProtocolError(f"{self._peer}: {during}: reply line longer than {limit} bytes")

    def _read_status_line(self, during: str) -> bytes:
        line = self._read_full_line(MAX_STATUS_LINE, during)
        if wire_log.isEnabledFor(logging.DEBUG):
            wire_log.debug("S: %s", self._redact(printable(strip_eol(line))))
        return line

    def _redact(self, text: str) -> str:
        """A server may echo the password in its refusal; the trace must not repeat it."""
        for secret in self._trace_secrets:
            text = text.replace(secret, "****").replace(printable(secret.encode("utf-8")), "****")
        return text

    def _read_status(self, verb: str) -> Reply:
        return self._parse_reply(verb, self._read_status_line(verb))

    def _read_lines(self, verb: str) -> list[bytes]:
        """The lines of a multi-line reply (CAPA), unstuffed, terminator removed."""
        return split_listing(self._read_block(verb))

    def _read_block(self, verb: str, feed: Callable[[bytes], object] | None = None) -> bytes:
        """The body of a multi-line listing (CAPA, UIDL, LIST) as one block, unstuffed, terminator removed,
        every line ending in LF.

        Read in large pieces and never split into lines here: a UIDL listing may have 100,000 lines at
        every poll. ``feed`` (a ``UidlParser``'s) gets each piece as it arrives, unstuffed when it starts a
        line, so that it parses while the server is still sending.
        """
        pieces: list[bytes] = []
        total = 0
        at_line_start = True
        # The longest line without its LF (CR included, as the limit counts it), and the length of the
        # line the last piece left unfinished: measured piece by piece, while the server sends the rest.
        longest = unfinished = 0
        while True:
            piece, done = self._body_piece(verb, at_line_start)
            total += len(piece)
            if total > self._max_listing_bytes:
                raise SourceProtocolError(
                    f"{self._peer}: {verb} reply longer than {self._max_listing_bytes} bytes"
                )
            pieces.append(piece)
            if piece:
                lengths = list(map(len, piece.split(b"\n")))
                lengths[0] += unfinished
                longest, unfinished = max(longest, *lengths), lengths[-1]
            if feed is not None:
                feed(unstuff_block(piece) if at_line_start else piece)
            at_line_start = piece.endswith(b"\n") if piece else at_line_start
            if done:
                break
        if longest > _MAX_LISTING_LINE + 1:
            raise SourceProtocolError(
                f"{self._peer}: {verb}: reply line longer than {_MAX_LISTING_LINE} bytes"
            )
        block = b"".join(pieces)
        if wire_log.isEnabledFor(logging.DEBUG):  # counting 100,000 lines is work for nobody otherwise
            wire_log.debug("S: <%d lines>", block.count(b"\n"))
        return unstuff_block(block)

    def _body_piece(self, verb: str, at_line_start: bool) -> tuple[bytes, bool]:
        try:
            return self._reader.body_piece(at_line_start)
        except ConnectionClosed:
            raise SourceConnectError(f"{self._peer}: server closed the connection during {verb}") from None
        except OSError as exc:
            raise self._read_failed(verb, exc) from exc

    def _stream_body(self, verb: str, sink: Sink, max_bytes: int | None) -> Streamed:
        decoder = BodyDecoder()
        # Traces summarise a body by size and hash, never its content.
        digest = hashlib.sha256() if wire_log.isEnabledFor(logging.DEBUG) else None
        received = 0
        written = 0
        while True:
            piece, done = self._body_piece(verb, decoder.at_line_start)
            received += len(piece)
            if max_bytes is not None and received > max_bytes:
                raise SourceReplyTooLongError(f"{self._peer}: {verb} reply longer than {max_bytes} bytes")
            data = decoder.feed(piece) + (decoder.finish() if done else b"")
            if data:
                if digest is not None:
                    digest.update(data)
                sink.write(data)
                written += len(data)
            if done:
                break
        if digest is not None:
            wire_log.debug("S: <%s body, %d bytes, sha256 %s>", verb, written, digest.hexdigest())
        return Streamed(written, decoder.repaired)

    # --- session setup --------------------------------------------------------------------------------

    def _read_greeting(self) -> Greeting:
        with self._exchange():
            line = self._read_status_line("greeting")
            try:
                greeting = parse_greeting(line)
            except SourceProtocolError as exc:
                raise SourceProtocolError(f"{self._peer}: greeting: {exc.message}") from exc
        if not greeting.reply.ok:
            raise error_for("GREETING", greeting.reply, peer=self._peer)
        return greeting

    def capa(self) -> Capabilities:
        """Ask for (and remember) the capabilities; a server that answers -ERR simply has none."""
        with self._exchange():
            self._send(("CAPA",))
            reply = self._read_status("CAPA")
            lines = self._read_lines("CAPA") if reply.ok else []
        try:
            self._capabilities = parse_capabilities(lines)
        except SourceProtocolError as exc:
            raise SourceProtocolError(f"{self._peer}: CAPA: {exc.message}") from exc
        return self._capabilities

    def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """STLS, then the TLS handshake, then CAPA again (capabilities seen in plaintext are discarded)."""
        if not self._capabilities.has("STLS"):
            raise SourceTLSError(f"{self._peer}: server does not offer STLS")
        with self._exchange():
            self._send(("STLS",))
            reply = self._read_status("STLS")
        if not reply.ok:
            if reply.code is not None:
                raise error_for("STLS", reply, peer=self._peer)
            # Going on in plaintext would be the silent downgrade that tls = "starttls" forbids.
            raise SourceTLSError(f"{self._peer}: server refused STLS: {reply.describe()}")
        with self._exchange():
            self._refuse_injected_data()
            self._sock = _wrap_socket(self._sock, context, server_hostname, self._peer)
            self._reader = StreamReader(self._sock)
        self._capabilities = Capabilities()
        self.capa()

    def _refuse_injected_data(self) -> None:
        """Anything already received after the STLS reply was sent in plaintext by someone who hopes it
        will be read as if it came over TLS (the CVE-2011-0411 family): refuse the session."""
        if self._reader.buffered:
            raise SourceTLSError(f"{self._peer}: server sent plaintext data after STLS; refusing to continue")
        timeout = self._sock.gettimeout()
        self._sock.settimeout(0)  # peek must not wait for data that is not there
        try:
            leftover = self._sock.recv(1, socket.MSG_PEEK)
        except OSError:
            leftover = b""
        finally:
            self._sock.settimeout(timeout)
        if leftover:
            raise SourceTLSError(f"{self._peer}: server sent plaintext data after STLS; refusing to continue")

    # --- commands ---------------------------------------------------------------------------------------

    def _command(self, verb: str, *args: str, secrets: Sequence[str] = ()) -> Reply:
        self._trace_secrets = tuple(secret for secret in secrets if secret)
        try:
            with self._exchange():
                self._send((verb, *args))
                reply = self._read_status(verb)
        finally:
            self._trace_secrets = ()
        if not reply.ok:
            raise error_for(verb, reply, peer=self._peer, secrets=secrets)
        return reply

    def login(self, username: str, password: str, *, method: Literal["user", "apop"] = "user") -> None:
        """USER/PASS or APOP. The password never appears in an exception or in the wire trace."""
        for what, value in (("username", username), ("password", password)):
            if any(bad in value for bad in FORBIDDEN_IN_ARGUMENTS):
                raise SourceAuthError(f"{self._peer}: the {what} contains a line break or NUL")
        self.enable_utf8()
        try:
            if method == "apop":
                self._apop(username, password)
            elif method == "user":
                self._command("USER", username, secrets=(password,))
                self._command("PASS", password, secrets=(password,))
            else:
                raise ValueError(f"unknown POP3 login method {method!r}")
        except SourceLoginDelayError as exc:
            # Only this session knows what CAPA announced; the retry policy needs it to wait long enough.
            exc.login_delay = self._capabilities.login_delay
            raise

    def authenticate_xoauth2(self, username: str, token: str, *, initial_response: bool = False) -> None:
        """``AUTH XOAUTH2`` with a bearer token for ``username`` (the mailbox).

        Two steps by default (``AUTH XOAUTH2``, the server's ``+``, then the response), which every
        server takes and Microsoft 365 requires; ``initial_response`` puts the response on the AUTH line
        (RFC 5034 SASL-IR), saving a round trip. A refusal often comes as a base64 JSON challenge first:
        it is answered with an empty line, as SASL requires, and its content goes into the error.
        """
        try:
            encoded = base64.b64encode(xoauth2_response(username, token)).decode("ascii")
        except ValueError as exc:
            raise SourceAuthError(f"{self._peer}: {exc}") from None
        secrets = (token, encoded)
        self.enable_utf8()
        # Marked for the trace as PASS is: a server may echo the token or the response in its -ERR.
        self._trace_secrets = secrets
        try:
            with self._exchange():
                if initial_response:
                    self._send(("AUTH", "XOAUTH2", encoded))
                    line = self._read_status_line("AUTH")
                else:
                    self._send(("AUTH", "XOAUTH2"))
                    line = self._read_status_line("AUTH")
                    if _is_continuation(line):
                        self._send_response(encoded.encode("ascii"), trace="****")
                        line = self._read_status_line("AUTH")
                challenge = None
                if _is_continuation(line):
                    challenge = strip_eol(line)[2:]
                    self._send_response(b"", trace="")
                    line = self._read_status_line("AUTH")
                reply = self._parse_reply("AUTH", line)
        finally:
            self._trace_secrets = ()
        if not reply.ok:
            error = error_for("AUTH", reply, peer=self._peer, secrets=secrets)
            if challenge:
                error.message += f" (server said: {describe_sasl_error(challenge)})"
            raise error

    def enable_utf8(self) -> bool:
        """Send UTF8 (RFC 6856) when CAPA offers it; returns whether UTF-8 mode is on.

        Without it a server may hand out a stand-in for every message with raw UTF-8 headers (Courier
        POP3 serves "Cannot display Unicode content" with the original attached), and the connector would
        deliver the stand-in and delete the original. RFC 6856 allows the command only in the
        AUTHORIZATION state, so it goes before the credentials (and after STLS, whose new CAPA is the one
        that counts). A refusal is not fatal: the session goes on as before, and the log says why the
        messages may look different.
        """
        if self._utf8 or not self._capabilities.has("UTF8"):
            return self._utf8
        with self._exchange():
            self._send(("UTF8",))
            reply = self._read_status("UTF8")
        if reply.ok:
            self._utf8 = True
        else:
            log.warning(
                "%s: server offers UTF8 but refused it (%s); messages with raw UTF-8 headers may be "
                "served in a converted form",
                self._peer,
                reply.describe(),
            )
        return self._utf8

    def _send_response(self, data: bytes, *, trace: str) -> None:
        """A SASL response line; ``trace`` is what the wire log shows instead of it."""
        wire_log.debug("C: %s", trace)
        try:
            self._sock.sendall(data + b"\r\n")
        except OSError as exc:
            raise SourceConnectError(
                f"{self._peer}: sending the AUTH response failed: {_cause(exc)}"
            ) from exc

    def _parse_reply(self, verb: str, line: bytes) -> Reply:
        try:
            return parse_status(line)
        except SourceProtocolError as exc:
            raise SourceProtocolError(f"{self._peer}: {verb}: {exc.message}") from exc

    def _apop(self, username: str, password: str) -> None:
        timestamp = self._greeting.apop_timestamp
        if timestamp is None:
            raise SourceAuthError(
                f"{self._peer}: server does not offer APOP (its greeting has no <timestamp>); use USER/PASS"
            )
        # MD5 is what RFC 1939 §7 specifies for APOP; it is not our choice of hash.
        digest = hashlib.md5((timestamp + password).encode("utf-8"), usedforsecurity=False).hexdigest()
        self._command("APOP", username, digest, secrets=(password, digest))

    def stat(self) -> tuple[int, int]:
        """(message count, maildrop size in octets)."""
        reply = self._command("STAT")
        try:
            return parse_stat(reply)
        except SourceProtocolError as exc:
            raise SourceProtocolError(f"{self._peer}: STAT: {exc.message}") from exc

    def _check_listing_reply(self, verb: str, reply: Reply) -> None:
        if reply.ok:
            return
        if verb == "UIDL" and reply.code is None:
            raise SourceNoUidlError(f"{self._peer}: server does not support UIDL ({reply.describe()})")
        raise error_for(verb, reply, peer=self._peer)

    def _listing_block(self, verb: str) -> bytes:
        with self._exchange():
            self._send((verb,))
            reply = self._read_status(verb)
            block = self._read_block(verb) if reply.ok else b""
        self._check_listing_reply(verb, reply)
        return block

    def uidl(self) -> Sequence[MessageInfo]:
        """Every message's number and unique-id, in server order; sizes are 0 (see ``listing``). A message
        whose line is malformed is left out and added to ``unlisted`` (which starts afresh: a new listing)."""
        return self.request_listing(sizes=False).read()

    def list_sizes(self) -> list[ListEntry]:
        """Every message's number and size (a malformed line: see ``uidl``)."""
        return self._lenient(parse_list_block_lenient(self._listing_block("LIST")))

    def _lenient(self, parsed: tuple[_T, list[Unlisted]]) -> _T:
        entries, unlisted = parsed
        for entry in unlisted:
            log.warning("%s: left on the server: %s", self._peer, entry.reason)
        self.unlisted.extend(unlisted)
        return entries

    def listing(self) -> Sequence[MessageInfo]:
        """Every message's number, unique-id and size, in server order (oldest first); a message with a
        malformed line in either listing is left out (see ``uidl``)."""
        return self.request_listing().read()

    def request_listing(self, *, sizes: bool = True) -> PendingListing:
        """Send the listing's command now and read its reply later with ``PendingListing.read``, which
        returns what ``listing`` (``sizes``) or ``uidl`` (not ``sizes``) would.

        A server may take a third of a second to prepare the UIDL listing of 100,000 messages: the caller
        does its own work meanwhile (a poll reads the ledger). UIDL is sent, and LIST pipelined after it
        when ``sizes`` and the server offers PIPELINING (else LIST goes once UIDL's reply is read). Until
        the reply is read the session takes no other command, and closing it sends no QUIT.
        """
        self._check_usable()
        self.unlisted = []
        pipelined = sizes and self.pipelining
        # Broken until read: the stream holds a reply nobody has read (see ``_exchange``).
        self._broken = True
        if pipelined:
            self._send(("UIDL",), ("LIST",))
        else:
            self._send(("UIDL",))
        self._awaiting = "UIDL"
        return PendingListing(self, sized=sizes, pipelined=pipelined)

    def _receive_listing(
        self, *, sized: bool, pipelined: bool, apart_from: Set[str] | None = None
    ) -> Sequence[MessageInfo]:
        """The replies to what ``request_listing`` sent, parsed (``PendingListing.read``)."""
        self._awaiting = None
        if self._closed:
            raise SourceConnectError(f"{self._peer}: the POP3 connection is closed")
        # Both replies are read before either is judged, so an -ERR to UIDL leaves the stream in step.
        uidl_reply = self._read_status("UIDL")
        parser = UidlParser(apart_from if not sized else None)
        uidl_block = self._read_block("UIDL", parser.feed) if uidl_reply.ok else b""
        list_reply: Reply | None = None
        list_block = b""
        if pipelined:
            list_reply = self._read_status("LIST")
            list_block = self._read_block("LIST") if list_reply.ok else b""
        self._broken = False
        self._check_listing_reply("UIDL", uidl_reply)
        if not sized:
            return self._lenient(parser.finish(uidl_block))
        if list_reply is not None:
            self._check_listing_reply("LIST", list_reply)
        else:
            list_block = self._listing_block("LIST")
        uidls, uidl_unlisted = parser.finish(uidl_block)
        sizes, list_unlisted = parse_list_block_lenient(list_block)
        unlisted = uidl_unlisted + list_unlisted
        self._lenient(([], unlisted))
        try:
            return join_listings(uidls, sizes, unlisted)
        except SourceProtocolError as exc:
            raise SourceProtocolError(f"{self._peer}: {exc.message}") from exc

    def retr(self, number: int, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        """Stream message ``number`` into ``sink`` (unstuffed, CRLF line endings); returns the octets
        written and whether line endings were repaired.

        ``max_bytes`` bounds what is read from the wire; past it the session is broken, since the rest
        of the reply can no longer be skipped reliably.
        """
        return self._fetch("RETR", (_positive(number, "message number"),), sink, max_bytes)

    def top(self, number: int, lines: int, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        """The header section and the first ``lines`` body lines of a message, like ``retr``."""
        args = (_positive(number, "message number"), _non_negative(lines, "line count"))
        return self._fetch("TOP", args, sink, max_bytes)

    def _fetch(self, verb: str, args: tuple[str, ...], sink: Sink, max_bytes: int | None) -> Streamed:
        with self._exchange():
            self._send((verb, *args))
            reply = self._read_status(verb)
            streamed = self._stream_body(verb, sink, max_bytes) if reply.ok else Streamed(0)
        if not reply.ok:
            raise error_for(verb, reply, peer=self._peer)
        return streamed

    # --- pipelined RETR and DELE (RFC 2449 PIPELINING) -----------------------------------------------

    @property
    def pipelining(self) -> bool:
        return self._capabilities.has("PIPELINING")

    def retr_many(self, numbers: Iterable[int], *, window: int = 1) -> Generator[RetrReply, None, None]:
        """RETR each message of ``numbers`` in order, keeping up to ``window`` commands in flight when the
        server offers PIPELINING (one at a time otherwise).

        Yields one ``RetrReply`` per message, in order, when its reply is next in the stream; stream it
        with ``reply.into(sink)`` before asking for the next one (a reply not read is discarded). Replies
        wait in the network buffers, not in memory, so memory stays bounded whatever the sizes. Closing
        the iterator early reads and discards the replies still in flight, so the session stays usable.
        """
        self._check_usable()
        depth = max(1, window) if self.pipelining else 1
        queue = iter(numbers)
        in_flight: collections.deque[int] = collections.deque()
        current: RetrReply | None = None
        self._broken = True
        try:
            self._send_retrs(queue, in_flight, depth)
            while in_flight:
                current = RetrReply(self, in_flight.popleft())
                yield current
                current.finish()
                if len(in_flight) <= depth // 2:
                    self._send_retrs(queue, in_flight, depth - len(in_flight))
            self._broken = False
        except GeneratorExit:
            self._drain(current, in_flight)
            raise

    def _send_retrs(self, queue: Iterator[int], in_flight: collections.deque[int], count: int) -> None:
        batch = [_positive(number, "message number") for number in itertools.islice(queue, count)]
        if batch:
            self._send(*(("RETR", number) for number in batch))
            in_flight.extend(int(number) for number in batch)

    def _drain(self, current: RetrReply | None, in_flight: collections.deque[int]) -> None:
        """Read and discard what is still in flight; the session stays broken if the stream is lost."""
        try:
            if current is not None:
                current.finish()
            for number in in_flight:
                RetrReply(self, number).finish()
        except (SourceError, RuntimeError) as exc:
            log.debug("%s: could not discard the pipelined replies: %s", self._peer, exc)
            return
        self._broken = False

    def _read_retr_reply(self, sink: Sink, max_bytes: int | None) -> tuple[Reply, Streamed]:
        reply = self._read_status("RETR")
        return reply, (self._stream_body("RETR", sink, max_bytes) if reply.ok else Streamed(0))

    def list_sizes_of(self, numbers: Sequence[int], *, batch: int = 128) -> list[ListEntry]:
        """``LIST n`` for each message (pipelined when offered): cheaper than a whole LIST when a large
        maildrop has only a few messages to fetch."""
        entries: list[ListEntry] = []
        for start in range(0, len(numbers), batch):
            args = [_positive(number, "message number") for number in numbers[start : start + batch]]
            if self.pipelining:
                with self._exchange():
                    self._send(*(("LIST", arg) for arg in args))
                    replies = [self._read_status("LIST") for _ in args]
            else:
                replies = [self._read_reply_to("LIST", arg) for arg in args]
            for reply in replies:
                if not reply.ok:
                    raise error_for("LIST", reply, peer=self._peer)
                try:
                    entries.append(parse_list_line(reply.text.encode()))
                except SourceProtocolError as exc:
                    # As for a line of a whole LIST: that message stays on the server, the others go on.
                    self._lenient(([], [unlisted_line("LIST", reply.text.encode(), exc)]))
        return entries

    def _read_reply_to(self, verb: str, *args: str) -> Reply:
        with self._exchange():
            self._send((verb, *args))
            return self._read_status(verb)

    def dele_many(self, numbers: Sequence[int], *, batch: int = 128) -> None:
        """DELE each message; with PIPELINING, ``batch`` commands per write. Every reply of a batch is read
        before the first failure is raised, so the session stays in step."""
        if not self.pipelining:
            for number in numbers:
                self.dele(number)
            return
        for start in range(0, len(numbers), batch):
            args = [_positive(number, "message number") for number in numbers[start : start + batch]]
            with self._exchange():
                self._send(*(("DELE", arg) for arg in args))
                replies = [self._read_status("DELE") for _ in args]
            for reply in replies:
                if not reply.ok:
                    raise error_for("DELE", reply, peer=self._peer)

    def dele(self, number: int) -> None:
        """Mark a message deleted; the server deletes it only at a successful QUIT."""
        self._command("DELE", _positive(number, "message number"))

    def noop(self) -> None:
        self._command("NOOP")

    def rset(self) -> None:
        """Unmark every message marked deleted in this session."""
        self._command("RSET")

    # --- ending the session -----------------------------------------------------------------------------

    def quit(self) -> None:
        """QUIT and close. Raises ``SourceTempError`` unless the server confirms: then no deletion of this
        session happened (RFC 1939 §6), and the caller must not record any as done."""
        try:
            self._command("QUIT")
        except SourceTempError as exc:
            raise SourceTempError(f"{exc.message}; messages marked for deletion were not deleted") from exc
        finally:
            self.close()

    def quit_unawaited(self) -> None:
        """QUIT and close without reading the reply: for a session that sent no DELE, where the reply
        decides nothing (RFC 1939 §6: with nothing marked, the UPDATE state only ends the session). A
        server may take long to answer it (Dovecot: ~70 ms on a maildrop of 100,000 messages); the poll
        need not wait. The command goes out before the close, so the server still ends the session as
        after a QUIT."""
        try:
            self._check_usable()
            self._send(("QUIT",))
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection without QUIT: the server forgets every DELE of this session."""
        if self._closed:
            return
        self._closed = True
        # The connection is being abandoned: a failure to close it has no one to be reported to.
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> Pop3Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.usable:
            self.close()
            return
        if exc is None:
            self.quit()
            return
        # QUIT even on an error: the caller DELEs only what is already safe. A failure here must not
        # replace the exception that is already unwinding.
        try:
            self.quit()
        except Exception as quit_error:
            log.warning("%s: QUIT after an earlier error failed: %s", self._peer, quit_error)


def _positive(value: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, not {value!r}")
    return str(value)


def _non_negative(value: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, not {value!r}")
    return str(value)


# --- connection factory -------------------------------------------------------------------------------


def _open_socket(host: str, port: int, timeout: float, peer: str) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise SourceConnectError(f"cannot connect to {peer}: {_cause(exc)}") from exc


def _wrap_socket(sock: socket.socket, context: ssl.SSLContext, host: str, peer: str) -> socket.socket:
    """TLS handshake on ``sock`` (which keeps its timeout). On failure the socket is closed."""
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        reason = exc.verify_message or _cause(exc)
        raise SourceTLSError(f"{peer}: certificate verification failed: {reason}") from exc
    except OSError as exc:
        sock.close()
        raise SourceConnectError(f"{peer}: TLS handshake failed: {_cause(exc)}") from exc


def connect_pop3(
    host: str,
    port: int,
    *,
    tls: TlsMode,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
) -> Pop3Client:
    """Connect, secure the connection as ``tls`` says, read the greeting and the capabilities.

    ``starttls`` never falls back to plaintext: a server without STLS is a ``SourceTLSError``. Without an
    ``ssl_context`` the default verifying one is used.
    """
    if tls not in ("implicit", "starttls", "none"):
        raise ValueError(f"unknown TLS mode {tls!r}")
    peer = _format_peer(host, port)
    context = ssl_context
    if context is None and tls != "none":
        context = make_ssl_context()
    sock = _open_socket(host, port, timeout, peer)
    try:
        if tls == "implicit":
            assert context is not None
            try:
                sock = _wrap_socket(sock, context, host, peer)
            except SourceConnectError as exc:
                exc.message += plain_text_hint(exc.__cause__, port, tls_port=995)
                raise
        client = Pop3Client(sock, peer=peer)
    except BaseException:
        sock.close()
        raise
    if tls == "starttls":
        assert context is not None
        try:
            client.starttls(context, host)
        except BaseException:
            client.close()
            raise
    return client
