"""The destination side of one poll: its sessions, and what each failure of a destination command means.

``Destinations`` is what the delivery strategies call (deliver, deliver several, look up). A failure is
turned into ledger state here, once, by two pure policies: whose fault it is (``policies/blame.py``: one
message's, one catch-all recipient mailbox's, or the destination's) and what it costs
(``policies/failures.py``: temporary or permanent). When the destination itself cannot take mail, the call
raises ``DestinationDown`` after recording the failure: the poll stops delivering and still ends its POP3
session cleanly.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent import futures
from functools import partial
from typing import TypeVar

from connector.destinations.base import DestinationSession, look_up
from connector.errors import DestinationError, DestinationRejectedError, LedgerError
from connector.message import FetchedMessage
from connector.policies.blame import Blame, DropWitness, Verdict, blame
from connector.policies.failures import Charge, charge
from connector.poll.recorder import Recorder

log = logging.getLogger("connector.poll.destination")

_T = TypeVar("_T")
# Sessions kept open at once in one poll; a domain's mail for more mailboxes logs the oldest out.
SESSION_LIMIT = 8


class DestinationDown(Exception):
    """The destination cannot take more mail in this poll (already recorded as the poll's failure)."""


class DestinationPool:
    """The destination sessions of one poll: the account's own (key None) or one per recipient mailbox,
    at most ``limit`` open at once (the least recently used is logged out)."""

    def __init__(self, open_session: Callable[[str | None], DestinationSession], limit: int = SESSION_LIMIT):
        self._open = open_session
        self._limit = limit
        self._sessions: OrderedDict[str | None, DestinationSession] = OrderedDict()
        # Recipient mailboxes that cannot take mail in this poll (over quota, busy): left out until the next.
        self._held: set[str] = set()
        # The account's own session while ``open_ahead`` opens it (or after it failed, until ``get``).
        self._opening: _Opening | None = None

    def open_ahead(self) -> None:
        """Start opening the account's own session in a thread, so that connecting and logging in to the
        destination (a TLS handshake, an OAuth token, several round trips) overlap the first message's
        RETR instead of following it. ``get`` then waits for it, and raises what opening it raised."""
        if None not in self._sessions and self._opening is None:
            self._opening = _Opening(partial(self._open, None))

    def get(self, mailbox: str | None = None) -> DestinationSession:
        if mailbox is None and self._opening is not None:
            opening, self._opening = self._opening, None
            self._add(None, opening.result())
        session = self._sessions.get(mailbox)
        if session is not None:
            self._sessions.move_to_end(mailbox)
            return session
        return self._add(mailbox, self._open(mailbox))

    def _add(self, mailbox: str | None, session: DestinationSession) -> DestinationSession:
        while len(self._sessions) >= self._limit:
            _close_quietly(self._sessions.popitem(last=False)[1])
        self._sessions[mailbox] = session
        return session

    def opened(self, mailbox: str | None = None) -> DestinationSession | None:
        """The session for ``mailbox`` if one is open, or being opened ahead (waited for; None if that
        failed: ``get`` raises its failure); never opens one."""
        if mailbox is None and self._opening is not None:
            session = self._opening.session()
            if session is None:
                return None
            self._opening = None
            self._add(None, session)
        return self._sessions.get(mailbox)

    def hold(self, mailbox: str) -> None:
        """Leave ``mailbox`` out for the rest of the poll."""
        self._held.add(mailbox)
        self.discard(mailbox)

    def held(self, mailbox: str) -> bool:
        return mailbox in self._held

    def discard(self, mailbox: str | None) -> None:
        """Close the session for ``mailbox`` (broken, or no longer wanted); the next ``get`` opens another."""
        session = self._sessions.pop(mailbox, None)
        if session is not None:
            _close_quietly(session)

    def close_all(self) -> None:
        if self._opening is not None:
            # Not waited for: a poll that ends early must not wait for a destination's connect timeout.
            self._opening.abandon()
            self._opening = None
        while self._sessions:
            _close_quietly(self._sessions.popitem(last=False)[1])


class _Opening:
    """A destination session being opened in a thread of its own (``DestinationPool.open_ahead``)."""

    def __init__(self, open_session: Callable[[], DestinationSession]) -> None:
        self._future: futures.Future[DestinationSession] = futures.Future()
        # In a copy of the poll's context: the destination's log lines and protocol log name the account.
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(self._run, open_session), name="destination open", daemon=True
        )
        thread.start()

    def _run(self, open_session: Callable[[], DestinationSession]) -> None:
        try:
            self._future.set_result(open_session())
        except BaseException as exc:  # handed to the poll's thread, which decides (Destinations._call)
            self._future.set_exception(exc)

    def session(self) -> DestinationSession | None:
        """The session once it is open; None if opening it failed."""
        return None if self._future.exception() is not None else self._future.result()

    def result(self) -> DestinationSession:
        """The session once it is open; raises what opening it raised."""
        return self._future.result()

    def abandon(self) -> None:
        """The poll no longer wants the session: closed now if it is open, else once it is."""
        self._future.add_done_callback(_close_opened)


def _close_opened(opened: futures.Future[DestinationSession]) -> None:
    if opened.exception() is None:
        _close_quietly(opened.result())


def _close_quietly(session: DestinationSession) -> None:
    try:
        session.close()
    except Exception:  # closing a broken connection must not hide the poll's real result
        log.debug("error closing a destination session", exc_info=True)


# What ``deliver_many`` returns when the destination refused a batch as a whole and stored none of it.
REFUSED: list[str] = []


class Destinations:
    """Destination commands for the delivery strategies; None means "failed, and recorded as failed"."""

    def __init__(self, pool: DestinationPool, recorder: Recorder) -> None:
        self.pool = pool
        self._recorder = recorder
        self._drops = DropWitness()

    def max_batch(self) -> int:
        """Messages the next delivery may carry: known once the account's session is open."""
        session = self.pool.opened(None)
        return session.max_batch() if session is not None else 1

    def deliver(self, fetched: FetchedMessage, mailbox: str | None = None) -> str | None:
        """Deliver a message recorded ``pending``."""
        return self._call([fetched], lambda dest: dest.deliver(fetched), delivering=True, mailbox=mailbox)

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        """Deliver messages recorded ``pending`` in one command; ``REFUSED`` when the destination refused
        the batch as a whole (nothing stored: deliver them one by one)."""
        return self._call(messages, lambda dest: dest.deliver_many(messages) or REFUSED, delivering=True)

    def look_up(self, fetched: FetchedMessage, mailbox: str | None = None) -> str | None:
        """An earlier attempt's delivery of ``fetched``, or None: not found, or the lookup failed (then
        recorded; a failed lookup of the account's own destination raises ``DestinationDown``)."""
        return self._call([fetched], lambda dest: look_up(dest, fetched), delivering=False, mailbox=mailbox)

    def close(self) -> None:
        self.pool.close_all()

    def _call(
        self,
        messages: Sequence[FetchedMessage],
        action: Callable[[DestinationSession], _T],
        *,
        delivering: bool,
        mailbox: str | None = None,
    ) -> _T | None:
        """Run ``action``. ``delivering``: it hands ``messages`` (recorded ``pending``, an attempt counted)
        to the destination; else it only reads (a lookup), and a failure costs no attempt."""
        recorder = self._recorder
        try:
            result = action(self.pool.get(mailbox))
        except DestinationRejectedError as exc:
            # This message refused (or, for a lookup, the destination's trouble: look_up says so); the
            # destination itself is fine: go on with the next message.
            for fetched in messages:
                recorder.failed(fetched.uidl, exc, charge(exc), recorded=delivering, mailbox=mailbox)
            return None
        except DestinationError as exc:
            if self._not_the_destination(messages, exc, delivering=delivering, mailbox=mailbox):
                return None
            # Full, unreachable, TLS or login trouble: not the message's fault, and no use trying more.
            for fetched in messages:
                recorder.failed(fetched.uidl, exc, Charge.NONE, recorded=delivering, mailbox=mailbox)
            self.close()
            raise DestinationDown from exc
        except LedgerError:
            raise
        except Exception as exc:  # a bug or an unexpected driver error: counted (failures.charge), go on
            uidls = ", ".join(fetched.uidl for fetched in messages)
            log.exception("account %s: unexpected error delivering message %s", recorder.account.name, uidls)
            for fetched in messages:
                recorder.failed(fetched.uidl, exc, charge(exc), recorded=delivering, mailbox=mailbox)
            self.close()
            return None
        if delivering and result:  # the destination takes mail (see connector/policies/blame.py)
            for uidl, error in self._drops.took(mailbox):
                recorder.charge_drop(uidl, error)
        return result

    def _not_the_destination(
        self,
        messages: Sequence[FetchedMessage],
        exc: DestinationError,
        *,
        delivering: bool,
        mailbox: str | None,
    ) -> bool:
        """Handle a failure that is one recipient mailbox's or one message's (connector/policies/blame.py);
        True when it was and the poll goes on, False when it is the destination's."""
        fault = blame(
            exc,
            in_session=self.pool.opened(mailbox) is not None,
            delivering_one=delivering and len(messages) == 1,
            routed=mailbox is not None,
        )
        if fault is Blame.DESTINATION:
            return False
        [fetched] = messages
        charge_now = False
        if fault is Blame.MESSAGE:
            verdict = self._drops.dropped(mailbox, fetched.uidl, exc.message)
            if verdict is Verdict.DOWN and mailbox is None:
                return False  # the account's own destination drops whatever it is sent: as if it were down
            self.pool.discard(mailbox)  # the connection is gone; the next delivery opens another
            charge_now = verdict is Verdict.COUNT
            if verdict is Verdict.DOWN:  # a recipient's mailbox that drops whatever it is sent
                fault = Blame.RECIPIENT
        if fault is Blame.RECIPIENT:
            assert mailbox is not None
            self.pool.hold(mailbox)
        # A drop still fails the poll (the destination hung up, the account backs off a little), but nothing
        # confined to one catch-all recipient does: one mailbox must not back off or suspend a whole domain.
        fails_poll = fault is Blame.MESSAGE and mailbox is None
        self._recorder.failed(
            fetched.uidl, exc, Charge.NONE, recorded=delivering, mailbox=mailbox, fails_poll=fails_poll
        )
        if charge_now:
            self._recorder.charge_drop(fetched.uidl, exc.message)
        return True
