"""Benchmark messages: plausible headers, text lines (some starting with '.', to exercise dot-stuffing)."""

from __future__ import annotations

_LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor inc.\r\n"
_DOT_LINE = b".. a line that starts with a dot, stuffed on the wire.\r\n"


def message(n: int, size: int) -> bytes:
    """Message ``n`` of about ``size`` bytes (CRLF line endings; at least the header section)."""
    header = (
        "Received: from mx.hosted.example by pop.hosted.example;"
        f" Tue, 03 Jun 2025 08:{n % 60:02d}:05 +0000\r\n"
        "From: Sender <sender@example.net>\r\n"
        "To: alice@example.net\r\n"
        f"Subject: benchmark message {n}\r\n"
        "Date: Tue, 03 Jun 2025 07:58:00 +0000\r\n"
        f"Message-ID: <bench{n}@example.net>\r\n"
        "\r\n"
    ).encode()
    lines = max(1, (size - len(header)) // len(_LINE))
    body = b"".join(_DOT_LINE if i % 50 == 7 else _LINE for i in range(lines))
    return header + body


def messages(count: int, size: int) -> list[bytes]:
    return [message(n, size) for n in range(count)]
