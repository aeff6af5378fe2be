"""What the sync engine needs from a destination, whatever protocol it speaks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from connector.message import FetchedMessage

SERVER_TEXT_LIMIT = 400


def clip_server_text(text: str, limit: int = SERVER_TEXT_LIMIT) -> str:
    """A server's reply as one short line for an error message: a hostile or chatty server must not
    flood logs and status output."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class DestinationSession(Protocol):
    """One logged-in connection to a destination, used for one poll of one account.

    ``deliver`` returns a reference string that the ledger keeps (for IMAP
    ``imap:<folder>;UIDVALIDITY=<v>;UID=<u>`` when the server has UIDPLUS, else ``imap:<folder>``).
    ``find`` is for crash recovery only: it looks for a message with the same Message-ID, size and SHA-256
    in the target folder and returns its reference, or None. Errors are the project's own
    ``DestinationError`` subclasses.
    """

    def deliver(self, message: FetchedMessage) -> str: ...

    def max_batch(self) -> int:
        """How many messages one ``deliver_many`` may carry (1: the destination has no batch delivery)."""
        ...

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        """Deliver all of ``messages`` in one atomic command and return their references in order; or
        None when the destination refused the batch as a whole and stored none of it (the caller then
        delivers them one at a time). Any other failure raises, as ``deliver`` does."""
        ...

    def find(self, message: FetchedMessage) -> str | None: ...

    def check(self) -> object:
        """Verify login and folder access without writing anything; returns what it found (for str())."""
        ...

    def close(self) -> None: ...
