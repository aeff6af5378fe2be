"""What the sync engine needs from a destination, whatever protocol it speaks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from connector.errors import ConnectorError, DestinationRejectedError, DestinationTempError
from connector.message import FetchedMessage
from connector.policies.recovery import LOOKUP_FAILED

log = logging.getLogger("connector.destinations")

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
    ``find`` is for crash recovery only: it looks for a copy of the message in the target folder
    (``policies.recovery`` says what counts as one) and returns its reference, or None only when it looked
    and there is none. Errors are the project's own ``DestinationError`` subclasses.
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


def look_up(session: DestinationSession, message: FetchedMessage) -> str | None:
    """``session.find(message)`` for the engine: a lookup that fails in any way is destination trouble
    (``DestinationTempError``: the poll stops, no attempt is counted, the message stays pending), never
    None, which would deliver the message a second time. Even a refusal "for good" of a search is about
    the destination, not about this message."""
    try:
        return session.find(message)
    except DestinationRejectedError as exc:
        raise DestinationTempError(f"{exc.message}; {LOOKUP_FAILED}", uidl=exc.uidl) from exc
    except ConnectorError:
        raise
    except Exception as exc:  # a bug or an unexpected driver error: still not "not found"
        log.exception("message %s: unexpected error looking for an earlier delivery", message.uidl)
        detail = f"{exc.__class__.__name__}: {exc}"
        raise DestinationTempError(f"lookup failed: {detail}; {LOOKUP_FAILED}", uidl=message.uidl) from exc
