"""Test messages, with CRLF line endings as a POP3 server sends them."""

from __future__ import annotations


def simple(
    n: int, *, size: int = 0, message_id: bool = True, date: str = "Tue, 03 Jun 2025 07:58:00 +0000"
) -> bytes:
    headers = [
        f"Received: from mx.hosted.example by pop.hosted.example; Tue, 03 Jun 2025 08:{n % 60:02d}:05 +0000",
        "From: Sender <sender@example.net>",
        "To: alice@example.net",
        f"Subject: test message {n}",
        f"Date: {date}",
    ]
    if message_id:
        headers.append(f"Message-ID: <msg{n}@example.net>")
    body = f"Body of message {n}.\r\n"
    if size:
        line = ("x" * 76) + "\r\n"
        body += line * max(1, (size - len(body)) // len(line))
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()
