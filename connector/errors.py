"""The project's own exceptions.

Driver errors (socket, ssl, imaplib, SQLAlchemy, ...) are translated into these at the boundary of the
module that talks to the driver (``raise SourceConnectError(...) from exc``), so that the sync engine and
the policies only ever reason about these types.

Two orthogonal axes:

* where the failure happened: ``SourceError`` (POP3 side), ``DestinationError``, ``LedgerError``,
  ``ConfigError``;
* whether trying again later can help: ``TemporaryError`` (busy, timeout, quota, in-use) or
  ``PermanentError`` (rejected content, unknown mailbox, a certificate that does not verify).
  Authentication failures are neither: retrying at the normal rate could lock the user out, so they have
  their own type.

The second axis decides what happens (``connector/policies/failures.py``): a temporary failure of an
account backs off exponentially, a permanent or authentication failure waits the flat, long
``auth_failure_backoff`` because only a person can fix it; a temporary failure about one message costs it
no attempt, a permanent one costs one (``DestinationTooLargeError``: quarantined at once).
"""

from __future__ import annotations

from connector.redaction import redact


class ConnectorError(Exception):
    """Base of every error this project raises on purpose.

    ``message`` is read with every secret the process knows cut out (``connector.redaction``): it often
    quotes a server, which may repeat a password or token, and it goes into the ledger, onto the status
    page and into the logs.
    """

    def __init__(self, message: str, *, account: str | None = None, uidl: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.account = account
        self.uidl = uidl

    @property
    def message(self) -> str:
        return redact(self._message)

    @message.setter
    def message(self, value: str) -> None:
        self._message = value

    def __str__(self) -> str:
        where = []
        if self.account is not None:
            where.append(f"account {self.account!r}")
        if self.uidl is not None:
            where.append(f"message {self.uidl!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class TemporaryError(ConnectorError):
    """Trying again later may succeed (busy server, timeout, full mailbox)."""


class PermanentError(ConnectorError):
    """Trying again will fail the same way until something is changed by a person."""


class AuthenticationError(ConnectorError):
    """A server refused the credentials. Not retried at the normal rate."""


class ConfigError(ConnectorError):
    """The configuration file is missing, unreadable or invalid."""


class LedgerError(ConnectorError):
    """The ledger database could not be read or written."""


# --- POP3 source -------------------------------------------------------------------------------------


class SourceError(ConnectorError):
    """Something went wrong talking to the POP3 server."""


class SourceConnectError(SourceError, TemporaryError):
    """Could not connect, TLS handshake failed, the connection dropped or timed out."""


class SourceTLSError(SourceError, PermanentError):
    """The server's certificate did not verify, or STLS was required and not offered."""


class SourceProtocolError(SourceError, TemporaryError):
    """The server sent something that is not valid POP3 (garbage, an oversized line, a bad listing)."""


class SourceReplyTooLongError(SourceProtocolError):
    """A RETR/TOP reply ran far past the size LIST gave: that message, not the mailbox, is the trouble.
    The poll still ends (the session is unusable), but the message is quarantined so that the next poll
    gets past it. ``pop_size`` is what LIST said."""

    pop_size: int = 0


class SourceAuthError(SourceError, AuthenticationError):
    """USER/PASS or APOP was refused ([AUTH] or a plain -ERR at login)."""


class SourceInUseError(SourceError, TemporaryError):
    """[IN-USE]: another session holds the maildrop lock."""


class SourceLoginDelayError(SourceError, TemporaryError):
    """[LOGIN-DELAY]: logged in too soon after the last session.

    ``login_delay`` is the server's CAPA ``LOGIN-DELAY`` in seconds when it announced one: the earliest
    a new login can succeed."""

    login_delay: int | None = None


class SourceTempError(SourceError, TemporaryError):
    """[SYS/TEMP] or any other -ERR the server says is temporary."""


class SourcePermError(SourceError, PermanentError):
    """[SYS/PERM], or an -ERR on a command that cannot succeed as sent."""


class SourceNoUidlError(SourcePermError):
    """The server answered UIDL with a plain -ERR: it has no unique-ids (messages are then identified by a
    hash of their headers)."""


class MessageFetchError(SourceError):
    """Fetching one message failed, the session did not: the rest of the mailbox goes on."""


class SourceMessageError(MessageFetchError, TemporaryError):
    """One message could not be retrieved (-ERR to RETR/TOP); the rest of the mailbox goes on."""


class SourceShortReplyError(MessageFetchError, PermanentError):
    """RETR sent far less than LIST said (policies/sizes.py): not the message, so it is not delivered.
    Permanent for this message as the server stores it now, so each one costs an attempt (an -ERR is
    temporary and costs none); ``retry.max_attempts`` allows for a passing store hiccup. ``list_size`` and
    ``retr_size`` in octets."""

    list_size: int = 0
    retr_size: int = 0


class SpoolError(TemporaryError):
    """The local spool cannot take the next message (its directory lacks the room, or writing failed):
    not the message's fault, so the poll stops fetching and no attempt is counted."""


# --- Destinations -------------------------------------------------------------------------------------


class DestinationError(ConnectorError):
    """Something went wrong delivering into the destination."""


class DestinationConnectError(DestinationError, TemporaryError):
    """Could not connect, TLS failed, the connection dropped or timed out."""


class DestinationTLSError(DestinationError, PermanentError):
    """The destination's certificate did not verify, or STARTTLS was required and not offered."""


class DestinationAuthError(DestinationError, AuthenticationError):
    """The destination refused the credentials."""


class DestinationFullError(DestinationError, TemporaryError):
    """The target mailbox is over quota: pause the account rather than burn the message's attempts."""


class DestinationTempError(DestinationError, TemporaryError):
    """The destination is busy or failed in a way that may pass ([UNAVAILABLE], [INUSE], 5xx)."""


class DestinationRejectedError(DestinationError, PermanentError):
    """The destination refused this message or folder for good (bad content, too large, no such mailbox)."""


# --- OAuth 2.0 tokens -----------------------------------------------------------------------------------


class OAuthError(ConnectorError):
    """No access token could be obtained. The POP3 source and the destinations re-raise it as their own
    type (``SourceAuthError``, ``DestinationConnectError``, ...), so the engine never sees this one."""


class OAuthRefusedError(OAuthError, AuthenticationError):
    """The token endpoint refused the client's credentials, grant or scope (``invalid_client`` etc.)."""


class OAuthUnavailableError(OAuthError, TemporaryError):
    """The token endpoint could not be reached, timed out or failed (5xx, 429, a garbled answer)."""


class DestinationTooLargeError(DestinationRejectedError):
    """The message is larger than the destination takes: no retry can succeed, so it is quarantined at
    once (and left on the POP3 server) instead of being downloaded again for every attempt."""
