"""Message repair: NUL bytes, over-long lines, bare line endings, and what the ledger is told."""

from __future__ import annotations

import io
import socket

from connector.message import MessageSpool
from connector.policies.repair import RFC5322_LINE_LIMIT, RepairScanner, describe_repairs
from connector.pop3 import Pop3Client


def test_scanner_removes_nul_and_counts_long_lines_across_chunks() -> None:
    scanner = RepairScanner()
    long_line = b"x" * (RFC5322_LINE_LIMIT + 1) + b"\r\n"
    exact = b"y" * RFC5322_LINE_LIMIT + b"\r\n"
    data = b"Subject: a\r\n\r\nnul\0here\r\n" + long_line + exact + long_line[:-2]
    out = b"".join(scanner.feed(data[i : i + 7]) for i in range(0, len(data), 7))
    scanner.finish()
    assert out == data.replace(b"\0", b"")
    assert (scanner.nul_removed, scanner.long_lines) == (1, 2)


def test_describe_repairs() -> None:
    assert describe_repairs(False, 0) is None
    text = describe_repairs(True, 3) or ""
    assert "CRLF" in text and "3 NUL" in text


def test_long_lines_are_counted_but_are_no_repair() -> None:
    # Delivered as they are: nothing for messages.repairs (nor an INFO line), only a count.
    spool = MessageSpool("u", "<f@x>")
    spool.write(b"Subject: a\r\nMessage-ID: <a@x>\r\n\r\n" + b"x" * (RFC5322_LINE_LIMIT + 1) + b"\r\n")
    with spool.finish() as fetched:
        assert (fetched.repairs, fetched.long_lines) == (None, 1)


def test_spool_records_repairs_and_hashes_what_is_delivered() -> None:
    spool = MessageSpool("u", "<f@x>")
    spool.write(b"Subject: a\r\nMessage-ID: <a@x>\r\n\r\nbo\0dy\r\n")
    with spool.finish(line_endings_repaired=True) as fetched:
        assert fetched.read_bytes() == b"Subject: a\r\nMessage-ID: <a@x>\r\n\r\nbody\r\n"
        assert fetched.size == len(fetched.read_bytes())
        assert fetched.repairs is not None and "1 NUL" in fetched.repairs and "CRLF" in fetched.repairs


def _client_reading(wire: bytes) -> tuple[Pop3Client, socket.socket]:
    """A client whose server has already sent ``wire`` (after the greeting and a refused CAPA)."""
    server, client = socket.socketpair()
    server.sendall(b"+OK ready\r\n-ERR no CAPA\r\n" + wire)
    return Pop3Client(client, peer="test"), server


def test_client_says_when_it_repaired_line_endings() -> None:
    pop, server = _client_reading(
        b"+OK\r\nSubject: a\n\nbare\rcr\r\n.\r\n+OK\r\nSubject: b\r\n\r\nfine\r\n.\r\n"
    )
    body = io.BytesIO()
    assert pop.retr(1, body).repaired and body.getvalue() == b"Subject: a\r\n\r\nbare\r\ncr\r\n"
    assert not pop.retr(2, io.BytesIO()).repaired
    pop.close()
    server.close()
