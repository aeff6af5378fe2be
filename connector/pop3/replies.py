"""Pure parsers for POP3 replies (RFC 1939, RFC 2449 CAPA, RFC 3206 response codes).

Every function here takes bytes (or an already parsed ``Reply``) and either returns a small frozen value
or raises ``SourceProtocolError``. Nothing else may escape, whatever a hostile server sends: the client
relies on that to turn every oddity into one retryable error type.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import partial
from itertools import filterfalse, repeat
from types import MappingProxyType
from typing import NamedTuple, overload

from connector.errors import (
    SourceAuthError,
    SourceError,
    SourceInUseError,
    SourceLoginDelayError,
    SourceMessageError,
    SourcePermError,
    SourceProtocolError,
    SourceTempError,
)

# RFC 2449 caps responses at 512 octets; real servers stay far below. The bound is generous so that a
# chatty server still works, yet a server that never sends a line ending cannot exhaust memory.
MAX_STATUS_LINE = 8 * 1024
# RFC 1939 §7: a unique-id is 1 to 70 characters in 0x21..0x7E.
MAX_UIDL_LENGTH = 70
# What is accepted: some servers send longer unique-ids, otherwise valid and stable, and refusing them would
# leave their messages on the server for ever. The ledger's column holds 512 characters; this leaves room
# for the forms policies.uidl builds from a unique-id ("<uidl>/hdr:<64 hex>", then " #<copy>").
MAX_ACCEPTED_UIDL_LENGTH = 400
# Message numbers and sizes are bounded so a hostile number cannot reach int()'s digit limit.
_MAX_NUMBER_DIGITS = 18

_CODE_RE = re.compile(rb"\[([\x21-\x5a\x5c\x5e-\x7e]+)\]")
# The part before "@" excludes "@" itself so that the match is linear on hostile input.
_TIMESTAMP_RE = re.compile(rb"<[\x21-\x3b\x3d\x3f\x41-\x7e]*@[\x21-\x3b\x3d\x3f-\x7e]*>")
_DIGITS_RE = re.compile(rb"[0-9]{1,%d}" % _MAX_NUMBER_DIGITS)
_CAPA_NAME_RE = re.compile(rb"[\x21-\x7e]+")
# What ``printable`` replaces in ASCII text: control characters other than the tab.
_CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_UIDL_RE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_ACCEPTED_UIDL_LENGTH)
# A whole UIDL reply body whose every line is well-formed: optional blanks around the two words (as
# bytes.split() allows), each line ending in LF. No groups: checking 100,000 lines creates no object per line.
# Possessive quantifiers (a quarter of the time): each part's characters cannot start the next part, so
# giving some back could never make a match.
_UIDL_BLOCK_RE = re.compile(
    rb"(?:[ \t\x0b\x0c]*+[0-9]{1,%d}+[ \t\x0b\x0c]++[\x21-\x7e]{1,%d}+[ \t\x0b\x0c\r]*+\n)*+"
    % (_MAX_NUMBER_DIGITS, MAX_ACCEPTED_UIDL_LENGTH)
)


@dataclass(frozen=True)
class Reply:
    """A status line: ``+OK``/``-ERR``, the RFC 2449 response code if any, and the human text."""

    ok: bool
    code: str | None
    text: str

    def describe(self) -> str:
        """The reply as a server would have written it, safe to put in an error message."""
        status = "+OK" if self.ok else "-ERR"
        parts = [status]
        if self.code is not None:
            parts.append(f"[{self.code}]")
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True)
class Greeting:
    reply: Reply
    apop_timestamp: str | None


class UidlEntry(NamedTuple):
    number: int
    uidl: str


class ListEntry(NamedTuple):
    number: int
    size: int


class MessageInfo(NamedTuple):
    number: int
    uidl: str
    size: int


class Unlisted(NamedTuple):
    """A listing line the connector could not take in. Its message (``number``, None when the number itself
    was unreadable) is left on the server and reported; the rest of the listing is used."""

    number: int | None
    reason: str


# Builds a MessageInfo from a (number, uidl, size) tuple without running Python code (MessageInfo(...) and
# MessageInfo._make do): a listing may hold 100,000 of them at every poll.
_message_info = partial(tuple.__new__, MessageInfo)


class MessageList(Sequence[MessageInfo]):
    """A UIDL listing in server order, held as two columns (message numbers, unique-ids); every size is 0.

    Each ``MessageInfo`` is built when it is read and freed once used. Kept as 100,000 tuples, a maildrop's
    listing was 100,000 objects for the garbage collector to track (CPython never untracks a tuple
    subclass), and building them set off a full collection (~50 ms) at every poll. Checks that need only
    the unique-ids read ``uidls`` (a list) and ``uidl_set`` (built once, at its first use).
    """

    __slots__ = ("_not_in", "_numbers", "_uidl_set", "uidls")

    def __init__(
        self,
        numbers: list[int],
        uidls: list[str],
        *,
        uidl_set: Set[str] | None = None,
        not_in: tuple[Set[str], Set[str]] | None = None,
    ) -> None:
        """``uidl_set`` and ``not_in`` (a set, and the unique-ids it lacks), when the caller built them
        already: ``UidlParser`` does, piece by piece, while the server sends the rest of the listing."""
        if len(numbers) != len(uidls):
            raise ValueError("a listing needs one unique-id per message number")
        self._numbers = numbers
        self.uidls: Sequence[str] = uidls
        self._uidl_set = uidl_set
        # The last ``not_in`` asked: (the set it was asked for, the answer).
        self._not_in = not_in

    @property
    def uidl_set(self) -> Set[str]:
        if self._uidl_set is None:
            self._uidl_set = frozenset(self.uidls)
        return self._uidl_set

    def not_in(self, known: Set[str]) -> Set[str]:
        """The unique-ids listed that ``known`` lacks; computed once for the same ``known`` (the identity
        checks and the plan each ask it of the ledger's kept messages)."""
        if self._not_in is None or self._not_in[0] is not known:
            self._not_in = (known, self.uidl_set - known)
        return self._not_in[1]

    def __len__(self) -> int:
        return len(self._numbers)

    def __iter__(self) -> Iterator[MessageInfo]:
        return map(_message_info, zip(self._numbers, self.uidls, repeat(0)))

    @overload
    def __getitem__(self, index: int) -> MessageInfo: ...

    @overload
    def __getitem__(self, index: slice) -> list[MessageInfo]: ...

    def __getitem__(self, index: int | slice) -> MessageInfo | list[MessageInfo]:
        if isinstance(index, slice):
            return list(map(_message_info, zip(self._numbers[index], self.uidls[index], repeat(0))))
        return _message_info((self._numbers[index], self.uidls[index], 0))

    def __eq__(self, other: object) -> bool:
        # Equal to a list (or tuple) of the same entries, as the list it replaces was.
        if isinstance(other, MessageList | list | tuple):
            return len(self) == len(other) and all(map(operator.eq, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which cannot be hashed

    def __repr__(self) -> str:
        return f"MessageList({list(self)!r})"


def uidls_of(listing: Sequence[MessageInfo]) -> Sequence[str]:
    """The unique-ids of ``listing`` in its order (of a ``MessageList``: without building a MessageInfo)."""
    if isinstance(listing, MessageList):
        return listing.uidls
    return [info.uidl for info in listing]


def uidls_not_in(listing: Sequence[MessageInfo], known: Set[str]) -> Set[str]:
    """The unique-ids of ``listing`` that ``known`` lacks: for a maildrop that keeps its mail, the few new
    ones. One set difference per ``MessageList`` and ``known`` however many checks ask (of two sets of
    100,000 UIDLs it costs ~4 ms, and the identity checks and the plan all need it)."""
    if isinstance(listing, MessageList):
        return listing.not_in(known)
    return {info.uidl for info in listing if info.uidl not in known}


def uidl_set_of(listing: Sequence[MessageInfo]) -> Set[str]:
    """The unique-ids of ``listing`` as a set, built once per ``MessageList`` however many checks ask."""
    if isinstance(listing, MessageList):
        return listing.uidl_set
    return {info.uidl for info in listing}


@dataclass(frozen=True)
class Capabilities:
    """What CAPA announced: upper-case capability name -> its arguments, in the server's spelling."""

    # A read-only mapping cannot be hashed; leaving it out of the hash keeps the dataclass hashable.
    entries: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def has(self, name: str) -> bool:
        return name.upper() in self.entries

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.has(name)

    def args(self, name: str) -> tuple[str, ...]:
        return self.entries.get(name.upper(), ())

    @property
    def login_delay(self) -> int | None:
        """Minimum seconds between logins (``LOGIN-DELAY n``), or None when not announced."""
        return _first_int(self.args("LOGIN-DELAY"))

    @property
    def expire(self) -> int | None:
        """Days the server keeps retrieved messages (``EXPIRE n``); 0 means it deletes them on RETR.

        None when not announced or ``NEVER``: see ``expire_never`` to tell these apart.
        """
        return _first_int(self.args("EXPIRE"))

    @property
    def expire_never(self) -> bool:
        values = self.args("EXPIRE")
        return bool(values) and values[0].upper() == "NEVER"

    @property
    def sasl_mechanisms(self) -> tuple[str, ...]:
        return tuple(mechanism.upper() for mechanism in self.args("SASL"))

    @property
    def implementation(self) -> str | None:
        values = self.args("IMPLEMENTATION")
        return " ".join(values) if values else None


def _first_int(values: tuple[str, ...]) -> int | None:
    # Arguments were decoded from bytes, so ASCII digits are checked explicitly: str.isdigit() would
    # also accept other scripts' digits, which int() then rejects or misreads.
    if values and _DIGITS_RE.fullmatch(values[0].encode("utf-8", "replace")):
        return int(values[0])
    return None


def printable(data: bytes) -> str:
    """Server text for messages and logs: never raises, control characters made visible."""
    if data.isascii() and _CONTROL_RE.search(data) is None:
        # Nearly every reply: printable ASCII (and tabs) as it is, without a look at each character.
        return data.decode("ascii")
    decoded = data.decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in decoded)


def strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def parse_status(line: bytes) -> Reply:
    """Parse ``+OK text`` or ``-ERR [CODE] text`` (line ending optional)."""
    body = strip_eol(line)
    if len(body) > MAX_STATUS_LINE:
        raise SourceProtocolError(f"status line longer than {MAX_STATUS_LINE} bytes")
    upper = body[:4].upper()
    if upper.startswith(b"+OK"):
        ok, rest = True, body[3:]
    elif upper == b"-ERR":
        ok, rest = False, body[4:]
    else:
        raise SourceProtocolError(f"expected +OK or -ERR, got {printable(body[:80])!r}")
    # "+OKAY" is not "+OK": the status must end at a space or the end of the line.
    if rest and rest[:1] not in (b" ", b"\t"):
        raise SourceProtocolError(f"expected +OK or -ERR, got {printable(body[:80])!r}")
    rest = rest.strip(b" \t")
    code: str | None = None
    match = _CODE_RE.match(rest)
    if match is not None:
        code = match.group(1).decode("ascii").upper()
        rest = rest[match.end() :].lstrip(b" \t")
    return Reply(ok=ok, code=code, text=printable(rest))


def parse_greeting(line: bytes) -> Greeting:
    """The status line plus the APOP timestamp ``<...@...>`` if the server offers APOP."""
    reply = parse_status(line)
    match = _TIMESTAMP_RE.search(strip_eol(line))
    timestamp = match.group(0).decode("ascii") if match is not None else None
    return Greeting(reply=reply, apop_timestamp=timestamp)


def parse_capabilities(lines: Iterable[bytes]) -> Capabilities:
    """The lines of a CAPA reply (terminator removed, already unstuffed)."""
    entries: dict[str, tuple[str, ...]] = {}
    for line in lines:
        words = strip_eol(line).split()
        if not words:
            continue  # a blank line carries no capability; not worth failing the session over
        name = words[0]
        if _CAPA_NAME_RE.fullmatch(name) is None:
            raise SourceProtocolError(f"invalid capability name {printable(name[:80])!r}")
        # The first announcement wins so that a later duplicate cannot change what was negotiated.
        entries.setdefault(name.decode("ascii").upper(), tuple(printable(word) for word in words[1:]))
    return Capabilities(MappingProxyType(entries))


def _number(token: bytes, what: str) -> int:
    if _DIGITS_RE.fullmatch(token) is None:
        raise SourceProtocolError(f"invalid {what} {printable(token[:80])!r}")
    return int(token)


def _message_number(token: bytes) -> int:
    number = _number(token, "message number")
    if number < 1:
        raise SourceProtocolError("message number 0 in listing")
    return number


def parse_uidl_line(line: bytes) -> UidlEntry:
    """``n uidl`` from a UIDL listing (or the text of a single-message UIDL reply)."""
    words = strip_eol(line).split()
    if len(words) != 2:
        raise SourceProtocolError(f"malformed UIDL line {printable(strip_eol(line)[:80])!r}")
    number = _message_number(words[0])
    if _UIDL_RE.fullmatch(words[1]) is None:
        raise SourceProtocolError(f"invalid unique-id {printable(words[1][:80])!r} for message {number}")
    return UidlEntry(number=number, uidl=words[1].decode("ascii"))


def parse_list_line(line: bytes) -> ListEntry:
    """``n size`` from a LIST listing; RFC 1939 lets servers append more information, which is ignored."""
    words = strip_eol(line).split()
    if len(words) < 2:
        raise SourceProtocolError(f"malformed LIST line {printable(strip_eol(line)[:80])!r}")
    return ListEntry(number=_message_number(words[0]), size=_number(words[1], "message size"))


def split_listing(block: bytes) -> list[bytes]:
    """The lines of a multi-line reply body, each with its LF (a last line without one is kept as it is)."""
    lines = block.split(b"\n")
    last = lines.pop()
    return [line + b"\n" for line in lines] + ([last] if last else [])


def parse_uidl_listing(lines: Iterable[bytes]) -> list[UidlEntry]:
    """A whole UIDL reply body, line by line. Duplicate message numbers are refused (the listing is broken).

    A unique-id given to several messages is passed on: the poll planner leaves exactly those messages on
    the server and reports them, so one bad id does not stop the rest of the mailbox."""
    block = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    return [UidlEntry(info.number, info.uidl) for info in parse_uidl_block(block)]


def parse_uidl_block(block: bytes) -> MessageList:
    """A whole UIDL reply body (unstuffed, terminator removed, every line ending in LF) as one message per
    line, each of size 0 (UIDL gives none), in server order. As ``parse_uidl_listing`` for the rest, but
    built for a mailbox that lists 100,000 messages at every poll: no Python code runs per message."""
    infos, unlisted = parse_uidl_block_lenient(block)
    _refuse_unlisted(unlisted)
    return infos


def parse_uidl_block_lenient(block: bytes) -> tuple[MessageList, list[Unlisted]]:
    """As ``parse_uidl_block``, but a bad line (or a message number listed twice) does not fail the whole
    listing: it is returned as ``Unlisted`` and its message left out, so that one message the server lists
    wrongly stays on the server while the others are delivered. A well-formed listing takes the fast path;
    only one with a bad line is parsed line by line."""
    columns = _bulk_uidl(block)
    unlisted: list[Unlisted] = []
    if columns is None:
        numbers: list[int] = []
        uidls: list[str] = []
        for line in split_listing(block):
            try:
                entry = parse_uidl_line(line)
            except SourceProtocolError as exc:
                unlisted.append(unlisted_line("UIDL", line, exc))
                continue
            numbers.append(entry.number)
            uidls.append(entry.uidl)
        columns = numbers, uidls
    return _without_twice(*columns, unlisted)


def _without_twice(
    numbers: list[int], uidls: list[str], unlisted: list[Unlisted]
) -> tuple[MessageList, list[Unlisted]]:
    """The listing without the messages whose number is listed more than once (added to ``unlisted``)."""
    twice = _listed_twice(numbers, "UIDL", unlisted)
    if twice:
        kept = [index for index, number in enumerate(numbers) if number not in twice]
        numbers, uidls = [numbers[i] for i in kept], [uidls[i] for i in kept]
    return MessageList(numbers, uidls), unlisted


class UidlParser:
    """``parse_uidl_block_lenient`` fed piece by piece while the reply arrives, so that parsing a listing of
    100,000 lines overlaps the server sending it instead of following it.

    ``feed`` takes the pieces in order, unstuffed, each of whole lines ending in LF; a piece that is not
    (a line longer than a piece) or that has a line the fast path refuses stops the piecewise parse, and
    ``finish`` then parses the whole body as ``parse_uidl_block_lenient`` does. Either way the result is
    the same as ``parse_uidl_block_lenient`` of the whole body.
    """

    def __init__(self, apart_from: Set[str] | None = None) -> None:
        """``apart_from``: a set of unique-ids (the ledger's kept messages) for ``MessageList.not_in``."""
        self._numbers: list[int] = []
        self._uidls: list[str] = []
        self._in_step = True
        # Sets a poll checks the listing with, built piece by piece while the rest arrives (for 100,000
        # messages each takes some milliseconds; the server sends the listing more slowly than that).
        self._number_set: set[int] = set()
        self._uidl_set: set[str] = set()
        self._apart_from = apart_from
        self._not_in: set[str] = set()

    def feed(self, piece: bytes) -> None:
        if not self._in_step:
            return
        columns = _bulk_uidl(piece) if piece.endswith(b"\n") or not piece else None
        if columns is None:
            self._in_step = False
            return
        numbers, uidls = columns
        self._numbers += numbers
        self._uidls += uidls
        self._number_set.update(numbers)
        self._uidl_set.update(uidls)
        if self._apart_from is not None:
            self._not_in.update(filterfalse(self._apart_from.__contains__, uidls))

    def finish(self, block: bytes) -> tuple[MessageList, list[Unlisted]]:
        """The listing of ``block``, the whole body (unstuffed, terminator removed) the pieces made up."""
        if not self._in_step:
            return parse_uidl_block_lenient(block)
        if len(self._number_set) < len(self._numbers):  # a message number listed twice
            return _without_twice(self._numbers, self._uidls, [])
        apart = None if self._apart_from is None else (self._apart_from, self._not_in)
        return MessageList(self._numbers, self._uidls, uidl_set=self._uidl_set, not_in=apart), []


def _bulk_uidl(block: bytes) -> tuple[list[int], list[str]] | None:
    """The message numbers and unique-ids of a whole UIDL reply body, each line ending in LF; None unless
    every line is a well-formed entry, exactly as ``parse_uidl_line`` would accept it."""
    if _UIDL_BLOCK_RE.fullmatch(block) is None:
        return None
    # Only ASCII words and blanks are left, so the words alternate: number, unique-id, number, ...
    words = block.decode("ascii").split()
    numbers = list(map(int, words[0::2]))
    if min(numbers, default=1) < 1:
        return None
    return numbers, words[1::2]


def parse_list_listing(lines: Iterable[bytes]) -> list[ListEntry]:
    entries, unlisted = parse_list_listing_lenient(lines)
    _refuse_unlisted(unlisted)
    return entries


def parse_list_listing_lenient(lines: Iterable[bytes]) -> tuple[list[ListEntry], list[Unlisted]]:
    """As ``parse_list_listing``, a bad line returned as ``Unlisted`` instead of failing the listing (see
    ``parse_uidl_block_lenient``)."""
    entries: list[ListEntry] = []
    unlisted: list[Unlisted] = []
    for line in lines:
        try:
            entries.append(parse_list_line(line))
        except SourceProtocolError as exc:
            unlisted.append(unlisted_line("LIST", line, exc))
    twice = _listed_twice([entry.number for entry in entries], "LIST", unlisted)
    if twice:
        entries = [entry for entry in entries if entry.number not in twice]
    return entries, unlisted


def parse_list_block(block: bytes) -> list[ListEntry]:
    """A whole LIST reply body (unstuffed, terminator removed, every line ending in LF)."""
    return parse_list_listing(split_listing(block))


def parse_list_block_lenient(block: bytes) -> tuple[list[ListEntry], list[Unlisted]]:
    return parse_list_listing_lenient(split_listing(block))


def unlisted_line(command: str, line: bytes, exc: SourceProtocolError) -> Unlisted:
    """The ``Unlisted`` for a listing ``line`` that ``exc`` refused (its number, when it can be read)."""
    words = strip_eol(line).split()
    number: int | None = None
    if words and _DIGITS_RE.fullmatch(words[0]) is not None and int(words[0]) >= 1:
        number = int(words[0])
    quoted = repr(printable(strip_eol(line)[:80]))
    # "malformed UIDL line '...'" names the line already; "invalid message size '12k'" does not.
    return Unlisted(
        number, exc.message if quoted in exc.message else f"{command} line {quoted}: {exc.message}"
    )


def _listed_twice(numbers: Sequence[int], command: str, unlisted: list[Unlisted]) -> set[int]:
    """The message numbers listed more than once (each added to ``unlisted``): which line is right cannot
    be told, so the message is left alone."""
    if len(set(numbers)) == len(numbers):
        return set()
    twice = {number for number, count in Counter(numbers).items() if count > 1}
    unlisted.extend(Unlisted(number, f"{command} lists message {number} twice") for number in sorted(twice))
    return twice


def _refuse_unlisted(unlisted: Sequence[Unlisted]) -> None:
    if unlisted:
        raise SourceProtocolError(unlisted[0].reason)


def parse_stat(reply: Reply) -> tuple[int, int]:
    """``+OK count size`` -> (count, size)."""
    words = reply.text.encode("utf-8", "replace").split()
    if len(words) < 2:
        raise SourceProtocolError(f"malformed STAT reply {reply.text[:80]!r}")
    return _number(words[0], "message count"), _number(words[1], "maildrop size")


def join_listings(
    uidls: Iterable[UidlEntry] | Iterable[MessageInfo],
    sizes: Iterable[ListEntry],
    unlisted: Collection[Unlisted] = (),
) -> list[MessageInfo]:
    """Pair UIDL and LIST entries by message number, in UIDL (server) order (the sizes of ``uidls``, if
    any, are replaced).

    ``unlisted``: the lines either listing had wrong. Their messages are left out of the result (they stay
    on the server). When one of those lines had no readable message number, a message found in only one
    listing is left out too (it may be that line's); otherwise that is the server contradicting itself."""
    dropped = {entry.number for entry in unlisted}
    unreadable = None in dropped
    size_by_number = {entry.number: entry.size for entry in sizes}
    infos: list[MessageInfo] = []
    for entry in uidls:
        size = size_by_number.pop(entry.number, None)
        if dropped and entry.number in dropped:
            continue
        if size is None:
            if unreadable:
                continue
            raise SourceProtocolError(f"message {entry.number} is in UIDL but not in LIST")
        infos.append(MessageInfo(number=entry.number, uidl=entry.uidl, size=size))
    left = set(size_by_number) - dropped
    if left and not unreadable:
        raise SourceProtocolError(f"message {min(left)} is in LIST but not in UIDL")
    return infos


def is_terminator(line: bytes) -> bool:
    """The ``.`` line that ends a multi-line reply (a bare-LF variant is accepted from sloppy servers)."""
    return line in (b".\r\n", b".\n")


def unstuff_line(line: bytes) -> bytes:
    """Undo RFC 1939 byte-stuffing: a line starting with ``.`` loses that first dot.

    Check ``is_terminator`` first; this function treats the terminator as an ordinary stuffed line.
    """
    return line[1:] if line.startswith(b".") else line


def unstuff_block(block: bytes) -> bytes:
    """``unstuff_line`` for every line of a multi-line reply body at once (terminator removed)."""
    if block.startswith(b"."):
        block = block[1:]
    return block.replace(b"\n.", b"\n")


_AUTH_COMMANDS = frozenset({"USER", "PASS", "APOP", "AUTH"})
_MESSAGE_COMMANDS = frozenset({"RETR", "TOP"})
_CODE_ERRORS: tuple[tuple[str, type[SourceError]], ...] = (
    ("IN-USE", SourceInUseError),
    ("LOGIN-DELAY", SourceLoginDelayError),
    ("SYS/TEMP", SourceTempError),
    ("SYS/PERM", SourcePermError),
    ("AUTH", SourceAuthError),
)


def _error_type(command: str, code: str | None) -> type[SourceError]:
    if command == "QUIT":
        # RFC 1939 §6: a failed QUIT means the deletions were not made; whatever the code says, the
        # next session can try again.
        return SourceTempError
    if code is not None:
        for known, error_type in _CODE_ERRORS:
            # RFC 2449 codes are hierarchical: "SYS/TEMP/DISK" is still a SYS/TEMP.
            if code == known or code.startswith(known + "/"):
                return error_type
    if command in _AUTH_COMMANDS:
        return SourceAuthError
    if command in _MESSAGE_COMMANDS:
        return SourceMessageError
    if command == "GREETING":
        return SourceTempError  # a server refusing to greet is nearly always overloaded
    return SourcePermError


def error_for(
    command: str, reply: Reply, *, peer: str | None = None, secrets: Iterable[str] = ()
) -> SourceError:
    """The typed error for an ``-ERR`` reply to ``command`` (the verb only, never its arguments).

    ``secrets`` are cut out of the server's text, in case a server echoes what it was sent.
    """
    verb = command.upper()
    description = reply.describe()
    for secret in secrets:
        if secret:
            description = description.replace(secret, "****")
    subject = "server greeting" if verb == "GREETING" else verb
    prefix = f"{peer}: " if peer else ""
    return _error_type(verb, reply.code)(f"{prefix}{subject} failed: {description}")
