"""Whose fault a destination failure is: the whole destination's, one recipient mailbox's, or one message's.

* ``DESTINATION``: it cannot be reached or used (no connection, no login, TLS, full, busy): the poll
  stops delivering, and no message is charged an attempt (as before).
* ``RECIPIENT`` (catch-all accounts): the session into one recipient's mailbox was opened, but that
  mailbox cannot take mail now (over quota, busy, its connection dropped outside a delivery, or dropped
  twice). Only that mailbox is left out for the rest of the poll: its part of each message waits for a
  later poll (the message stays on the POP3 server until every recipient has it), no attempt is charged,
  and the other recipients' mail goes on. The poll itself does not fail for it (a problem is reported),
  so that one full mailbox neither backs off nor suspends a whole domain.
* ``MESSAGE``: the connection dropped (or timed out) while one message was being delivered on a session
  that was working. That may be the message (something in it makes the server or a middlebox hang up) or
  bad luck, so it is a suspicion, judged per destination within the poll by ``DropWitness``: it counts
  as one of the message's attempts (``retry.max_attempts`` then quarantines it) when the same destination
  took another message in the same poll, before or after; a second drop with no delivery in between
  means the destination itself is in trouble, and nobody more is charged. The poll goes on with a new
  connection, so the message does not hold back the mail after it (the poll still reports the error).

Pure: the engine asks, and writes the ledger itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from connector.errors import (
    DestinationConnectError,
    DestinationError,
    DestinationFullError,
    DestinationTempError,
)


class Blame(enum.Enum):
    DESTINATION = "destination"
    RECIPIENT = "recipient"
    MESSAGE = "message"


def blame(exc: DestinationError, *, in_session: bool, delivering_one: bool, routed: bool) -> Blame:
    """``in_session``: the failure came from a command on an open session (not from opening one);
    ``delivering_one``: the command was the delivery of one message; ``routed``: into a catch-all
    recipient's mailbox."""
    if not in_session:
        return Blame.DESTINATION
    if delivering_one and isinstance(exc, DestinationConnectError):
        return Blame.MESSAGE
    if routed and isinstance(exc, DestinationConnectError | DestinationFullError | DestinationTempError):
        return Blame.RECIPIENT
    return Blame.DESTINATION


class Verdict(enum.Enum):
    COUNT = "count"  # the destination took another message in this poll: charge the message now
    WAIT = "wait"  # nothing known yet: charge it if the destination takes another message later
    DOWN = "down"  # a second drop with no delivery in between: the destination's trouble


@dataclass
class DropWitness:
    """What one poll saw of each destination (a recipient mailbox; None: the account's own): the
    messages in flight when its connection dropped, and whether it took other messages."""

    _took: set[str | None] = field(default_factory=set)
    _dropped: dict[str | None, list[tuple[str, str]]] = field(default_factory=dict)

    def dropped(self, key: str | None, uidl: str, error: str) -> Verdict:
        """The connection to ``key`` dropped while ``uidl`` was being delivered."""
        if key in self._dropped:
            del self._dropped[key]  # not theirs either: the destination drops whatever it is sent
            return Verdict.DOWN
        self._dropped[key] = [] if key in self._took else [(uidl, error)]
        return Verdict.COUNT if key in self._took else Verdict.WAIT

    def took(self, key: str | None) -> list[tuple[str, str]]:
        """``key`` took a message: the (UIDL, error) of the drops to charge now."""
        self._took.add(key)
        return self._dropped.pop(key, [])
