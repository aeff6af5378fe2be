"""The message spool: headers, dates, Message-ID and hashing, streamed in arbitrary chunks."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from connector.message import (
    HEADER_SECTION_LIMIT,
    MessageSpool,
    fallback_message_id,
    header_end,
    header_section,
    parse_header_date,
    parse_headers,
    received_date,
    spooled_header_section,
)

MESSAGE = (
    b"Received: from mx2.hosted.example by pop.hosted.example; Tue, 03 Jun 2025 10:00:05 +0200\r\n"
    b"Received: from sender.example by mx2.hosted.example; Tue, 03 Jun 2025 09:59:00 +0200\r\n"
    b"Date: Tue, 03 Jun 2025 07:58:00 +0000\r\n"
    b"Message-ID: <abc@sender.example>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"body line\r\n"
)


def spool_in_chunks(data: bytes, chunk: int, uidl: str = "u1") -> bytes:
    spool = MessageSpool(uidl, "<fallback@x>", memory_limit=64)
    for start in range(0, len(data), chunk):
        spool.write(data[start : start + chunk])
    with spool.finish() as message:
        return message.read_bytes()


@pytest.mark.parametrize("chunk", [1, 3, 17, 1000])
def test_content_is_unchanged_whatever_the_chunking(chunk: int) -> None:
    assert spool_in_chunks(MESSAGE, chunk) == MESSAGE


def test_headers_and_arrival_time() -> None:
    spool = MessageSpool("u1", "<fallback@x>")
    spool.write(MESSAGE)
    message = spool.finish()
    assert message.message_id == "<abc@sender.example>" and not message.message_id_added
    assert message.internal_date == datetime(2025, 6, 3, 8, 0, 5, tzinfo=UTC)
    assert message.size == len(MESSAGE)
    assert message.sha256 == hashlib.sha256(MESSAGE).hexdigest()
    assert b"".join(message.chunks(7)) == MESSAGE


def test_missing_message_id_is_added_at_the_top_and_hashed() -> None:
    body = b"Subject: no id\r\nDate: Tue, 03 Jun 2025 07:58:00 +0000\r\n\r\nhi\r\n"
    spool = MessageSpool("u1", "<pop-connector.1@x>")
    spool.write(body)
    message = spool.finish()
    expected = b"Message-ID: <pop-connector.1@x>\r\n" + body
    assert message.read_bytes() == expected
    assert message.message_id_added and message.message_id == "<pop-connector.1@x>"
    assert message.sha256 == hashlib.sha256(expected).hexdigest()
    assert message.internal_date == datetime(2025, 6, 3, 7, 58, tzinfo=UTC)


def test_headers_only_message_without_blank_line() -> None:
    spool = MessageSpool("u1", "<f@x>")
    spool.write(b"Message-ID: <only@x>\r\nSubject: s\r\n")
    message = spool.finish()
    assert message.message_id == "<only@x>"
    assert message.read_bytes() == b"Message-ID: <only@x>\r\nSubject: s\r\n"


def test_empty_message_gets_an_id() -> None:
    spool = MessageSpool("u1", "<f@x>")
    message = spool.finish()
    assert message.read_bytes() == b"Message-ID: <f@x>\r\n"


def test_eight_bit_headers_do_not_break_parsing() -> None:
    data = "Subject: Grüße aus Köln\r\nMessage-ID: <8bit@x>\r\n\r\nÄ\r\n".encode("latin-1")
    spool = MessageSpool("u1", "<f@x>")
    spool.write(data)
    message = spool.finish()
    assert message.message_id == "<8bit@x>" and message.read_bytes() == data


def test_no_dates_falls_back_to_fetch_time() -> None:
    spool = MessageSpool("u1", "<f@x>")
    spool.write(b"Subject: undated\r\n\r\n")
    message = spool.finish()
    assert message.headers.arrival_time is None
    assert abs(message.internal_date - datetime.now(UTC)) < timedelta(minutes=1)


def test_large_message_spills_to_disk_and_stays_intact() -> None:
    payload = MESSAGE + b"x" * 998 + b"\r\n"
    data = payload * 2000
    assert spool_in_chunks(data, 65536) == data


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "Tue, 03 Jun 2025 10:00:05 +0200",
            datetime(2025, 6, 3, 10, 0, 5, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("3 Jun 2025 10:00:05 GMT", datetime(2025, 6, 3, 10, 0, 5, tzinfo=UTC)),
        ("garbage", None),
        ("", None),
        ("Tue, 99 Foo 2025 99:99:99 +9999", None),
    ],
)
def test_parse_header_date(value: str, expected: datetime | None) -> None:
    assert parse_header_date(value) == expected


def test_received_date_uses_text_after_last_semicolon() -> None:
    assert received_date("from a (b; c) by d; Tue, 03 Jun 2025 10:00:05 +0000") == datetime(
        2025, 6, 3, 10, 0, 5, tzinfo=UTC
    )
    assert received_date("from a by b") is None


def test_newest_parsable_received_wins() -> None:
    headers = parse_headers(b"Received: junk; not a date\r\nReceived: x; 1 Jan 2024 00:00:00 +0000\r\n\r\n")
    assert headers.received == datetime(2024, 1, 1, tzinfo=UTC)


def test_fallback_message_id_is_stable_and_distinct() -> None:
    first = fallback_message_id("alice", "pop.example.net", "alice", "UID1")
    assert first == fallback_message_id("alice", "pop.example.net", "alice", "UID1")
    assert first != fallback_message_id("alice", "pop.example.net", "alice", "UID2")
    assert first.startswith("<pop-connector.") and first.endswith("@pop.example.net>")


# --- the header section -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (MESSAGE, MESSAGE[: MESSAGE.index(b"\r\n\r\n") + 4]),
        (b"Subject: a\r\n\r\nbody\r\n\r\nmore\r\n", b"Subject: a\r\n\r\n"),
        # No header at all: the blank line alone, not the body up to its first blank line.
        (b"\r\nbody: not a header\r\n\r\nmore\r\n", b"\r\n"),
        # No blank line: all of it is header section (TOP n 0 of a message without a body).
        (b"Subject: a\r\nFrom: b@x\r\n", b"Subject: a\r\nFrom: b@x\r\n"),
        (b"Subject: a", b"Subject: a"),
        (b"", b""),
    ],
)
def test_header_section_is_through_the_blank_line(data: bytes, expected: bytes) -> None:
    assert header_section(data) == expected
    assert header_end(data) == (
        len(expected) if expected.endswith(b"\r\n\r\n") or expected == b"\r\n" else -1
    )


def test_header_section_is_bounded() -> None:
    head = b"Subject: " + b"x" * 100 + b"\r\n\r\n"
    data = head + b"body\r\n"
    assert header_section(data, limit=50) == data[:50]
    assert header_end(data, limit=len(head) - 1) == -1
    assert header_section(data, limit=len(head)) == head  # a blank line ending at the limit is in
    assert header_section(data, limit=None) == head
    huge = b"X-Long: " + b"y" * (HEADER_SECTION_LIMIT + 10)
    assert header_section(huge) == huge[:HEADER_SECTION_LIMIT]
    assert header_section(huge, limit=None) == huge


def test_spooled_header_section_is_the_header_section_as_delivered() -> None:
    spool = MessageSpool("u1", "<fallback@x>", memory_limit=64, stamp_key="k")
    body = b"line\r\n\r\n" * 100_000  # blank lines in the body, across many chunks
    spool.write(b"Subject: no id\r\n\r\n" + body)
    with spool.finish() as message:
        section = spooled_header_section(message)
        stored = message.read_bytes()
        assert section == header_section(stored) and section.endswith(b"Subject: no id\r\n\r\n")
        assert section.startswith(message.stamp_line) and b"Message-ID: <fallback@x>\r\n" in section
        assert spooled_header_section(message, limit=20) == stored[:20]


def test_spooled_header_section_of_a_message_without_a_blank_line_is_bounded() -> None:
    spool = MessageSpool("u1", "<fallback@x>")
    spool.write(b"Message-ID: <a@x>\r\n" + b"X-Long: " + b"y" * (3 * 1024 * 1024))
    with spool.finish() as message:
        section = spooled_header_section(message)
        assert len(section) == HEADER_SECTION_LIMIT and section == message.read_bytes()[:HEADER_SECTION_LIMIT]


def test_the_spool_records_the_clients_line_ending_repair() -> None:
    for repaired, expected in [(False, None), (True, "bare LF/CR line endings made CRLF")]:
        spool = MessageSpool("u1", "<f@x>")
        spool.write(MESSAGE)
        with spool.finish(line_endings_repaired=repaired) as message:
            assert message.repairs == expected
