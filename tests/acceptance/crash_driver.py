"""Runs ``pop-connector`` in this process, killing it with SIGKILL at a chosen point of the Nth message.

Usage: python -m tests.acceptance.crash_driver POINT N -- CLI ARGS...
POINT is one of: before-pending, before-append, before-delivered-record, before-quit, and for catch-all
accounts before-recipient-record (the Nth recipient's copy is in its mailbox, its ledger row not yet);
these run with one message per APPEND, so that the Nth call is the Nth message. before-multiappend and
after-multiappend kill around the Nth MULTIAPPEND of several messages (after: they are stored, their
``delivered`` records not written); the first single delivery then waits a moment, so that the fetching
thread has the next messages ready and they go as a batch. before-createitem-batch and
after-createitem-batch do the same around the Nth CreateItem of several messages into Exchange (EWS).
The kill is a real SIGKILL of this process: no finally block, no atexit, no flush runs.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from connector import cli
from connector.destinations import imap
from connector.ledger.recipients import Recipients
from connector.ledger.store import Ledger
from connector.pop3 import Pop3Client

TARGETS: dict[str, tuple[Any, str]] = {
    "before-pending": (Ledger, "record_pending"),
    "before-append": (imap.ImapSession, "deliver"),
    "before-delivered-record": (Ledger, "record_delivered"),
    "before-quit": (Pop3Client, "quit"),
    "before-recipient-record": (Recipients, "record_delivered"),
    "before-multiappend": (imap.ImapSession, "deliver_many"),
    "after-multiappend": (imap.ImapSession, "deliver_many"),
}
BATCH_POINTS = ("before-multiappend", "after-multiappend")
# Exchange: exchangelib is imported only for these.
EWS_POINTS = ("before-createitem-batch", "after-createitem-batch")


def _killing(original: Callable[..., Any], nth: int, *, after: bool = False) -> Callable[..., Any]:
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapper


def _first_call_waits(original: Callable[..., Any]) -> Callable[..., Any]:
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.3)
        return original(*args, **kwargs)

    return wrapper


def main() -> int:
    point, nth, separator, *cli_args = sys.argv[1:]
    assert separator == "--", __doc__
    if point in EWS_POINTS:
        from connector.destinations import ews

        deliver_many = _killing(ews.EwsSession.deliver_many, int(nth), after=point.startswith("after-"))
        ews.EwsSession.deliver_many = deliver_many  # type: ignore[method-assign]
        ews.EwsSession.deliver = _first_call_waits(ews.EwsSession.deliver)  # type: ignore[method-assign]
        return cli.main(cli_args)
    owner, name = TARGETS[point]
    setattr(owner, name, _killing(getattr(owner, name), int(nth), after=point.startswith("after-")))
    if point == "before-quit":
        # A session that sent no DELE (retention "keep") ends with the QUIT it does not wait for.
        Pop3Client.quit_unawaited = _killing(Pop3Client.quit_unawaited, int(nth))  # type: ignore[method-assign]
    if point in BATCH_POINTS:
        imap.ImapSession.deliver = _first_call_waits(imap.ImapSession.deliver)  # type: ignore[method-assign]
    else:
        imap.ImapSession.max_batch = lambda self: 1  # type: ignore[method-assign]
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
