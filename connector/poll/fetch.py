"""Fetching one message from the POP3 server into a spool: whole (RETR) or, for an oversized message
with ``oversize = "headers_only"``, its header section (TOP n 0) wrapped as a small message of its own.

What the server's sizes are trusted for (policies/sizes.py) is checked here, around every fetch: the
spool directory has room for the message before it is fetched, the reply is bounded by the hard ceiling,
and a reply far shorter than LIST said is not handed on as the message.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from shutil import disk_usage
from typing import Protocol

from connector.config import Account
from connector.errors import SourceReplyTooLongError, SourceShortReplyError, SpoolError
from connector.message import (
    HEADER_SECTION_LIMIT,
    FetchedMessage,
    MessageSpool,
    fallback_message_id,
    stamp_key,
)
from connector.policies.limits import headers_only_message
from connector.policies.sizes import implausibly_short, short_retr_reason, spool_room_needed, spool_shortfall
from connector.pop3 import MessageInfo, Pop3Client, Sink, Streamed

# A RETR may legitimately be a little larger than LIST said (servers count differently); a runaway reply
# from a broken server must still be bounded.
RETR_SLACK_BYTES = 16 * 1024 * 1024


def max_retr_bytes(info: MessageInfo, ceiling: int | None = None) -> int:
    bound = info.size * 2 + RETR_SLACK_BYTES
    return bound if ceiling is None else min(bound, ceiling)


def spool_for(account: Account, info: MessageInfo) -> MessageSpool:
    """Where one message is fetched to; the Message-ID it gets if it has none, and its stamp
    (policies.recovery), are stable per message."""
    fallback = fallback_message_id(account.name, account.host, account.username, info.uidl)
    key = stamp_key(account.name, account.host, account.username)
    return MessageSpool(info.uidl, fallback, stamp_key=key)


def spool_directory() -> str:
    """Where a spooled message goes once it outgrows memory (``SpooledTemporaryFile``: $TMPDIR)."""
    return tempfile.gettempdir()


def check_spool_space(info: MessageInfo) -> None:
    """Raise ``SpoolError`` unless the spool directory has room for the message (by its LIST size, plus a
    margin). Checked before anything of it is fetched, so a full disk never leaves a half-written copy."""
    if spool_room_needed(info.size) is None:
        return
    directory = spool_directory()
    try:
        free = disk_usage(directory).free
    except OSError as exc:
        raise SpoolError(
            f"cannot read the free space of the spool directory {directory}: {exc.strerror or exc}; "
            f"message {info.uidl!r} ({info.size} bytes) not fetched"
        ) from exc
    needed = spool_shortfall(info.size, free)
    if needed is not None:
        raise SpoolError(
            f"the spool directory {directory} has {free} bytes free, message {info.uidl!r} needs {needed} "
            f"({info.size} bytes and a margin): stopped fetching for this poll (set TMPDIR to a larger "
            "disk, or free space)"
        )


def check_retr_size(info: MessageInfo, received: int) -> None:
    """Raise ``SourceShortReplyError`` when ``received`` octets cannot be the message LIST announced."""
    if implausibly_short(info.size, received):
        exc = SourceShortReplyError(short_retr_reason(info.size, received), uidl=info.uidl)
        exc.list_size, exc.retr_size = info.size, received
        raise exc


def spool_failed(exc: OSError, info: MessageInfo) -> SpoolError:
    return SpoolError(
        f"cannot write message {info.uidl!r} to the spool directory {spool_directory()}: "
        f"{exc.strerror or exc}; stopped fetching for this poll"
    )


class ReadReply(Protocol):
    """Reads one message's reply into ``sink``, at most ``max_bytes`` from the wire: ``Pop3Client.retr``
    for one message (bound to its number), ``RetrReply.into`` for a pipelined one."""

    def __call__(self, sink: Sink, *, max_bytes: int | None = None) -> Streamed: ...


def retr_to_spool(
    info: MessageInfo, spool: MessageSpool, read: ReadReply, *, ceiling: int | None
) -> FetchedMessage:
    """Fetch one message whole into ``spool`` with ``read`` and hand over the finished message: the spool
    directory must have room first, the reply is bounded by ``ceiling`` (``message_size_ceiling``) and
    must not be far shorter than LIST said. On any failure ``spool`` is discarded and the error raised:
    ``SpoolError`` for the spool's own, ``SourceReplyTooLongError`` naming the runaway message,
    ``MessageFetchError`` (-ERR, a short reply) for this message only, anything else as it came."""
    with _filling(spool, info, ceiling):
        # Before the reply is read: on a full disk the poll stops (a pipelined reply is then discarded).
        check_spool_space(info)
        streamed = read(spool, max_bytes=max_retr_bytes(info, ceiling))
        check_retr_size(info, streamed.octets)
    return spool.finish(line_endings_repaired=streamed.repaired)


def fetch(
    pop: Pop3Client, account: Account, info: MessageInfo, *, headers_only: bool = False
) -> FetchedMessage:
    spool = spool_for(account, info)
    if not headers_only:

        def retr(sink: Sink, *, max_bytes: int | None = None) -> Streamed:
            return pop.retr(info.number, sink, max_bytes=max_bytes)

        return retr_to_spool(info, spool, retr, ceiling=account.message_size_ceiling)
    assert account.max_message_size is not None  # only planned when a limit is set
    # The header section alone stays in memory (no spool space needed); its bound is TOP's, not the ceiling.
    with _filling(spool, info, None):
        top = io.BytesIO()
        pop.top(info.number, 0, top, max_bytes=HEADER_SECTION_LIMIT)
        spool.write(headers_only_message(top.getvalue(), info.size, account.max_message_size))
    return spool.finish()


@contextmanager
def _filling(spool: MessageSpool, info: MessageInfo, ceiling: int | None) -> Iterator[None]:
    """Discard ``spool`` if filling it fails, and say what failed: the runaway message, or the spool."""
    try:
        yield
    except SourceReplyTooLongError as exc:
        spool.abort()
        name_runaway(exc, info, ceiling)
        raise
    except OSError as exc:  # the spool's: the client turns socket errors into its own
        spool.abort()
        raise spool_failed(exc, info) from exc
    except BaseException:
        spool.abort()
        raise


def name_runaway(exc: SourceReplyTooLongError, info: MessageInfo, ceiling: int | None = None) -> None:
    """Say which message ran away, so the engine can quarantine it."""
    exc.uidl, exc.pop_size = info.uidl, info.size
    if ceiling is not None and max_retr_bytes(info, ceiling) == ceiling:
        exc.message += f" (message_size_ceiling is {ceiling} bytes)"
