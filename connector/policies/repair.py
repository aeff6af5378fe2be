"""Message repair for IMAP destinations: what is changed in a message on its way, and how it is recorded.
Pure (the scanner keeps state across chunks but does no I/O).

* Bare LF or CR line endings become CRLF, and the last line ends with CRLF: done by the POP3 client while it
  decodes RETR (``pop3.client``); it tells whether it had to.
* NUL bytes are removed. IMAP forbids NUL in a message literal (RFC 3501 §4.3; only the BINARY extension
  allows it): servers refuse such an APPEND or, like Dovecot, store it and hand back 0x80 instead, so the
  delivered copy would not even match what was sent (and could not be found again after a crash).
* Lines longer than RFC 5322's 998 octets are left as they are: IMAP has no line length limit for APPEND,
  and re-wrapping would change the content (and break signatures). So they are no repair: they are counted
  (``FetchedMessage.long_lines``, logged at DEBUG), not recorded in ``messages.repairs``.
"""

from __future__ import annotations

from dataclasses import dataclass

RFC5322_LINE_LIMIT = 998


def remove_nul(data: bytes) -> tuple[bytes, int]:
    count = data.count(b"\0")
    return (data.replace(b"\0", b""), count) if count else (data, 0)


@dataclass
class RepairScanner:
    """Fed the decoded message (CRLF line endings) chunk by chunk."""

    nul_removed: int = 0
    long_lines: int = 0
    _partial: int = 0

    def feed(self, data: bytes) -> bytes:
        data, removed = remove_nul(data)
        self.nul_removed += removed
        lines = data.split(b"\n")
        for line in lines[:-1]:
            # Minus 1 for the CR before the LF (every line ends in CRLF by now).
            if self._partial + len(line) - 1 > RFC5322_LINE_LIMIT:
                self.long_lines += 1
            self._partial = 0
        self._partial += len(lines[-1])
        return data

    def finish(self) -> None:
        if self._partial > RFC5322_LINE_LIMIT:
            self.long_lines += 1
        self._partial = 0


def describe_repairs(line_endings: bool, nul_removed: int) -> str | None:
    """What the ledger records in ``messages.repairs``; None when the message went through unchanged."""
    parts = []
    if line_endings:
        parts.append("bare LF/CR line endings made CRLF")
    if nul_removed:
        parts.append(f"{nul_removed} NUL byte(s) removed (IMAP forbids them)")
    return "; ".join(parts) or None


def describe_long_lines(long_lines: int) -> str:
    """The DEBUG note about lines over the limit, which are delivered unchanged."""
    return f"{long_lines} line(s) over {RFC5322_LINE_LIMIT} octets left as they are (IMAP accepts them)"
