"""Fetching one message from the POP3 server into a spool: whole (RETR) or, for an oversized message
with ``oversize = "headers_only"``, its header section (TOP n 0) wrapped as a small message of its own."""

from __future__ import annotations

import io

from connector.config import Account
from connector.errors import SourceReplyTooLongError
from connector.message import (
    HEADER_PARSE_LIMIT,
    FetchedMessage,
    MessageSpool,
    fallback_message_id,
    stamp_key,
)
from connector.policies.limits import headers_only_message
from connector.pop3 import MessageInfo, Pop3Client

# A RETR may legitimately be a little larger than LIST said (servers count differently); a runaway reply
# from a broken server must still be bounded.
RETR_SLACK_BYTES = 16 * 1024 * 1024


def max_retr_bytes(info: MessageInfo) -> int:
    return info.size * 2 + RETR_SLACK_BYTES


def spool_for(account: Account, info: MessageInfo) -> MessageSpool:
    """Where one message is fetched to; the Message-ID it gets if it has none, and its stamp
    (policies.recovery), are stable per message."""
    fallback = fallback_message_id(account.name, account.host, account.username, info.uidl)
    key = stamp_key(account.name, account.host, account.username)
    return MessageSpool(info.uidl, fallback, stamp_key=key)


def fetch(
    pop: Pop3Client, account: Account, info: MessageInfo, *, headers_only: bool = False
) -> FetchedMessage:
    spool = spool_for(account, info)
    try:
        if headers_only:
            assert account.max_message_size is not None  # only planned when a limit is set
            top = io.BytesIO()
            pop.top(info.number, 0, top, max_bytes=2 * HEADER_PARSE_LIMIT)
            spool.write(headers_only_message(top.getvalue(), info.size, account.max_message_size))
        else:
            pop.retr(info.number, spool, max_bytes=max_retr_bytes(info))
            spool.line_endings_repaired = pop.last_body_repaired
    except SourceReplyTooLongError as exc:
        spool.abort()
        name_runaway(exc, info)
        raise
    except BaseException:
        spool.abort()
        raise
    return spool.finish()


def name_runaway(exc: SourceReplyTooLongError, info: MessageInfo) -> None:
    """Say which message ran away, so the engine can quarantine it."""
    exc.uidl, exc.pop_size = info.uidl, info.size
