"""The pure POP3 reply parsers: typed results for good input, SourceProtocolError for anything else."""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
from connector.pop3 import replies
from connector.pop3.replies import (
    MAX_STATUS_LINE,
    Capabilities,
    ListEntry,
    MessageInfo,
    MessageList,
    Reply,
    UidlEntry,
    UidlParser,
    Unlisted,
    error_for,
    is_terminator,
    join_listings,
    parse_capabilities,
    parse_greeting,
    parse_list_block,
    parse_list_block_lenient,
    parse_list_line,
    parse_list_listing,
    parse_stat,
    parse_status,
    parse_uidl_block,
    parse_uidl_block_lenient,
    parse_uidl_line,
    parse_uidl_listing,
    printable,
    split_listing,
    uidl_set_of,
    uidls_not_in,
    uidls_of,
    unstuff_block,
    unstuff_line,
)

# --- status lines -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"+OK\r\n", Reply(True, None, "")),
        (b"+OK 2 320\r\n", Reply(True, None, "2 320")),
        (b"-ERR no such message\r\n", Reply(False, None, "no such message")),
        (b"-ERR [IN-USE] maildrop locked\r\n", Reply(False, "IN-USE", "maildrop locked")),
        (b"-ERR [sys/temp] try later\n", Reply(False, "SYS/TEMP", "try later")),
        (b"-ERR [AUTH]\r\n", Reply(False, "AUTH", "")),
        (b"+ok lower case", Reply(True, None, "lower case")),
        (b"-ERR not [A] code", Reply(False, None, "not [A] code")),
    ],
)
def test_parse_status(line: bytes, expected: Reply) -> None:
    assert parse_status(line) == expected


@pytest.mark.parametrize("line", [b"", b"\r\n", b"OK fine", b"+OKAY", b"-ERROR x", b"* 1 EXISTS", b"+"])
def test_parse_status_rejects_non_status(line: bytes) -> None:
    with pytest.raises(SourceProtocolError):
        parse_status(line)


def test_status_line_length_limit() -> None:
    assert parse_status(b"+OK " + b"x" * (MAX_STATUS_LINE - 4) + b"\r\n").ok
    with pytest.raises(SourceProtocolError, match="longer than"):
        parse_status(b"+OK " + b"x" * (MAX_STATUS_LINE - 3) + b"\r\n")


def test_status_text_is_printable_even_for_hostile_bytes() -> None:
    reply = parse_status(b"-ERR bad\x00\x1b[31m\xff\xfe text")
    assert reply.text.isprintable()
    assert "bad" in reply.text and "text" in reply.text


def test_printable_ascii_keeps_only_the_tab_among_control_characters() -> None:
    # The fast path for plain ASCII must give what the character-by-character one gives.
    for byte in range(128):
        expected = chr(byte) if chr(byte).isprintable() or byte == 9 else "?"
        assert printable(bytes([byte]) + b" ok") == expected + " ok"
    assert printable(b"caf\xc3\xa9\x07") == "caf\u00e9?"


def test_describe_round_trips_the_parts() -> None:
    assert Reply(False, "IN-USE", "locked").describe() == "-ERR [IN-USE] locked"
    assert Reply(True, None, "").describe() == "+OK"


# --- greeting -----------------------------------------------------------------------------------------------


def test_greeting_with_apop_timestamp() -> None:
    greeting = parse_greeting(b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n")
    assert greeting.reply.ok
    assert greeting.apop_timestamp == "<1896.697170952@dbc.mtview.ca.us>"


@pytest.mark.parametrize(
    "line", [b"+OK ready\r\n", b"+OK <no-at-sign>\r\n", b"+OK <a@b c>\r\n", b"+OK <\xff@x>\r\n"]
)
def test_greeting_without_usable_timestamp(line: bytes) -> None:
    assert parse_greeting(line).apop_timestamp is None


def test_error_greeting_is_parsed_not_raised() -> None:
    greeting = parse_greeting(b"-ERR [SYS/TEMP] too many connections\r\n")
    assert not greeting.reply.ok
    assert greeting.reply.code == "SYS/TEMP"


def test_greeting_timestamp_search_is_fast_on_hostile_input() -> None:
    # Quadratic backtracking here would take seconds; the regex must stay linear.
    line = b"+OK <" + b"@" * (MAX_STATUS_LINE - 10) + b"\r\n"
    assert parse_greeting(line).apop_timestamp is None


# --- CAPA ---------------------------------------------------------------------------------------------------


def test_parse_capabilities() -> None:
    caps = parse_capabilities(
        [
            b"TOP\r\n",
            b"uidl\r\n",
            b"SASL PLAIN login\r\n",
            b"LOGIN-DELAY 900\r\n",
            b"EXPIRE 30 USER\r\n",
            b"PIPELINING\r\n",
            b"IMPLEMENTATION Shlemazle Mail\r\n",
            b"\r\n",
        ]
    )
    assert caps.has("PIPELINING") and caps.has("pipelining") and "UIDL" in caps
    assert not caps.has("STLS")
    assert caps.login_delay == 900
    assert caps.expire == 30 and not caps.expire_never
    assert caps.sasl_mechanisms == ("PLAIN", "LOGIN")
    assert caps.implementation == "Shlemazle Mail"
    assert caps.args("EXPIRE") == ("30", "USER")
    assert hash(caps) == hash(Capabilities())


def test_capabilities_expire_never_and_absent_values() -> None:
    caps = parse_capabilities([b"EXPIRE NEVER", b"LOGIN-DELAY soon"])
    assert caps.expire is None and caps.expire_never
    assert caps.login_delay is None
    empty = Capabilities()
    assert empty.login_delay is None and empty.expire is None and not empty.expire_never
    assert empty.implementation is None and empty.sasl_mechanisms == ()


def test_first_capability_announcement_wins() -> None:
    assert parse_capabilities([b"EXPIRE 0", b"EXPIRE NEVER"]).expire == 0


def test_capability_name_must_be_ascii() -> None:
    with pytest.raises(SourceProtocolError):
        parse_capabilities([b"\xffTOP"])


def test_capability_arguments_may_be_8bit() -> None:
    caps = parse_capabilities([b"IMPLEMENTATION M\xc3\xbcller \xff"])
    assert caps.implementation is not None and caps.implementation.startswith("Müller")


# --- UIDL / LIST / STAT -------------------------------------------------------------------------------------


def test_parse_uidl_and_list_lines() -> None:
    assert parse_uidl_line(b"1 whqtswO00WBw418f9t5JxYwZ\r\n") == UidlEntry(1, "whqtswO00WBw418f9t5JxYwZ")
    assert parse_uidl_line(b"2  QhdPYR:00WBw1Ph7x7\n") == UidlEntry(2, "QhdPYR:00WBw1Ph7x7")
    assert parse_list_line(b"3 120\r\n") == ListEntry(3, 120)
    assert parse_list_line(b"3 120 extra info\r\n") == ListEntry(3, 120)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"1",
        b"1 a b",
        b"0 abc",
        b"-1 abc",
        b"x abc",
        b"1_0 abc",
        b"\xd9\xa1 abc",  # an Arabic-Indic digit: int() would accept it
        b"1 " + b"a" * 401,
        b"1 caf\xc3\xa9",
        b"9" * 19 + b" abc",
    ],
)
def test_malformed_uidl_lines(line: bytes) -> None:
    with pytest.raises(SourceProtocolError):
        parse_uidl_line(line)


@pytest.mark.parametrize("line", [b"", b"1", b"1 -5", b"1 12k", b"a 1", b"0 1", b"1 " + b"9" * 40])
def test_malformed_list_lines(line: bytes) -> None:
    with pytest.raises(SourceProtocolError):
        parse_list_line(line)


def test_listings_refuse_duplicate_numbers_but_pass_on_duplicate_ids() -> None:
    with pytest.raises(SourceProtocolError, match="twice"):
        parse_uidl_listing([b"1 a", b"1 b"])
    # The planner leaves messages sharing an id on the server and reports them.
    assert [e.uidl for e in parse_uidl_listing([b"1 a", b"2 a"])] == ["a", "a"]
    with pytest.raises(SourceProtocolError, match="twice"):
        parse_list_listing([b"1 10", b"1 20"])


def test_join_listings_keeps_server_order() -> None:
    uidls = parse_uidl_listing([b"1 a", b"3 c", b"4 d"])
    sizes = parse_list_listing([b"4 40", b"1 10", b"3 30"])
    assert join_listings(uidls, sizes) == [
        MessageInfo(1, "a", 10),
        MessageInfo(3, "c", 30),
        MessageInfo(4, "d", 40),
    ]


def test_join_listings_detects_disagreement() -> None:
    with pytest.raises(SourceProtocolError, match="not in LIST"):
        join_listings([UidlEntry(1, "a"), UidlEntry(2, "b")], [ListEntry(1, 10)])
    with pytest.raises(SourceProtocolError, match="not in UIDL"):
        join_listings([UidlEntry(1, "a")], [ListEntry(1, 10), ListEntry(2, 20)])


def test_parse_stat() -> None:
    assert parse_stat(Reply(True, None, "2 320")) == (2, 320)
    assert parse_stat(Reply(True, None, "0 0 more")) == (0, 0)
    for text in ("", "2", "two 320", "2 -1"):
        with pytest.raises(SourceProtocolError):
            parse_stat(Reply(True, None, text))


# --- multi-line helpers -------------------------------------------------------------------------------------


def test_terminator_and_unstuffing() -> None:
    assert is_terminator(b".\r\n") and is_terminator(b".\n")
    assert not is_terminator(b"..\r\n") and not is_terminator(b". \r\n") and not is_terminator(b".")
    assert unstuff_line(b"..\r\n") == b".\r\n"
    assert unstuff_line(b"...dots\r\n") == b"..dots\r\n"
    assert unstuff_line(b"plain\r\n") == b"plain\r\n"
    assert unstuff_line(b"") == b""


# --- error mapping ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "code", "expected"),
    [
        ("PASS", "IN-USE", SourceInUseError),
        ("USER", "LOGIN-DELAY", SourceLoginDelayError),
        ("STAT", "SYS/TEMP", SourceTempError),
        ("RETR", "SYS/TEMP/DISK", SourceTempError),
        ("PASS", "SYS/PERM", SourcePermError),
        ("APOP", "AUTH", SourceAuthError),
        ("USER", None, SourceAuthError),
        ("PASS", None, SourceAuthError),
        ("APOP", None, SourceAuthError),
        ("RETR", None, SourceMessageError),
        ("TOP", None, SourceMessageError),
        ("DELE", None, SourcePermError),
        ("STAT", "UNKNOWN-CODE", SourcePermError),
        ("RETR", "SYSTEM", SourceMessageError),
        ("QUIT", "SYS/PERM", SourceTempError),
        ("GREETING", None, SourceTempError),
    ],
)
def test_error_for(command: str, code: str | None, expected: type[SourceError]) -> None:
    error = error_for(command, Reply(False, code, "server says no"), peer="pop.example:110")
    assert type(error) is expected
    assert command.upper() in str(error) or command == "GREETING"
    assert "server says no" in str(error)
    assert "pop.example:110" in str(error)


def test_error_for_cuts_out_secrets() -> None:
    error = error_for("PASS", Reply(False, None, "bad password hunter2"), secrets=("hunter2", ""))
    assert "hunter2" not in str(error)
    assert "****" in str(error)


# --- properties: hostile bytes only ever produce SourceProtocolError ----------------------------------------

_PARSERS: list[Callable[[bytes], object]] = [
    parse_status,
    parse_greeting,
    parse_uidl_line,
    parse_list_line,
    unstuff_line,
    is_terminator,
    lambda data: parse_capabilities(data.split(b"\n")),
    lambda data: parse_uidl_listing(data.split(b"\n")),
    lambda data: parse_list_listing(data.split(b"\n")),
    lambda data: parse_stat(parse_status(data)),
]

_pop3ish = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.sampled_from(
            [b"+OK", b"-ERR", b" ", b"[", b"]", b"<", b">", b"@", b"1", b"0", b"9" * 30, b"\xff"]
        ),
        max_size=30,
    ).map(b"".join),
)


@pytest.mark.parametrize("parser", _PARSERS)
@given(data=_pop3ish)
def test_parsers_raise_only_protocol_errors(parser: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(SourceProtocolError):
        parser(data)


@given(
    verb=st.sampled_from(["USER", "PASS", "APOP", "RETR", "TOP", "DELE", "QUIT", "STAT", "GREETING"]),
    line=st.binary(max_size=200),
)
def test_any_error_reply_maps_to_a_source_error(verb: str, line: bytes) -> None:
    try:
        reply = parse_status(b"-ERR " + line)
    except SourceProtocolError:
        return
    assert isinstance(error_for(verb, reply), SourceError)


@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), max_size=10))
def test_unstuffing_undoes_stuffing(lines: list[bytes]) -> None:
    for line in lines:
        stuffed = b"." + line if line.startswith(b".") else line
        assert unstuff_line(stuffed + b"\r\n") == line + b"\r\n"


_uidl_lines = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=10**6),
        st.text(alphabet=st.characters(min_codepoint=0x1F, max_codepoint=0x7F), min_size=0, max_size=72),
        st.sampled_from([b" ", b"  ", b"\t"]),
        st.sampled_from([b"\r\n", b"\n", b" \r\n"]),
    ),
    max_size=20,
).map(lambda rows: [str(number).encode() + gap + uidl.encode() + end for number, uidl, gap, end in rows])


@given(_uidl_lines)
def test_uidl_listing_bulk_parser_agrees_with_the_line_parser(lines: list[bytes]) -> None:
    try:
        entries = [parse_uidl_line(line) for line in lines]
        expected: object = ([e.number for e in entries], [e.uidl for e in entries])
    except SourceProtocolError:
        expected = SourceProtocolError
    try:
        got: object = replies._bulk_uidl(b"".join(lines))
    except SourceProtocolError:  # pragma: no cover - the bulk parser never raises
        got = SourceProtocolError
    if got is not None:
        assert got == expected


@given(_uidl_lines)
def test_uidl_block_parser_agrees_with_the_listing_parser(lines: list[bytes]) -> None:
    try:
        expected: object = [(e.number, e.uidl, 0) for e in parse_uidl_listing(lines)]
    except SourceProtocolError:
        expected = SourceProtocolError
    try:
        got: object = [tuple(info) for info in parse_uidl_block(b"".join(lines))]
    except SourceProtocolError:
        got = SourceProtocolError
    assert got == expected


def test_uidl_block_gives_message_infos_of_size_zero() -> None:
    infos = parse_uidl_block(b"1 a\r\n 2\tb \r\n3 c\n")
    assert infos == [MessageInfo(1, "a", 0), MessageInfo(2, "b", 0), MessageInfo(3, "c", 0)]
    assert all(type(info) is MessageInfo for info in infos)
    assert parse_uidl_block(b"") == []


def test_a_parsed_uidl_listing_keeps_no_tracked_object_per_message() -> None:
    # Issue 16: 100,000 MessageInfo tuples kept for a poll set off a full garbage collection at every poll
    # (CPython never untracks a tuple subclass); the listing keeps columns and builds entries as read.
    block = b"".join(b"%d uid-%d\r\n" % (n, n) for n in range(1, 5001))
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        listing = parse_uidl_block(block)
        kept = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert len(listing) == 5000 and listing[4999] == MessageInfo(5000, "uid-5000", 0)
    assert kept < 50


@given(
    _uidl_lines,
    st.lists(st.integers(min_value=0, max_value=40), max_size=6),
    st.frozensets(st.sampled_from(["a", "b", "uid-1", "uid-2", "x"])),
)
def test_uidl_parser_fed_in_pieces_agrees_with_the_block_parser(
    lines: list[bytes], cuts: list[int], kept: frozenset[str]
) -> None:
    block = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    parser = UidlParser(apart_from=kept)
    start = 0
    for cut in sorted(cuts):
        # Pieces as the client's reader cuts them: at line ends, except when a piece ends mid-line.
        end = block.find(b"\n", start + cut)
        end = len(block) if end < 0 else end + (cut % 2)
        parser.feed(block[start:end])
        start = max(start, end)
    parser.feed(block[start:])
    listing, unlisted = parser.finish(block)
    assert (listing, unlisted) == parse_uidl_block_lenient(block)
    # The sets it built while fed (issue 16) are those of the listing it gives.
    assert uidl_set_of(listing) == set(uidls_of(listing))
    assert uidls_not_in(listing, kept) == set(uidls_of(listing)) - kept


def test_a_message_list_reads_like_the_list_it_replaces() -> None:
    listing = parse_uidl_block(b"1 a\r\n2 b\r\n3 a\r\n")
    entries = [MessageInfo(1, "a", 0), MessageInfo(2, "b", 0), MessageInfo(3, "a", 0)]
    assert isinstance(listing, MessageList)
    assert listing == entries and entries == listing and listing == tuple(entries)
    assert listing != entries[:2] and listing != [*entries[:2], MessageInfo(3, "a", 7)]
    assert list(listing) == entries and listing[1] == entries[1] and listing[-1] == entries[-1]
    assert listing[1:] == entries[1:] and len(listing) == 3
    assert all(type(info) is MessageInfo for info in listing)
    assert list(uidls_of(listing)) == ["a", "b", "a"] and uidl_set_of(listing) == {"a", "b"}
    assert list(uidls_of(entries)) == ["a", "b", "a"] and uidl_set_of(entries) == {"a", "b"}
    assert MessageInfo(2, "b", 0) in listing and listing.index(entries[2]) == 2
    with pytest.raises(IndexError):
        listing[3]
    with pytest.raises(TypeError):
        hash(listing)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (b"1 a\r\n0 b\r\n", "message number 0"),
        (b"1 a\r\n2 b c\r\n", "malformed UIDL line"),
        (b"1 a\r\n1 b\r\n", "twice"),
        (b"1 a\r\n2 " + b"x" * 401 + b"\r\n", "invalid unique-id"),
    ],
)
def test_uidl_block_refuses_what_the_line_parser_refuses(block: bytes, match: str) -> None:
    with pytest.raises(SourceProtocolError, match=match):
        parse_uidl_block(block)


@given(st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), max_size=10))
def test_block_helpers_agree_with_the_line_helpers(lines: list[bytes]) -> None:
    block = b"".join(line + b"\n" for line in lines)
    assert split_listing(block) == [line + b"\n" for line in lines]
    assert unstuff_block(block) == b"".join(unstuff_line(line + b"\n") for line in lines)
    assert parse_list_block(b"1 10\r\n2 20\r\n") == [ListEntry(1, 10), ListEntry(2, 20)]


# --- one malformed line (issue 11.7) ------------------------------------------------------------------------


def test_lenient_uidl_listing_leaves_out_bad_lines_only() -> None:
    block = (
        b"1 a\r\n2 "
        + b"x" * 401
        + b"\r\n3 c\r\nx4 d\r\n5 e f\r\n6 f\r\n6 g\r\n0 h\r\n7 "
        + b"y" * 400
        + b"\r\n"
    )
    infos, unlisted = parse_uidl_block_lenient(block)
    assert infos == [MessageInfo(1, "a", 0), MessageInfo(3, "c", 0), MessageInfo(7, "y" * 400, 0)]
    assert [entry.number for entry in unlisted] == [2, None, 5, None, 6]
    assert "invalid unique-id" in unlisted[0].reason and "message 2" in unlisted[0].reason
    assert unlisted[-1].reason == "UIDL lists message 6 twice"


def test_lenient_uidl_listing_of_a_good_listing_has_nothing_unlisted() -> None:
    block = b"".join(b"%d uid-%d\r\n" % (n, n) for n in range(1, 1001))
    infos, unlisted = parse_uidl_block_lenient(block)
    assert unlisted == [] and infos == parse_uidl_block(block) and len(infos) == 1000


def test_lenient_list_listing() -> None:
    entries, unlisted = parse_list_block_lenient(b"1 10\r\n2 1O\r\n\xff\r\n4 40 extra\r\n")
    assert entries == [ListEntry(1, 10), ListEntry(4, 40)]
    assert unlisted == [
        Unlisted(2, "LIST line '2 1O': invalid message size '1O'"),
        Unlisted(None, "malformed LIST line '\ufffd'"),
    ]


def test_join_leaves_out_what_either_listing_had_wrong() -> None:
    uidls = [UidlEntry(1, "a"), UidlEntry(2, "b"), UidlEntry(3, "c")]
    sizes = [ListEntry(1, 10), ListEntry(3, 30)]
    assert join_listings(uidls, sizes, [Unlisted(2, "bad size")]) == [
        MessageInfo(1, "a", 10),
        MessageInfo(3, "c", 30),
    ]
    # A UIDL line whose number could not be read: the message only LIST has is that one, left out.
    assert join_listings(uidls[:2], [*sizes, ListEntry(2, 20)][1:], [Unlisted(None, "x")]) == [
        MessageInfo(2, "b", 20)
    ]
    # Without a bad line, disagreeing listings are still the server contradicting itself.
    with pytest.raises(SourceProtocolError, match="not in LIST"):
        join_listings(uidls, sizes, [Unlisted(3, "bad")])


@given(_uidl_lines)
def test_lenient_uidl_parser_agrees_with_the_line_parser(lines: list[bytes]) -> None:
    infos, unlisted = parse_uidl_block_lenient(b"".join(lines))
    good = []
    for line in lines:
        with contextlib.suppress(SourceProtocolError):
            good.append(parse_uidl_line(line))
    counts = Counter(entry.number for entry in good)
    assert [(i.number, i.uidl) for i in infos] == [(e.number, e.uidl) for e in good if counts[e.number] == 1]
    assert len(unlisted) == len(lines) - len(good) + sum(1 for count in counts.values() if count > 1)


@given(data=_pop3ish)
def test_lenient_parsers_never_raise(data: bytes) -> None:
    parse_uidl_block_lenient(data + b"\n")
    parse_list_block_lenient(data + b"\n")
