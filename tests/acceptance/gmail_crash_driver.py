"""Runs ``pop-connector`` in this process, killing it with SIGKILL at a chosen point of the Nth Gmail import.

Usage: python -m tests.acceptance.gmail_crash_driver POINT N -- CLI ARGS...
POINT: before-pending (the Nth message fetched, nothing recorded), before-import (recorded ``pending``, not
sent), after-import (Gmail has it, the ``delivered`` record is not written), mid-upload (the first chunk of
the Nth resumable upload is sent, the rest is not). The kill is a real SIGKILL of this process: no finally
block, no atexit, no flush runs.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from connector import cli
from connector.destinations import gmail
from connector.ledger.store import Ledger

TARGETS: dict[str, tuple[Any, str]] = {
    "before-pending": (Ledger, "record_batch_pending"),
    "before-import": (gmail.GmailSession, "deliver"),
    "after-import": (gmail.GmailSession, "deliver"),
}


def _killing(original: Callable[..., Any], nth: int, *, after: bool) -> Callable[..., Any]:
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


def _killing_mid_upload(original: Callable[..., Any], nth: int) -> Callable[..., Any]:
    """Kill right after the first chunk (a PUT) of the Nth resumable upload was answered."""
    uploads = 0

    @functools.wraps(original)
    def wrapper(self: Any, action: str, method: str, url: str, **kwargs: Any) -> Any:
        nonlocal uploads
        result = original(self, action, method, url, **kwargs)
        if action == "start the upload":
            uploads += 1
        elif action == "upload" and uploads == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapper


def main() -> int:
    point, nth, separator, *cli_args = sys.argv[1:]
    assert separator == "--", __doc__
    # Small uploads and chunks, so that a message of a few hundred KB goes in several requests.
    gmail.SIMPLE_UPLOAD_LIMIT = 64 * 1024
    gmail.RESUMABLE_CHUNK = 256 * 1024
    if point == "mid-upload":
        gmail.GmailSession._send = _killing_mid_upload(gmail.GmailSession._send, int(nth))  # type: ignore[method-assign]
    else:
        owner, name = TARGETS[point]
        setattr(owner, name, _killing(getattr(owner, name), int(nth), after=point.startswith("after-")))
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
