"""The crash-recovery matching rule (connector.policies.recovery) and the stamp the spool puts first."""

from __future__ import annotations

import hashlib

import pytest

from connector.message import FetchedMessage, MessageSpool, fallback_message_id, stamp_key
from connector.policies.recovery import (
    Stored,
    Verdict,
    Wanted,
    by_bytes,
    delivery_stamp,
    judge,
    stamp_header_line,
    stamps_in,
)

OURS = "0123456789abcdef0123456789abcdef"
THEIRS = "fedcba9876543210fedcba9876543210"
WANTED = Wanted(stamp=OURS, unstamped_size=1000)
KEY = stamp_key("alice", "pop.example", "alice@example")


def spooled(raw: bytes, uidl: str = "U1", key: str | None = KEY) -> FetchedMessage:
    spool = MessageSpool(
        uidl, fallback_message_id("alice", "pop.example", "alice@example", uidl), stamp_key=key
    )
    spool.write(raw)
    return spool.finish()


def message(
    subject: str = "hello", body: str = "body", *, message_id: str | None = "<same@example>"
) -> bytes:
    mid = f"Message-ID: {message_id}\r\n" if message_id else ""
    return (
        "Received: from mx by pop; Tue, 03 Jun 2025 08:15:05 +0000\r\n"
        "Date: Tue, 03 Jun 2025 07:58:00 +0000\r\n"
        f"{mid}Subject: {subject}\r\n\r\n{body}\r\n"
    ).encode()


# --- judge: what decides ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 1234, None])
def test_our_stamp_decides_whatever_the_server_did_to_the_bytes(size: int | None) -> None:
    assert judge(WANTED, Stored((OURS,), size)) is Verdict.SAME


@pytest.mark.parametrize("size", [1000, 1234])
def test_another_stamp_is_another_message_even_at_our_size(size: int) -> None:
    assert judge(WANTED, Stored((THEIRS,), size)) is Verdict.OTHER


def test_ours_among_several_stamps_is_ours() -> None:
    # A message that arrived with a stamp of its own (relayed from another connector) gets ours on top.
    assert judge(WANTED, Stored((THEIRS, OURS), 5)) is Verdict.SAME


def test_an_unstamped_copy_of_another_size_is_another_message() -> None:
    assert judge(WANTED, Stored((), 999)) is Verdict.OTHER
    assert judge(WANTED, Stored((), None)) is Verdict.OTHER  # FETCH did not say: never "ours"


def test_an_unstamped_copy_of_our_size_is_decided_by_its_bytes() -> None:
    assert judge(WANTED, Stored((), 1000)) is Verdict.COMPARE_BYTES
    assert by_bytes("a" * 64, "a" * 64) is Verdict.SAME
    assert by_bytes("a" * 64, "b" * 64) is Verdict.OTHER
    assert by_bytes("a" * 64, None) is Verdict.OTHER  # expunged while we looked


def test_a_message_without_stamp_never_takes_a_stamped_copy() -> None:
    unstamped = Wanted(stamp=None, unstamped_size=1000)
    assert judge(unstamped, Stored((OURS,), 1000)) is Verdict.OTHER


# --- stamps_in: reading the stamp back ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "stamps"),
    [
        (b"X-Pop-Connector-Id: " + OURS.encode() + b"\r\n\r\n", (OURS,)),
        (b"x-pop-connector-id:" + OURS.upper().encode() + b"\n\n", (OURS,)),  # case, no space, bare LF
        (b"X-Pop-Connector-Id:\r\n  " + OURS.encode() + b"\r\n\r\n", (OURS,)),  # folded by the server
        # A continuation line that followed our header in the original (corpus starts-with-space).
        (b"X-Pop-Connector-Id: " + OURS.encode() + b"\r\n folded-first-line: x\r\n\r\n", (OURS,)),
        (
            b"X-Pop-Connector-Id: " + THEIRS.encode() + b"\r\nX-Pop-Connector-Id: " + OURS.encode(),
            (THEIRS, OURS),
        ),
        (b"X-Pop-Connector-Id: " + OURS.encode() + b"0\r\n", ()),  # 33 hex digits: not a stamp
        (b"X-Pop-Connector-Id: not-a-stamp\r\n", ()),
        (b"\r\n", ()),
        (b"", ()),
    ],
)
def test_stamps_in(fields: bytes, stamps: tuple[str, ...]) -> None:
    assert stamps_in(fields) == stamps


# --- the stamp itself --------------------------------------------------------------------------------------


def test_the_stamp_is_the_first_line_and_is_counted_in_size_and_hash() -> None:
    raw = message()
    with spooled(raw) as fetched:
        data = fetched.read_bytes()
        assert fetched.stamp is not None and data == stamp_header_line(fetched.stamp) + raw
        assert fetched.stamp_line == stamp_header_line(fetched.stamp)
        assert (fetched.size, fetched.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert stamps_in(data.split(b"\r\n\r\n")[0]) == (fetched.stamp,)


def test_the_same_message_fetched_again_gets_the_same_stamp_also_under_a_new_uidl() -> None:
    with spooled(message()) as first, spooled(message()) as again, spooled(message(), "MIGRATED") as moved:
        assert first.stamp == again.stamp == moved.stamp


def test_two_messages_with_one_message_id_and_one_date_get_different_stamps() -> None:
    with spooled(message(subject="one")) as one, spooled(message(subject="two"), "U2") as two:
        assert (one.message_id, one.internal_date) == (two.message_id, two.internal_date)
        assert one.stamp != two.stamp


def test_messages_without_message_id_or_headers_get_a_stamp_per_uidl() -> None:
    # Their added Message-ID is made from the UIDL; alike header sections must not share a stamp.
    bare = b"\r\njust a body\r\n"
    with spooled(bare, "U1") as one, spooled(bare, "U2") as two:
        assert one.message_id_added and one.stamp != two.stamp
        assert one.read_bytes().startswith(one.stamp_line + b"Message-ID: <pop-connector.")
    with spooled(message(message_id=None), "U1") as one, spooled(message(message_id=None), "U2") as two:
        assert one.stamp != two.stamp


def test_the_same_message_for_two_accounts_gets_two_stamps() -> None:
    other = stamp_key("bob", "pop.example", "bob@example")
    with spooled(message()) as alice, spooled(message(), key=other) as bob:
        assert alice.stamp != bob.stamp


def test_a_message_that_is_all_header_gets_a_stamp_from_all_of_it() -> None:
    with spooled(b"Subject: a\r\nX: 1\r\n") as one, spooled(b"Subject: a\r\nX: 2\r\n") as two:
        assert one.stamp is not None and one.stamp != two.stamp


def test_without_a_stamp_key_the_message_is_unchanged() -> None:
    raw = message()
    with spooled(raw, key=None) as fetched:
        assert (fetched.stamp, fetched.stamp_line, fetched.read_bytes()) == (None, b"", raw)


def test_delivery_stamp_depends_on_each_part() -> None:
    base = delivery_stamp("k", "<id@x>", "h")
    assert len(base) == 32 and int(base, 16) >= 0
    assert len({base, delivery_stamp("k2", "<id@x>", "h"), delivery_stamp("k", "<id@y>", "h")}) == 3
    assert delivery_stamp("k", "<id@x>", "h2") != base
