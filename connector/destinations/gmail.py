"""Gmail and Google Workspace through the Gmail API (issue 14: being built; see docs/gmail.md)."""

from __future__ import annotations

from connector.config import Account, GmailDestination
from connector.destinations.base import DestinationSession
from connector.errors import DestinationConnectError


def open_gmail(destination: GmailDestination, account: Account, mailbox: str | None) -> DestinationSession:
    """A session that imports into ``mailbox`` (None: the one user who gave consent)."""
    raise DestinationConnectError(f"destination {destination.name!r}: the Gmail destination is not built yet")
