"""Writes the hostile-message corpus (tests/corpus/*.eml). The files are committed; this script documents
how each was made and regenerates them: ``python -m tests.corpus.make_corpus``.

Each file is the message as the hosted POP3 server stores it. Names say what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

_H = (
    b"Received: from mx.hosted.example by pop.hosted.example; Tue, 03 Jun 2025 08:00:05 +0000\r\n"
    b"From: Sender <sender@example.net>\r\nTo: alice@example.net\r\n"
    b"Date: Tue, 03 Jun 2025 07:58:00 +0000\r\n"
)


def _msg(name: str, body: bytes = b"Body.\r\n", *, mid: bool = True, extra: bytes = b"") -> bytes:
    message_id = f"Message-ID: <corpus-{name}@example.net>\r\n".encode() if mid else b""
    return _H + message_id + extra + f"Subject: corpus {name}\r\n\r\n".encode() + body


def corpus() -> dict[str, bytes]:
    folded = b"X-Huge: " + b"\r\n\t".join(b"h" * 70 for _ in range(15_000)) + b"\r\n"
    many = b"".join(f"X-Filler-{i}: {'v' * 60}\r\n".encode() for i in range(15_000))
    boundary = b'Content-Type: multipart/mixed; boundary="b1"\r\nMIME-Version: 1.0\r\n'
    return {
        "no-final-crlf": _msg("no-final-crlf", b"last line without line break"),
        "bare-lf": _msg("bare-lf").replace(b"\r\n", b"\n") + b"line two\nline three\n",
        "bare-cr": _msg("bare-cr", b"one\rtwo\rthree\r\n"),
        "mixed-line-endings": _msg("mixed", b"crlf\r\nlf\ncr\rcrlf again\r\n\n\r\r\n"),
        "nul-in-body": _msg("nul-in-body", b"before\0after\r\n\0\0\0\r\n"),
        "nul-in-header": _msg("nul-in-header", extra=b"X-Nul: a\0b\r\n"),
        "line-10000-chars": _msg("line-10000", b"a" * 10_000 + b"\r\n"),
        "line-200000-chars": _msg("line-200000", b"b" * 200_000 + b"\r\n"),
        "header-1mb-folded": _msg("header-1mb-folded", extra=folded),
        "header-section-1mb": _msg("header-section-1mb", extra=many),
        "header-line-1mb": _msg("header-line-1mb", extra=b"X-Line: " + b"L" * 1_050_000 + b"\r\n"),
        "no-headers": b"\r\nA body and nothing else.\r\n",
        "no-headers-no-blank": b"Just text, no header, no blank line\r\nsecond line\r\n",
        "headers-only-no-body": _H + b"Message-ID: <corpus-headers-only@example.net>\r\nSubject: x\r\n",
        "empty": b"",
        "only-crlf": b"\r\n",
        "invalid-utf8": _msg(
            "invalid-utf8",
            b"\xc3\x28 \xa0\xa1 \xf0\x28\x8c\xbc \xff\xfe\r\n",
            extra=b"Content-Type: text/plain; charset=utf-8\r\n",
        ),
        "mixed-charsets": _msg(
            "mixed-charsets",
            "caf\u00e9 ".encode("latin-1") + "\u65e5\u672c".encode() + b"\r\n",
            extra=b"Content-Type: text/plain; charset=us-ascii\r\n",
        ),
        "8bit-utf8-headers": _msg(
            "8bit-utf8",
            extra="Subject-8bit: gr\u00fc\u00dfe \u2603\r\n".encode()
            + "Reply-To: J\u00fcrgen <j@example.net>\r\n".encode(),
        ),
        "8bit-latin1-headers": _msg(
            "8bit-latin1", extra="X-Name: J\u00fcrgen M\u00fcller\r\n".encode("latin-1")
        ),
        "unknown-charset": _msg(
            "unknown-charset",
            b"=?x-klingon?q?=FF=FE?=\r\n",
            extra=b"Subject-Enc: =?x-klingon?q?=FF=FE?=\r\nContent-Type: text/plain; charset=x-klingon\r\n",
        ),
        "broken-mime-boundary": _msg(
            "broken-boundary", b"--b1\r\nContent-Type: text/plain\r\n\r\npart\r\n--b2\r\n", extra=boundary
        ),
        "mime-without-boundary-param": _msg(
            "mime-no-param",
            b"--x\r\n\r\n--x--\r\n",
            extra=b"Content-Type: multipart/mixed\r\nMIME-Version: 1.0\r\n",
        ),
        "mime-garbage-nesting": _msg(
            "mime-nesting",
            b'--b1\r\nContent-Type: multipart/alternative; boundary="b1"\r\n'
            b"\r\n--b1\r\n--b1--\r\n--b1--\r\n--b1--\r\n",
            extra=boundary,
        ),
        "base64-garbage": _msg(
            "base64-garbage",
            b"!!!! not base64 ====\r\n\x01\x02\r\n",
            extra=b"Content-Transfer-Encoding: base64\r\n",
        ),
        "malformed-date": _H.replace(
            b"Date: Tue, 03 Jun 2025 07:58:00 +0000", b"Date: the 32nd of Smarch, 20x5"
        )
        + b"Message-ID: <corpus-bad-date@example.net>\r\n\r\nbody\r\n",
        "missing-date": _H.replace(b"Date: Tue, 03 Jun 2025 07:58:00 +0000\r\n", b"")
        + b"Message-ID: <corpus-no-date@example.net>\r\n\r\nbody\r\n",
        "date-year-9999": _msg("y9999").replace(b"2025 07:58", b"9999 07:58"),
        "date-year-1901": _msg("y1901").replace(b"Jun 2025 07:58", b"Jun 1901 07:58"),
        "date-huge-offset": _msg("offset").replace(b"07:58:00 +0000", b"07:58:00 +9999"),
        "malformed-received": _msg("bad-received").replace(
            b"; Tue, 03 Jun 2025 08:00:05 +0000", b" no semicolon here"
        ),
        "received-garbage-date": _msg("received-garbage").replace(
            b"Tue, 03 Jun 2025 08:00:05", b"yesterday-ish"
        ),
        "many-received": b"".join(b"Received: by hop%d; junk %d\r\n" % (i, i) for i in range(2_000))
        + _msg("many-received"),
        "missing-message-id": _msg("missing-mid", mid=False),
        "malformed-message-id": _msg("bad-mid", mid=False, extra=b"Message-ID: not an id at all\r\n"),
        "empty-message-id": _msg("empty-mid", mid=False, extra=b"Message-ID:\r\n"),
        "two-message-ids": _msg("two-mids", extra=b"Message-ID: <second@example.net>\r\n"),
        "8bit-message-id": _msg(
            "8bit-mid", mid=False, extra="Message-ID: <m\u00fc@ex\u00e4mple>\r\n".encode()
        ),
        "message-id-5000-chars": _msg(
            "long-mid", mid=False, extra=b"Message-ID: <" + b"m" * 5000 + b"@x>\r\n"
        ),
        "message-id-with-quotes": _msg("quote-mid", mid=False, extra=b'Message-ID: <"a\\"b c"@x>\r\n'),
        "lines-of-dots": _msg("dots", b".\r\n..\r\n. \r\n...\r\n.\r\n"),
        "dot-crlf-dot-inside": _msg("dot-crlf", b"text\r\n.\r\nmore text after a lone dot\r\n.\r\n"),
        "header-without-colon": _msg("no-colon", extra=b"This is not a header\r\n"),
        "control-chars": _msg(
            "ctrl", b"\x1b[31mred\x1b[0m\x07\x08\x0b\x0c\r\n", extra=b"X-Ctrl: \x1b\x07\r\n"
        ),
        "utf16-bom": b"\xff\xfe" + "Subject: utf16\r\n\r\nbody\r\n".encode("utf-16-le"),
        "starts-with-space": b" folded-first-line: x\r\n" + _msg("space-first"),
    }


def main() -> None:
    for name, data in corpus().items():
        (HERE / f"{name}.eml").write_bytes(data)


if __name__ == "__main__":
    main()
