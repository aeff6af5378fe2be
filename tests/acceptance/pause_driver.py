"""Runs ``pop-connector`` in this process, pausing its poll at a chosen point of the Nth message.

Usage: python -m tests.acceptance.pause_driver POINT N DIR -- CLI ARGS...
At the Nth call of POINT (before-pending, before-delivered-record: see crash_driver), the poll's thread
writes DIR/paused and waits until DIR/go exists; every other thread of the process (the fetching thread,
the lease renewer, a worker's heartbeat) goes on. Deterministic stand-in for a poll that is slow at that
point (a large message, a slow destination) while another process starts.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connector import cli
from connector.destinations import imap
from tests.acceptance.crash_driver import TARGETS

# Never wait for ever: a test that dies leaves no process behind for long.
PAUSE_LIMIT = 300.0


def _pausing(original: Callable[..., Any], nth: int, folder: Path) -> Callable[..., Any]:
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth:
            (folder / "paused").write_text("paused\n")
            deadline = time.monotonic() + PAUSE_LIMIT
            while not (folder / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return original(*args, **kwargs)

    return wrapper


def main() -> int:
    point, nth, folder, separator, *cli_args = sys.argv[1:]
    assert separator == "--", __doc__
    owner, name = TARGETS[point]
    setattr(owner, name, _pausing(getattr(owner, name), int(nth), Path(folder)))
    imap.ImapSession.max_batch = lambda self: 1  # type: ignore[method-assign]
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
