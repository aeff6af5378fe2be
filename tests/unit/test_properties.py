"""Property-based tests (hypothesis): no input makes the parsers raise anything but the project's errors.

Extends the properties in test_pop3_replies.py (status/listing parsers, error mapping, line unstuffing)
to listing joins, secret redaction, capability accessors, whole-message dot-unstuffing, header dates, the
message spool and configuration parsing.
"""

from __future__ import annotations

import contextlib
import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from connector.config import RoutingDefault, RoutingPolicy, RoutingRule, load_config, parse_config
from connector.errors import ConfigError, SourceProtocolError
from connector.message import MessageSpool, parse_header_date, parse_headers, received_date
from connector.policies.routing import route
from connector.pop3.replies import (
    ListEntry,
    UidlEntry,
    error_for,
    is_terminator,
    join_listings,
    parse_capabilities,
    parse_status,
)
from connector.pop3.wire import BodyDecoder
from tests.servers.scripted_pop3 import crlf_lines, dot_stuffed

# --- POP3 replies -------------------------------------------------------------------------------------


@given(
    # The listing parsers already refuse duplicate numbers; the join gets unique ones.
    uidls=st.lists(
        st.builds(UidlEntry, st.integers(-2, 20), st.text(max_size=5)),
        max_size=12,
        unique_by=lambda e: e.number,
    ),
    sizes=st.lists(
        st.builds(ListEntry, st.integers(-2, 20), st.integers(-5, 10**12)),
        max_size=12,
        unique_by=lambda e: e.number,
    ),
)
def test_join_listings_raises_only_protocol_errors(uidls: list[UidlEntry], sizes: list[ListEntry]) -> None:
    try:
        joined = join_listings(uidls, sizes)
    except SourceProtocolError:
        return
    assert sorted(info.number for info in joined) == sorted(entry.number for entry in sizes)


_secret = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=4, max_size=24)


@given(
    secret=_secret,
    before=st.binary(max_size=40),
    after=st.binary(max_size=40),
    verb=st.sampled_from(["USER", "PASS", "APOP", "AUTH", "GREETING"]),
)
def test_a_secret_echoed_by_the_server_never_reaches_the_error(
    secret: str, before: bytes, after: bytes, verb: str
) -> None:
    assume(secret not in f"server greeting {verb} failed: -ERR ****")  # not a secret, the template
    line = b"-ERR " + before.replace(b"\n", b"") + secret.encode() + after.replace(b"\n", b"") + b"\r\n"
    try:
        reply = parse_status(line)
    except SourceProtocolError as exc:
        assert secret not in str(exc)
        return
    assert secret not in str(error_for(verb, reply, secrets=(secret,)))


@given(st.lists(st.binary(max_size=60).filter(lambda line: b"\n" not in line), max_size=12))
def test_capability_accessors_never_raise(lines: list[bytes]) -> None:
    try:
        capabilities = parse_capabilities(lines)
    except SourceProtocolError:
        return
    for name in ("LOGIN-DELAY", "EXPIRE", "SASL", "IMPLEMENTATION", "PIPELINING"):
        capabilities.has(name)
        capabilities.args(name)
    for value in (
        capabilities.login_delay,
        capabilities.expire,
        capabilities.expire_never,
        capabilities.sasl_mechanisms,
        capabilities.implementation,
    ):
        assert value is None or isinstance(value, int | bool | str | tuple)


def _readline_pieces(wire: bytes, limit: int) -> list[bytes]:
    """What ``readline(limit)`` hands the client: lines ending in LF, cut into pieces of ``limit``."""
    pieces = []
    for line in wire.splitlines(keepends=True):
        pieces.extend(line[i : i + limit] for i in range(0, len(line), limit))
    return pieces


@given(
    content=st.binary(max_size=400)
    | st.lists(st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"x", b"\0", b".\r\n"])).map(b"".join),
    limit=st.integers(min_value=3, max_value=9),  # the client reads 64 KiB: a terminator is never split
)
def test_dot_unstuffing_of_whole_messages(content: bytes, limit: int) -> None:
    """Whatever the message, a server that stuffs it correctly gets it back as the canonical form."""
    wire = dot_stuffed(crlf_lines(content))
    decoder = BodyDecoder()
    output = b""
    for piece in _readline_pieces(wire, limit):
        if decoder.at_line_start and is_terminator(piece):
            break
        output += decoder.feed(piece)
    output += decoder.finish()
    # Line breaks become CRLF, a bare CR becomes CRLF too (README: "What changes in a delivered message").
    assert output == b"".join(line.replace(b"\r", b"\r\n") + b"\r\n" for line in crlf_lines(content))


@given(
    st.text(max_size=80)
    | st.from_regex(r"[A-Za-z]{3}, \d{1,2} [A-Za-z]{3} -?\d{1,6} [\d:]{1,12} ?[-+A-Z0-9]{0,6}")
)
def test_header_dates_are_none_or_aware(text: str) -> None:
    for parsed in (parse_header_date(text), received_date(text), received_date("from x; " + text)):
        assert parsed is None or (isinstance(parsed, datetime) and parsed.tzinfo is not None)


# --- message spool ------------------------------------------------------------------------------------

_header_bytes = st.lists(
    st.sampled_from(
        [b"Message-ID: <a@b>", b"Message-ID:", b"Message-Id: \xff\xfe", b"Date: x", b"Date: Mon, 1 Jan 99999",
         b"Received: ; ", b"Received: a; Tue, 03 Jun 2025 08:00:05 +0000", b" folded", b"\tfolded",
         b"X: \0", b"No colon", b"", b"\r", b":", b"=?utf-8?q?=FF?="]
    ),
    max_size=12,
).map(b"\r\n".join)  # fmt: skip


@given(
    data=st.binary(max_size=300) | _header_bytes.map(lambda h: h + b"\r\n\r\nbody\r\n"),
    chunk=st.integers(1, 50),
)
def test_spool_keeps_the_message_and_hashes_what_it_keeps(data: bytes, chunk: int) -> None:
    spool = MessageSpool("u", "<fallback@x>", memory_limit=64)
    for start in range(0, len(data), chunk):
        spool.write(data[start : start + chunk])
    with spool.finish() as message:
        stored = message.read_bytes()
    expected = (b"Message-ID: <fallback@x>\r\n" + data) if message.message_id_added else data
    # Every byte is kept, except NUL where the message repair (policies work) removes it.
    assert stored in (expected, expected.replace(b"\0", b""))
    assert message.size == len(stored) and message.sha256 == hashlib.sha256(stored).hexdigest()
    assert message.message_id
    parse_headers(data)  # and the parser alone never raises either


# --- configuration ------------------------------------------------------------------------------------

_FIELDS = [
    "service", "defaults", "destinations", "accounts", "name", "type", "host", "port", "tls", "tls_verify",
    "ca_file", "username", "password", "destination", "retention", "mode", "days", "retry", "max_attempts",
    "initial_backoff", "max_backoff", "timeout", "poll_interval", "poll_jitter", "database", "max_workers",
    "env", "file", "auth", "folder", "enabled", "destination_username", "destination_password", "bogus",
]  # fmt: skip
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["imap", "delete", "days", "1h", "-5s", "none", "starttls", "x", "", "/nonexistent"])
)
_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=6),
    max_leaves=30,
)


@given(st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=5), _values, max_size=6))
def test_parse_config_raises_only_config_errors(data: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(data, Path("/tmp/hypothesis.toml"))


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_load_config_of_any_file_raises_only_config_errors(tmp_path_factory: Any, raw: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "config.toml"
    path.write_bytes(raw)
    with contextlib.suppress(ConfigError):
        load_config(path)


# --- catch-all routing --------------------------------------------------------------------------------

_ROUTING = RoutingPolicy(
    rules=[
        RoutingRule(match="alice@example.org", mailbox="alice@corp.example"),
        RoutingRule(match="*@sales.example.org", mailbox="sales@corp.example"),
    ],
    default=RoutingDefault(mailbox="postmaster@corp.example"),
)
_ROUTING_HEADER_NAMES = st.sampled_from([b"Delivered-To", b"X-Original-To", b"To", b"Cc", b"Envelope-To"])


@given(
    st.lists(
        st.tuples(
            _ROUTING_HEADER_NAMES,
            st.binary(max_size=120)
            | st.from_regex(rb"[ -~]{0,20}(alice@example\.org|bob@sales\.example\.org)[ -~,<>\"]{0,20}"),
        ),
        max_size=8,
    ),
    st.binary(max_size=60),
)
def test_routing_decides_for_any_header_bytes(headers: list[tuple[bytes, bytes]], junk: bytes) -> None:
    """Whatever the recipient headers hold (8-bit, folded, broken), routing never raises, never names a
    mailbox outside the table, never names one twice, and always decides (a default exists)."""
    section = b"".join(name + b": " + value.replace(b"\n", b" ") + b"\r\n" for name, value in headers)
    decision = route(section + junk + b"\r\n\r\n", _ROUTING)
    mailboxes = decision.mailboxes
    assert mailboxes and len(mailboxes) == len(set(mailboxes))
    assert set(mailboxes) <= {"alice@corp.example", "sales@corp.example", "postmaster@corp.example"}
