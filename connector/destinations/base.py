"""What the sync engine needs from a destination, whatever protocol it speaks."""

from __future__ import annotations

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

    def find(self, message: FetchedMessage) -> str | None: ...

    def check(self) -> object:
        """Verify login and folder access without writing anything; returns what it found (for str())."""
        ...

    def close(self) -> None: ...
