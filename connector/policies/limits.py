"""Limits and selection: which listed messages a poll fetches, and how an oversized one is handled.
Pure functions.

``skip``: an oversized message is quarantined with its reason without being downloaded (the LIST size
decides). ``headers_only``: its header section (``TOP n 0``) is delivered with a short note as the body,
and the message itself stays on the POP3 server whatever the retention, since only there is it whole.
Above the hard ceiling (``message_size_ceiling``, policies/sizes.py) a message is always skipped.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from connector.config import DEFAULT_MESSAGE_SIZE_CEILING, Account
from connector.message import header_section
from connector.policies.sizes import ceiling_reason, over_ceiling

OversizeAction = Literal["skip", "headers_only"]

# Header fields that describe the original body; the note that replaces it is plain text.
_BODY_FIELDS = re.compile(rb"^(content-[a-z-]+|mime-version)\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    max_message_size: int | None = None
    oversize: OversizeAction = "skip"
    max_messages_per_poll: int = 0
    ceiling: int = DEFAULT_MESSAGE_SIZE_CEILING

    @classmethod
    def of(cls, account: Account) -> Limits:
        return cls(
            account.max_message_size,
            account.oversize,
            account.max_messages_per_poll,
            account.message_size_ceiling,
        )

    def oversize_action(self, size: int) -> OversizeAction | None:
        """What to do with a message of ``size`` octets (the LIST size); None when it is within limits."""
        if over_ceiling(size, self.ceiling):
            return "skip"
        if self.max_message_size is None or size <= self.max_message_size:
            return None
        return self.oversize

    def skip_reason(self, size: int) -> str:
        if over_ceiling(size, self.ceiling):
            return ceiling_reason(size, self.ceiling)
        return f"{size} bytes is over max_message_size ({self.max_message_size}); not downloaded"


def needs_baseline(start: str, baseline_taken: bool, known: Collection[str]) -> bool:
    """``start = "new"``: the first poll of an account records what is on the server as already seen.
    Only for an account the ledger knows nothing about, so that switching an existing account to "new"
    never hides mail that is already being delivered."""
    return start == "new" and not baseline_taken and not known


def headers_only_message(top: bytes, size: int, limit: int) -> bytes:
    """The message delivered instead of an oversized one: its headers (from ``TOP n 0``) minus those
    describing the body, and a plain-text note. Deterministic, so crash recovery finds it again."""
    kept: list[bytes] = []
    dropping = False
    for line in header_section(top).split(b"\r\n"):  # the blank line is dropped with empty lines
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):  # a continuation belongs to the field before it
            if not dropping:
                kept.append(line)
            continue
        dropping = _BODY_FIELDS.match(line) is not None
        if not dropping:
            kept.append(line)
    note = (
        f"This message was {size} bytes, more than the {limit} bytes allowed (max_message_size).\r\n"
        "Only its header was imported; the whole message was left on the POP3 server.\r\n"
    )
    extra = [
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=us-ascii",
        f"X-POP-Connector-Headers-Only: original size {size} bytes".encode(),
    ]
    return b"\r\n".join(kept + extra) + b"\r\n\r\n" + note.encode("ascii")
