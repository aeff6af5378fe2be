"""In-memory stand-ins for the POP3 server and the destination, plugged into the engine through the
``Connections`` seam (connector/connections.py), so that every branch of a poll can be driven without servers.

* ``FakeMaildrop`` is the POP3 server across sessions: its messages and the ways it misbehaves on purpose.
  ``FakeMaildrop.connect`` (the ``open_source`` of ``Connections``) opens one ``FakeSource`` session, which
  has exactly what the engine and its helpers use of ``Pop3Client`` (poll/engine.py, pipeline.py, fetch.py,
  identity.py, recheck.py) and keeps POP3's rules: message numbers are fixed for the session, DELE only
  marks, QUIT removes the marked messages (and, with ``EXPIRE 0``, every retrieved one), a session that
  ends without QUIT removes nothing.
* ``FakeDestination`` is one destination mailbox: ``open()`` (the ``open_destination`` of ``Connections``)
  is a login and returns the session, which implements ``DestinationSession``
  (connector/destinations/base.py), keeps what it stores and can fail in each way the engine tells apart.

Both record what they were sent (``FakeMaildrop.commands``, ``FakeDestination.calls``) and call an optional
hook first (``on_command``, ``before``): a test reads the committed ledger there, to check what was
recorded before a DELE, a QUIT or a delivery went out.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator, Iterable, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType

from connector.config import Account, Destination
from connector.connections import Connections
from connector.destinations.base import DestinationSession
from connector.errors import (
    DestinationConnectError,
    DestinationFullError,
    DestinationRejectedError,
    DestinationTLSError,
    SourceConnectError,
    SourceError,
    SourceMessageError,
    SourceNoUidlError,
    SourcePermError,
    SourceReplyTooLongError,
)
from connector.message import FetchedMessage
from connector.poll.events import PollEvent
from connector.pop3 import (
    Capabilities,
    ListEntry,
    MessageInfo,
    Sink,
    Streamed,
    Unlisted,
    join_listings,
    parse_capabilities,
)
from connector.pop3.replies import parse_list_block_lenient, parse_uidl_block_lenient

PEER = "pop.fake.example:110"


class SimulatedCrash(BaseException):
    """The process dies at this point: a ``BaseException``, so nothing in the engine handles it."""


# --- the POP3 side ------------------------------------------------------------------------------------------


@dataclass
class FakeMessage:
    uidl: str
    data: bytes


@dataclass
class FakeMaildrop:
    """The POP3 server's state across sessions. The faults stay until a test changes them (but ``drop_at``,
    which fires once)."""

    messages: list[FakeMessage]
    # CAPA lines, e.g. "EXPIRE 0" or "LOGIN-DELAY 900".
    capabilities: list[str] = field(default_factory=lambda: ["UIDL", "TOP", "PIPELINING"])
    # UIDLs whose RETR is answered -ERR (the session stays usable).
    refuse_retr: set[str] = field(default_factory=set)
    # UIDL -> octets of the message that RETR sends (a short reply).
    short_retr: dict[str, int] = field(default_factory=dict)
    # UIDLs whose RETR reply the client would report as repaired (bare line endings made CRLF).
    repaired: set[str] = field(default_factory=set)
    # UIDLs whose line in the UIDL listing is malformed (three words).
    garbled: set[str] = field(default_factory=set)
    # UIDL answered with a plain -ERR: the server has no unique-ids.
    no_uidl: bool = False
    # The first command starting with this (e.g. "RETR 2", "QUIT") finds the connection dropped.
    drop_at: str | None = None
    # Raised by the login (``connect``), e.g. a ``SourceLoginDelayError``.
    refuse_login: SourceError | None = None
    # Called with each command line before it is answered.
    on_command: Callable[[str], None] | None = None
    sessions: list[FakeSource] = field(default_factory=list)

    def connect(self, account: Account | None = None) -> FakeSource:
        """Connect and log in (``Connections.open_source``)."""
        if self.refuse_login is not None:
            raise self.refuse_login
        session = FakeSource(self)
        self.sessions.append(session)
        return session

    @property
    def commands(self) -> list[str]:
        """Every command of every session, in order."""
        return [command for session in self.sessions for command in session.commands]

    @property
    def uidls(self) -> list[str]:
        return [message.uidl for message in self.messages]


def _streamed(sink: Sink, body: bytes, *, repaired: bool = False) -> Streamed:
    """The one place that writes a RETR or TOP body and says what was written, as ``Pop3Client`` does. The
    fake sends its messages as they are (CRLF line endings); ``repaired`` plays a client that repaired
    them."""
    if body:
        sink.write(body)
    return Streamed(len(body), repaired=repaired)


class _RetrReply:
    """One reply of ``FakeSource.retr_many`` (``RetrReply`` of connector/pop3/client.py)."""

    def __init__(self, source: FakeSource, number: int) -> None:
        self.number = number
        self._source = source

    def into(self, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        return self._source._send_body(self.number, sink, max_bytes)


class _PendingListing:
    """``PendingListing`` of connector/pop3/client.py for ``FakeSource.request_listing``."""

    def __init__(self, source: FakeSource, sized: bool) -> None:
        self._source = source
        self.sized = sized

    def read(self, *, apart_from: Set[str] | None = None) -> list[MessageInfo]:
        source = self._source
        return source._sized_listing() if self.sized else source._uidl_only()


class FakeSource:
    """One POP3 session (logged in) on a ``FakeMaildrop``."""

    def __init__(self, maildrop: FakeMaildrop) -> None:
        self._maildrop = maildrop
        # Numbered as at the login, for the whole session (RFC 1939).
        self._messages = list(maildrop.messages)
        self.commands: list[str] = []
        self.capabilities: Capabilities = parse_capabilities(line.encode() for line in maildrop.capabilities)
        self.peer = PEER
        self.unlisted: list[Unlisted] = []
        self._marked: set[int] = set()
        self._retrieved: set[int] = set()
        self._closed = False
        self._broken = False
        # Set once a retr_many has handed out its last reply and was asked for more: every message it
        # fetched has been read (and, by the engine's fetch thread, queued for delivery).
        self.fetched_all = threading.Event()

    @property
    def usable(self) -> bool:
        return not self._closed and not self._broken

    def _command(self, line: str) -> None:
        if not self.usable:
            raise SourceConnectError(f"{self.peer}: the POP3 connection is unusable after an earlier error")
        self.commands.append(line)
        if self._maildrop.on_command is not None:
            self._maildrop.on_command(line)
        drop = self._maildrop.drop_at
        if drop is not None and line.startswith(drop):
            self._maildrop.drop_at = None
            self._broken = True
            raise SourceConnectError(f"{self.peer}: server closed the connection during {line.split()[0]}")

    def _message(self, number: int) -> FakeMessage:
        if not 1 <= number <= len(self._messages):
            raise SourcePermError(f"{self.peer}: -ERR no such message {number}")
        return self._messages[number - 1]

    # --- listings ---------------------------------------------------------------------------------------

    def _uidl_block(self) -> bytes:
        if self._maildrop.no_uidl:
            raise SourceNoUidlError(f"{self.peer}: server does not support UIDL (-ERR unknown command)")
        lines = []
        for number, message in enumerate(self._messages, start=1):
            extra = " garbled" if message.uidl in self._maildrop.garbled else ""
            lines.append(f"{number} {message.uidl}{extra}\n")
        return "".join(lines).encode()

    def _list_block(self) -> bytes:
        return "".join(f"{n} {len(m.data)}\n" for n, m in enumerate(self._messages, start=1)).encode()

    def _lenient(self, unlisted: Iterable[Unlisted]) -> None:
        self.unlisted.extend(unlisted)

    def uidl(self) -> list[MessageInfo]:
        return self.request_listing(sizes=False).read()

    def request_listing(self, *, sizes: bool = True) -> _PendingListing:
        """``Pop3Client.request_listing``: UIDL is sent (recorded) now, its reply read by ``read``."""
        self.unlisted = []
        self._command("UIDL")
        return _PendingListing(self, sizes)

    def _uidl_only(self) -> list[MessageInfo]:
        infos, unlisted = parse_uidl_block_lenient(self._uidl_block())
        self._lenient(unlisted)
        return infos

    def list_sizes(self) -> list[ListEntry]:
        self._command("LIST")
        entries, unlisted = parse_list_block_lenient(self._list_block())
        self._lenient(unlisted)
        return entries

    def listing(self) -> list[MessageInfo]:
        return self.request_listing().read()

    def _sized_listing(self) -> list[MessageInfo]:
        uidl_block = self._uidl_block()
        self._command("LIST")
        uidls, uidl_unlisted = parse_uidl_block_lenient(uidl_block)
        sizes, list_unlisted = parse_list_block_lenient(self._list_block())
        self._lenient(uidl_unlisted + list_unlisted)
        return join_listings(uidls, sizes, self.unlisted)

    def list_sizes_of(self, numbers: Sequence[int]) -> list[ListEntry]:
        entries = []
        for number in numbers:
            self._command(f"LIST {number}")
            entries.append(ListEntry(number, len(self._message(number).data)))
        return entries

    # --- messages ---------------------------------------------------------------------------------------

    def top(self, number: int, lines: int, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        self._command(f"TOP {number} {lines}")
        data = self._message(number).data
        end = data.find(b"\r\n\r\n")
        head, body = (data, b"") if end < 0 else (data[: end + 4], data[end + 4 :])
        return _streamed(sink, head + b"".join(body.splitlines(keepends=True)[:lines]))

    def retr(self, number: int, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        self._command(f"RETR {number}")
        return self._send_body(number, sink, max_bytes)

    def retr_many(self, numbers: Iterable[int], *, window: int = 1) -> Generator[_RetrReply, None, None]:
        for number in numbers:
            self._command(f"RETR {number}")
            yield _RetrReply(self, number)
        self.fetched_all.set()

    def _send_body(self, number: int, sink: Sink, max_bytes: int | None) -> Streamed:
        """Answer a RETR (``retr`` and ``retr_many``'s replies)."""
        message = self._message(number)
        if message.uidl in self._maildrop.refuse_retr:
            raise SourceMessageError(f"{self.peer}: RETR failed: -ERR cannot open the message file")
        data = message.data[: self._maildrop.short_retr.get(message.uidl, len(message.data))]
        if max_bytes is not None and len(data) > max_bytes:
            self._broken = True
            raise SourceReplyTooLongError(f"{self.peer}: RETR reply longer than {max_bytes} bytes")
        self._retrieved.add(number)
        return _streamed(sink, data, repaired=message.uidl in self._maildrop.repaired)

    # --- deleting and ending ----------------------------------------------------------------------------

    def dele_many(self, numbers: Sequence[int]) -> None:
        for number in numbers:
            self._command(f"DELE {number}")
            self._message(number)
            self._marked.add(number)

    def quit(self) -> None:
        try:
            self._command("QUIT")
            removed = set(self._marked)
            if self.capabilities.expire == 0:  # EXPIRE 0: whatever was retrieved goes too
                removed |= self._retrieved
            gone = [self._messages[number - 1] for number in removed]
            self._maildrop.messages = [m for m in self._maildrop.messages if all(m is not g for g in gone)]
        finally:
            self.close()

    def quit_unawaited(self) -> None:
        """As ``Pop3Client.quit_unawaited``: the server gets QUIT, the reply is not read (a connection
        dropped at QUIT goes unnoticed)."""
        if not self.usable:
            raise SourceConnectError(f"{self.peer}: the POP3 connection is unusable after an earlier error")
        with contextlib.suppress(SourceConnectError):
            self.quit()

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> FakeSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.usable:
            self.close()
        elif exc is None:
            self.quit()
        else:
            with contextlib.suppress(SourceError):  # as Pop3Client: keep the error already unwinding
                self.quit()


# --- the destination ----------------------------------------------------------------------------------------


@dataclass
class Stored:
    ref: str
    uidl: str
    data: bytes
    message_id: str
    sha256: str
    stamp: str | None


@dataclass
class FakeDestination:
    """One destination mailbox and the sessions into it (one at a time: ``open`` returns this object).
    The faults stay until a test changes them."""

    name: str = "archive"
    # How many messages one deliver_many may carry (``DestinationSession.max_batch``).
    batch: int = 1
    # UIDL -> the error its delivery is refused with (a DestinationRejectedError or DestinationTooLargeError);
    # a batch holding one of them is refused as a whole (deliver_many returns None, nothing stored).
    refuse: dict[str, DestinationRejectedError] = field(default_factory=dict)
    # Over quota: every delivery raises DestinationFullError.
    full: bool = False
    # Unreachable: the login (``open``) raises DestinationConnectError.
    down: bool = False
    # The certificate does not verify: the login raises DestinationTLSError.
    tls_error: bool = False
    # UIDLs whose delivery drops the connection before anything is stored.
    drop: set[str] = field(default_factory=set)
    # UIDLs that are stored, and then the answer is lost (the connection drops).
    lose_answer: set[str] = field(default_factory=set)
    # UIDLs whose delivery kills the process before anything is stored (``SimulatedCrash``).
    crash: set[str] = field(default_factory=set)
    # Called with each call line (as recorded in ``calls``) before it is carried out.
    before: Callable[[str], None] | None = None
    stored: list[Stored] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    connected: bool = False

    def _call(self, line: str) -> None:
        self.calls.append(line)
        if self.before is not None:
            self.before(line)

    def open(self) -> FakeDestination:
        """Connect and log in (``Connections.open_destination``)."""
        self._call("open")
        if self.tls_error:
            raise DestinationTLSError(f"destination {self.name!r}: certificate verification failed")
        if self.down:
            raise DestinationConnectError(f"destination {self.name!r}: cannot connect: connection refused")
        self.connected = True
        return self

    def _check_connected(self) -> None:
        if not self.connected:
            raise DestinationConnectError(f"destination {self.name!r}: the session is closed")

    def _faults(self, message: FetchedMessage) -> None:
        """Every fault that fails a delivery before anything is stored."""
        if self.full:
            raise DestinationFullError(f"destination {self.name!r}: NO [OVERQUOTA] quota exceeded")
        if message.uidl in self.crash:
            raise SimulatedCrash(f"killed while delivering {message.uidl}")
        if message.uidl in self.drop:
            self.connected = False
            raise DestinationConnectError(f"destination {self.name!r}: connection reset during APPEND")

    def _store(self, message: FetchedMessage) -> str:
        ref = f"fake:{self.name};UID={len(self.stored) + 1}"
        data = message.read_bytes()
        self.stored.append(Stored(ref, message.uidl, data, message.message_id, message.sha256, message.stamp))
        return ref

    def _answer_lost(self, message: FetchedMessage) -> None:
        if message.uidl in self.lose_answer:
            self.connected = False
            raise DestinationConnectError(
                f"destination {self.name!r}: timed out waiting for the APPEND answer"
            )

    def deliver(self, message: FetchedMessage) -> str:
        self._call(f"deliver {message.uidl}")
        self._check_connected()
        self._faults(message)
        refused = self.refuse.get(message.uidl)
        if refused is not None:
            raise refused
        ref = self._store(message)
        self._answer_lost(message)
        return ref

    def max_batch(self) -> int:
        return self.batch

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        self._call("deliver_many " + " ".join(message.uidl for message in messages))
        self._check_connected()
        assert len(messages) <= self.batch, "the engine sent a larger batch than max_batch()"
        for message in messages:
            self._faults(message)
        if any(message.uidl in self.refuse for message in messages):
            return None
        refs = [self._store(message) for message in messages]
        for message in messages:
            self._answer_lost(message)
        return refs

    def find(self, message: FetchedMessage) -> str | None:
        """A copy carrying the message's stamp, else one of the same Message-ID and SHA-256
        (policies/recovery.py)."""
        self._call(f"find {message.uidl}")
        self._check_connected()
        for stored in self.stored:
            if message.stamp is not None and stored.stamp is not None:
                if stored.stamp == message.stamp:
                    return stored.ref
            elif (stored.message_id, stored.sha256) == (message.message_id, message.sha256):
                return stored.ref
        return None

    def check(self) -> object:
        return f"fake destination {self.name}: {len(self.stored)} messages"

    def close(self) -> None:
        self._call("close")
        self.connected = False

    # --- for assertions ---------------------------------------------------------------------------------

    @property
    def uidls(self) -> list[str]:
        """The UIDL of each stored message, in the order stored (a message stored twice is listed twice)."""
        return [stored.uidl for stored in self.stored]

    @property
    def deliveries(self) -> list[str]:
        """The deliver and deliver_many calls."""
        return [call for call in self.calls if call.startswith("deliver")]


def connections(
    maildrop: FakeMaildrop, destination: FakeDestination, recipients: dict[str, FakeDestination] | None = None
) -> Connections:
    """``Connections`` into the fakes; ``recipients`` are the mailboxes of a catch-all account, by name."""
    mailboxes = recipients or {}

    def open_destination(_destination: Destination, _account: Account) -> DestinationSession:
        return destination.open()

    def open_recipient(_destination: Destination, _account: Account, mailbox: str) -> DestinationSession:
        return mailboxes[mailbox].open()

    # The fakes are not the real classes; Connections only calls them (mypy does not check tests).
    return Connections(
        open_source=maildrop.connect,  # type: ignore[arg-type]
        open_destination=open_destination,
        open_recipient=open_recipient,
    )


# --- the rest of a poll's world -----------------------------------------------------------------------------


class FakeClock:
    """The engine's and the ledger's clock: it moves only when a test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class RecordingObserver:
    """A ``PollObserver`` that keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[PollEvent] = []

    def notify(self, event: PollEvent) -> None:
        self.events.append(event)

    def clear(self) -> None:
        self.events.clear()

    def of(self, *kinds: type[PollEvent]) -> list[PollEvent]:
        """The events of these types, in order."""
        return [event for event in self.events if isinstance(event, kinds)]

    def names(self, *kinds: type[PollEvent]) -> list[str]:
        """The type names of the events of these types (of all, without any), in order."""
        return [type(event).__name__ for event in (self.of(*kinds) if kinds else self.events)]
