"""What a failure decides, from the one axis of ``connector/errors.py``: temporary or permanent.

For the account (a failed poll waits before the next one):

* ``TemporaryError`` (and anything unclassified: a ledger or spool failure): ``Backoff.RETRY``, exponential
  from ``retry.initial_backoff``; waiting is what fixes it.
* ``PermanentError`` (a certificate that does not verify, STARTTLS missing, ``[SYS/PERM]``) and
  ``AuthenticationError``: ``Backoff.PERSON``, the flat ``retry.auth_failure_backoff``; only a person can
  fix it, and retrying at the normal rate only fills the logs (or gets a mailbox locked).

For one message (a failure that is this message's alone, such as a refusal of it, or an ``-ERR`` to its
RETR; whether a failure is the message's or the destination's is ``policies/blame.py``):

* temporary: ``Charge.NONE``, no attempt counted; it waits for a later poll;
* permanent: ``Charge.ATTEMPT``, one attempt (quarantined after ``retry.max_attempts``, which allows for a
  server that calls a passing trouble permanent);
* ``DestinationTooLargeError``: ``Charge.QUARANTINE`` at once (no retry can make it smaller);
* an error of no project type (a bug, a driver error no boundary translated): ``Charge.ATTEMPT``, so that a
  message that triggers it ends in quarantine instead of failing every poll.

Pure.
"""

from __future__ import annotations

import enum

from connector.errors import (
    AuthenticationError,
    ConnectorError,
    DestinationTooLargeError,
    PermanentError,
)


class Backoff(enum.Enum):
    RETRY = "retry"
    PERSON = "person"


class Charge(enum.Enum):
    NONE = "none"
    ATTEMPT = "attempt"
    QUARANTINE = "quarantine"


def backoff(exc: BaseException) -> Backoff:
    """How the account waits after a poll that ``exc`` failed."""
    if isinstance(exc, PermanentError | AuthenticationError):
        return Backoff.PERSON
    return Backoff.RETRY


def charge(exc: BaseException) -> Charge:
    """What a failure that is one message's own costs that message."""
    if isinstance(exc, DestinationTooLargeError):
        return Charge.QUARANTINE
    if isinstance(exc, PermanentError) or not isinstance(exc, ConnectorError):
        return Charge.ATTEMPT
    return Charge.NONE
