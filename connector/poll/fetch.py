"""Fetching one message from the POP3 server into a spool: whole (RETR) or, for an oversized message
with ``oversize = "headers_only"``, its header section (TOP n 0) wrapped as a small message of its own.

What the server's sizes are trusted for (policies/sizes.py) is checked here, around every fetch: the
spool directory has room for the message before it is fetched, the reply is bounded by the hard ceiling,
and a reply far shorter than LIST said is not handed on as the message.
"""

from __future__ import annotations

import io
import tempfile
from shutil import disk_usage

from connector.config import Account
from connector.errors import SourceReplyTooLongError, SourceShortReplyError, SpoolError
from connector.message import (
    HEADER_PARSE_LIMIT,
    FetchedMessage,
    MessageSpool,
    fallback_message_id,
    stamp_key,
)
from connector.policies.limits import headers_only_message
from connector.policies.sizes import implausibly_short, short_retr_reason, spool_room_needed, spool_shortfall
from connector.pop3 import MessageInfo, Pop3Client

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


def fetch(
    pop: Pop3Client, account: Account, info: MessageInfo, *, headers_only: bool = False
) -> FetchedMessage:
    if not headers_only:  # the header section alone stays in memory
        check_spool_space(info)
    spool = spool_for(account, info)
    try:
        if headers_only:
            assert account.max_message_size is not None  # only planned when a limit is set
            top = io.BytesIO()
            pop.top(info.number, 0, top, max_bytes=2 * HEADER_PARSE_LIMIT)
            spool.write(headers_only_message(top.getvalue(), info.size, account.max_message_size))
        else:
            ceiling = account.message_size_ceiling
            received = pop.retr(info.number, spool, max_bytes=max_retr_bytes(info, ceiling))
            spool.line_endings_repaired = pop.last_body_repaired
            check_retr_size(info, received)
    except SourceReplyTooLongError as exc:
        spool.abort()
        name_runaway(exc, info, account.message_size_ceiling)
        raise
    except OSError as exc:  # the spool's: the client turns socket errors into its own
        spool.abort()
        raise spool_failed(exc, info) from exc
    except BaseException:
        spool.abort()
        raise
    return spool.finish()


def name_runaway(exc: SourceReplyTooLongError, info: MessageInfo, ceiling: int | None = None) -> None:
    """Say which message ran away, so the engine can quarantine it."""
    exc.uidl, exc.pop_size = info.uidl, info.size
    if ceiling is not None and max_retr_bytes(info, ceiling) == ceiling:
        exc.message += f" (message_size_ceiling is {ceiling} bytes)"
