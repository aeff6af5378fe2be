"""The log lines of what a poll did to each message, written from its events.

One INFO line per message delivered or found already delivered, and for each delivery a note in the
account's protocol log (size and SHA-256, never the content). Every line carries the account and the UIDL
in the log context (``connector.ops.logs``), whichever thread the event came from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from connector.ops.logs import about_message, log_context
from connector.ops.protocol_log import protocol_note
from connector.poll.events import Delivered, PollEvent, Recovered

log = logging.getLogger("connector.ops.poll_log")


@contextmanager
def _about(account: str, uidl: str) -> Iterator[None]:
    # The poll already sets the account's context; setting it again makes the line right wherever it is
    # emitted from (a test, a thread that did not copy the poll's context).
    with log_context(account), about_message(uidl):
        yield


class PollLog:
    """Writes the per-message lines; the engine puts it first on every bus (``SyncEngine``)."""

    def notify(self, event: PollEvent) -> None:
        match event:
            case Delivered():
                self._delivered(event)
            case Recovered():
                self._recovered(event)
            case _:
                pass

    def _delivered(self, event: Delivered) -> None:
        with _about(event.account, event.uidl):
            if event.mailbox is None:
                # The protocol log is the account's own file, chosen by the poll's context (``recording``).
                protocol_note(
                    "delivered %s: %d bytes, sha256 %s -> %s", event.uidl, event.size, event.sha256, event.ref
                )
                log.info(
                    "account %s: message %s delivered (%d bytes) to %s",
                    event.account,
                    event.uidl,
                    event.size,
                    event.ref,
                )
                return
            protocol_note(
                "delivered %s to %s: %d bytes, sha256 %s -> %s",
                event.uidl,
                event.mailbox,
                event.size,
                event.sha256,
                event.ref,
            )
            log.info(
                "account %s: message %s delivered (%d bytes) to %s: %s",
                event.account,
                event.uidl,
                event.size,
                event.mailbox,
                event.ref,
            )

    def _recovered(self, event: Recovered) -> None:
        with _about(event.account, event.uidl):
            if event.mailbox is None:
                log.info(
                    "account %s: message %s was already delivered (%s); recorded it",
                    event.account,
                    event.uidl,
                    event.ref,
                )
            else:
                log.info(
                    "account %s: message %s was already delivered to %s (%s); recorded it",
                    event.account,
                    event.uidl,
                    event.mailbox,
                    event.ref,
                )
