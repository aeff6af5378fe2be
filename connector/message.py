"""One fetched message: spooled to memory or disk, hashed, with the few headers the connector needs.

The POP3 client writes the RETR body (already dot-unstuffed, CRLF line endings) into a ``MessageSpool``.
The spool keeps the header section in memory until it ends, so that a missing ``Message-ID`` can be added
at the top before anything is written; everything after that streams into a ``SpooledTemporaryFile``
(memory up to ``SPOOL_MEMORY_LIMIT``, then disk), hashed on the way. Only one copy of a large message
is ever held, and only when a destination asks for it as bytes.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parsedate_to_datetime
from typing import IO

from connector.policies.recovery import delivery_stamp, stamp_header_line
from connector.policies.repair import RepairScanner, describe_repairs

SPOOL_MEMORY_LIMIT = 1024 * 1024
# A header section larger than this is not parsed for Message-ID/dates; the message is still delivered.
HEADER_PARSE_LIMIT = 1024 * 1024
# The most of a header section read for routing or for a headers-only message (what ``TOP n 0`` is
# allowed to send).
HEADER_SECTION_LIMIT = 2 * HEADER_PARSE_LIMIT
_READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class MessageHeaders:
    """What the connector reads from a message's header section."""

    message_id: str | None
    date: datetime | None
    received: datetime | None

    @property
    def arrival_time(self) -> datetime | None:
        """When the hosted server received it: newest Received:, else Date:."""
        return self.received or self.date


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_header_date(value: str) -> datetime | None:
    """RFC 5322 date, or None for anything unparsable (no exception escapes)."""
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    try:
        return _aware(parsed)
    except (ValueError, OverflowError):
        return None


def received_date(received_header: str) -> datetime | None:
    """The date of one Received: header: whatever follows its last ';' (RFC 5321 §4.4)."""
    _, sep, tail = received_header.rpartition(";")
    if not sep:
        return None
    return parse_header_date(tail)


def parse_headers(header_bytes: bytes) -> MessageHeaders:
    """Read Message-ID, Date and the newest Received: date from a raw header section."""
    parsed = BytesHeaderParser(policy=compat32).parsebytes(header_bytes)

    def text(name: str) -> str | None:
        try:
            value = parsed.get(name)
        except Exception:  # a malformed header must not stop delivery
            return None
        return None if value is None else str(value)

    message_id = text("Message-ID")
    if message_id is not None:
        message_id = " ".join(message_id.split()) or None
    date_value = text("Date")
    received_at = None
    try:
        received_headers = parsed.get_all("Received") or []
    except Exception:
        received_headers = []
    # The topmost Received: was added last, by the hosted server itself; fall back to older ones.
    for header in received_headers:
        received_at = received_date(str(header))
        if received_at is not None:
            break
    return MessageHeaders(
        message_id=message_id,
        date=parse_header_date(date_value) if date_value else None,
        received=received_at,
    )


def header_end(data: bytes | bytearray, limit: int | None = None) -> int:
    """Index just past the blank line that ends the header section (2 when the message starts with one),
    or -1 when no blank line ends within the first ``limit`` bytes (None: anywhere)."""
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n", 0, limit)
    return -1 if end < 0 else end + 4


def header_section(data: bytes, limit: int | None = HEADER_SECTION_LIMIT) -> bytes:
    """The header section of a message: through the blank line that ends it (just ``CRLF`` when the message
    starts with one), all of ``data`` when it has none; never more than ``limit`` bytes (None: unbounded).

    The one meaning of "header section" in the connector: what routing reads, what a headers-only message
    keeps, and (unbounded, NUL bytes removed) what ``policies.uidl.header_hash`` hashes, the same bytes the
    spool hashes as ``FetchedMessage.header_sha256``.
    """
    end = header_end(data, limit)
    if end < 0:
        end = len(data)
    return data[:end] if limit is None else data[: min(end, limit)]


def spooled_header_section(message: FetchedMessage, limit: int = HEADER_SECTION_LIMIT) -> bytes:
    """``header_section`` of a fetched message as spooled (so with its stamp line and any Message-ID the
    spool added), reading no more of the spool than it needs."""
    data = bytearray()
    for chunk in message.chunks():
        data += chunk
        if header_end(data, limit) >= 0 or len(data) >= limit:
            break
    return header_section(bytes(data), limit)


@dataclass
class FetchedMessage:
    """A message ready to deliver. Owns its spool file: call ``close()`` (or use ``with``)."""

    uidl: str
    spool: IO[bytes]
    size: int
    sha256: str
    headers: MessageHeaders
    message_id: str
    message_id_added: bool
    # SHA-256 of the header section as received (before a Message-ID was added); see policies.uidl.
    header_sha256: str | None = None
    # What was changed on the way (policies.repair), for the ledger; None when nothing was.
    repairs: str | None = None
    # Lines over RFC 5322's 998 octets, delivered as they are: no repair, only noted at DEBUG.
    long_lines: int = 0
    # The value of the ``X-Pop-Connector-Id`` line the spool put first (policies.recovery); None: none.
    stamp: str | None = None
    fetched_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def internal_date(self) -> datetime:
        """The date a destination should file the message under (never the import time if known)."""
        return self.headers.arrival_time or self.fetched_at

    @property
    def stamp_line(self) -> bytes:
        """The stamp header line at the start of the message (empty when it has none)."""
        return stamp_header_line(self.stamp) if self.stamp is not None else b""

    def chunks(self, size: int = _READ_CHUNK, *, start: int = 0) -> Iterator[bytes]:
        self.spool.seek(start)
        while chunk := self.spool.read(size):
            yield chunk

    def read_bytes(self) -> bytes:
        """The whole message as one bytes object: the single in-memory copy."""
        self.spool.seek(0)
        return self.spool.read()

    def close(self) -> None:
        self.spool.close()

    def __enter__(self) -> FetchedMessage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MessageSpool:
    """A write-only sink for RETR that yields a ``FetchedMessage``.

    ``fallback_message_id`` is prepended as a ``Message-ID:`` header when the message has none, so the
    message can be found in the destination again after a crash. It must be deterministic for one POP3
    message (derive it from the account and UIDL), so a re-fetch produces the same bytes. With a
    ``stamp_key`` (the same kind of value) an ``X-Pop-Connector-Id:`` line goes first (see
    ``policies.recovery``): a destination that rewrites what it stores still keeps that header.
    """

    def __init__(
        self,
        uidl: str,
        fallback_message_id: str,
        *,
        memory_limit: int = SPOOL_MEMORY_LIMIT,
        stamp_key: str | None = None,
    ) -> None:
        self.uidl = uidl
        self._fallback_id = fallback_message_id
        self._stamp_key = stamp_key
        self._stamp: str | None = None
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=memory_limit)  # noqa: SIM115
        self._hash = hashlib.sha256()
        self._size = 0
        self._header_buf: bytearray | None = bytearray()
        self._headers = MessageHeaders(None, None, None)
        self._added = False
        self._closed = False
        self._header_sha256: str | None = None
        self._scanner = RepairScanner()

    def write(self, data: bytes) -> int:
        size = len(data)
        data = self._scanner.feed(data)
        if self._header_buf is not None:
            self._header_buf += data
            end = header_end(self._header_buf)
            if end >= 0:
                self._flush_headers(end)
            elif len(self._header_buf) > HEADER_PARSE_LIMIT:
                self._flush_headers(None)
            return size
        self._emit(data)
        return size

    def _emit(self, data: bytes | bytearray) -> None:
        if data:
            self._file.write(data)
            self._hash.update(data)
            self._size += len(data)

    def _flush_headers(self, end: int | None) -> None:
        """Parse the header section (or, when it never ended, its first HEADER_PARSE_LIMIT bytes), add a
        Message-ID if there is none, and start streaming."""
        buf = self._header_buf
        assert buf is not None
        self._header_buf = None
        ended = end is not None and end > 0
        if end is None:
            end = buf.rfind(b"\r\n", 0, HEADER_PARSE_LIMIT) + 2
        section = bytes(buf[:end])
        section_sha256 = hashlib.sha256(section).hexdigest()
        if ended:
            self._header_sha256 = section_sha256
        self._headers = parse_headers(section)
        if self._stamp_key is not None:
            message_id = self._headers.message_id or self._fallback_id
            self._stamp = delivery_stamp(self._stamp_key, message_id, section_sha256)
            self._emit(stamp_header_line(self._stamp))
        if self._headers.message_id is None:
            self._emit(b"Message-ID: " + self._fallback_id.encode("ascii") + b"\r\n")
            self._added = True
        self._emit(buf)

    def finish(self, *, line_endings_repaired: bool = False) -> FetchedMessage:
        """Close the sink and hand over the spooled message (positioned at its start).
        ``line_endings_repaired``: whether the POP3 client had to repair the body's line endings
        (``Streamed.repaired``), recorded with the spool's own repairs."""
        if self._header_buf is not None:
            # The whole message was header section (no blank line): parse what there is.
            self._flush_headers(None)
        self._scanner.finish()
        self._file.seek(0)
        message_id = self._fallback_id if self._added else (self._headers.message_id or self._fallback_id)
        return FetchedMessage(
            uidl=self.uidl,
            spool=self._file,
            size=self._size,
            sha256=self._hash.hexdigest(),
            headers=self._headers,
            message_id=message_id,
            message_id_added=self._added,
            header_sha256=self._header_sha256,
            repairs=describe_repairs(line_endings_repaired, self._scanner.nul_removed),
            long_lines=self._scanner.long_lines,
            stamp=self._stamp,
        )

    def abort(self) -> None:
        self._file.close()


def fallback_message_id(account: str, pop_host: str, username: str, uidl: str) -> str:
    """A stable Message-ID for a message that has none: the same POP3 message always gets the same one."""
    digest = hashlib.sha256(f"{account}\0{pop_host}\0{username}\0{uidl}".encode()).hexdigest()[:32]
    host = pop_host.strip("[]") or "localhost"
    return f"<pop-connector.{digest}@{host}>"


def stamp_key(account: str, pop_host: str, username: str) -> str:
    """What a message's stamp is derived from, apart from its header section: the account (not the UIDL,
    so that a message whose UIDL changed, in a host migration, is still recognised)."""
    return hashlib.sha256(f"stamp\0{account}\0{pop_host}\0{username}".encode()).hexdigest()
