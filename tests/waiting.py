"""Waiting for something a server does in its own time, without asserting how long it takes."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    check: Callable[[], object], what: str, *, timeout: float = 60.0, details: Callable[[], str] = str
) -> None:
    """Calls ``check`` until it returns something true; fails naming ``what`` (and ``details()``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{details()}")
