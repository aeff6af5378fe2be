"""What "delivered exactly once, byte for byte" means, as assertions shared by the fault and crash suites.

README, "What changes in a delivered message": line endings become CRLF, the message ends with CRLF, every
message gets ``X-Pop-Connector-Id: HASH`` as its first line (the crash-recovery stamp, policies.recovery),
and a message without Message-ID gets ``Message-ID: <pop-connector.HASH@HOST>`` right after it. NUL bytes,
which IMAP cannot carry, arrive as 0x80 (what this branch's IMAP destination and Dovecot do) or not at all
(the message repair of the policies work removes them): both are accepted.
"""

from __future__ import annotations

import re
from collections import Counter

_ADDED_ID = re.compile(rb"\AMessage-ID: <pop-connector\.[0-9a-f]{32}@[^>\r\n]+>\r\n")
STAMP_LINE = re.compile(rb"\AX-Pop-Connector-Id: ([0-9a-f]{32})\r\n")


def normalised(original: bytes) -> bytes:
    """The original with the line endings the connector delivers (CRLF, ending with CRLF)."""
    text = original.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return text if text.endswith(b"\r\n") or not text else text + b"\r\n"


def without_stamp(delivered: bytes) -> bytes:
    """The delivered bytes without the connector's stamp line (a no-op on bytes without one)."""
    return STAMP_LINE.sub(b"", delivered, count=1)


def stamp_of(delivered: bytes) -> str | None:
    match = STAMP_LINE.match(delivered)
    return match.group(1).decode("ascii") if match else None


def without_added_id(delivered: bytes) -> bytes:
    return _ADDED_ID.sub(b"", without_stamp(delivered), count=1)


def match_deliveries(originals: list[bytes], delivered: list[bytes]) -> Counter[int]:
    """How many times each original (by index) is in ``delivered``; fails on anything unexplained.
    Identical originals share their deliveries, one each before any gets a second."""
    wanted: dict[bytes, list[int]] = {}
    for index, message in enumerate(originals):
        canonical = normalised(message)
        for form in {canonical, canonical.replace(b"\0", b"\x80"), canonical.replace(b"\0", b"")}:
            wanted.setdefault(form, []).append(index)
    counts: Counter[int] = Counter()
    for body in delivered:
        indexes = wanted.get(without_stamp(body)) or wanted.get(without_added_id(body))
        assert indexes is not None, f"a delivered message matches no original: {body[:200]!r}"
        counts[min(indexes, key=lambda i: counts[i])] += 1
    return counts


def assert_at_most_once(originals: list[bytes], delivered: list[bytes]) -> Counter[int]:
    counts = match_deliveries(originals, delivered)
    twice = {index: n for index, n in counts.items() if n > 1}
    assert not twice, f"delivered more than once (original index: times): {twice}"
    return counts


def assert_exactly_once(originals: list[bytes], delivered: list[bytes]) -> None:
    counts = assert_at_most_once(originals, delivered)
    missing = [index for index in range(len(originals)) if counts[index] == 0]
    assert not missing, f"never delivered (original index): {missing}"


def assert_nothing_lost(originals: list[bytes], delivered: list[bytes], on_server: list[bytes]) -> None:
    """Every original is in the destination or still on the POP3 server (or both)."""
    counts = match_deliveries(originals, delivered)
    left = {normalised(message) for message in on_server}
    lost = [i for i, m in enumerate(originals) if counts[i] == 0 and normalised(m) not in left]
    assert not lost, f"neither delivered nor on the server any more (original index): {lost}"
