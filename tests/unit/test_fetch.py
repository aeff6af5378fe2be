"""Fetching one message into a spool (connector/poll/fetch.py): the one RETR-to-spool step shared by the
single-message fetch and the pipelined ``Prefetcher``, with fake read steps (no server)."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Generator, Iterable
from pathlib import Path

import pytest

from connector.errors import SourceMessageError, SourceReplyTooLongError, SourceShortReplyError, SpoolError
from connector.message import MessageSpool
from connector.poll.fetch import ReadReply, max_retr_bytes, retr_to_spool
from connector.poll.pipeline import Prefetcher
from connector.poll.plan import Delivery
from connector.pop3 import MessageInfo, Sink, Streamed

MESSAGE = b"Subject: a\r\nMessage-ID: <a@x>\r\n\r\nbody\r\n"
INFO = MessageInfo(1, "uid-1", len(MESSAGE))


class WatchedSpool(MessageSpool):
    """A spool that remembers whether it was discarded."""

    def __init__(self, uidl: str = "uid-1") -> None:
        super().__init__(uidl, "<fallback@x>")
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        super().abort()


def sending(data: bytes, *, repaired: bool = False, seen: list[int | None] | None = None) -> ReadReply:
    """A read step that writes ``data`` as the reply and says whether its line endings were repaired."""

    def read(sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        if seen is not None:
            seen.append(max_bytes)
        sink.write(data)
        return Streamed(len(data), repaired)

    return read


def failing(exc: BaseException) -> ReadReply:
    def read(sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        raise exc

    return read


@pytest.mark.parametrize("repaired", [False, True])
def test_the_repair_flag_comes_with_the_reply(repaired: bool) -> None:
    with retr_to_spool(INFO, WatchedSpool(), sending(MESSAGE, repaired=repaired), ceiling=None) as fetched:
        assert fetched.read_bytes() == MESSAGE
        assert fetched.repairs == ("bare LF/CR line endings made CRLF" if repaired else None)


def test_the_reply_is_bounded_by_the_ceiling() -> None:
    seen: list[int | None] = []
    big = MessageInfo(1, "uid-1", 10**9)
    with pytest.raises(SourceShortReplyError):
        retr_to_spool(big, WatchedSpool(), sending(MESSAGE, seen=seen), ceiling=64 * 1024)
    retr_to_spool(INFO, WatchedSpool(), sending(MESSAGE, seen=seen), ceiling=None).close()
    assert seen == [64 * 1024, max_retr_bytes(INFO)]


def test_a_short_reply_is_refused_and_the_spool_discarded() -> None:
    spool = WatchedSpool()
    with pytest.raises(SourceShortReplyError) as caught:
        retr_to_spool(MessageInfo(1, "uid-1", 20_000), spool, sending(b"Subject: a\r\n\r\n"), ceiling=None)
    assert spool.aborted and (caught.value.list_size, caught.value.retr_size) == (20_000, 14)


def test_a_runaway_reply_names_its_message_and_the_ceiling() -> None:
    spool = WatchedSpool()
    big = MessageInfo(3, "uid-3", 10**9)
    with pytest.raises(SourceReplyTooLongError) as caught:
        retr_to_spool(big, spool, failing(SourceReplyTooLongError("RETR reply too long")), ceiling=65536)
    assert spool.aborted
    assert (caught.value.uidl, caught.value.pop_size) == ("uid-3", 10**9)
    assert caught.value.message.endswith("(message_size_ceiling is 65536 bytes)")


def test_a_spool_that_cannot_be_written_is_a_spool_error() -> None:
    spool = WatchedSpool()
    with pytest.raises(SpoolError, match=r"cannot write message 'uid-1' to the spool.*No space left"):
        retr_to_spool(INFO, spool, failing(OSError(errno.ENOSPC, "No space left on device")), ceiling=None)
    assert spool.aborted


def test_an_error_reply_is_raised_as_it_came() -> None:
    spool = WatchedSpool()
    error = SourceMessageError("-ERR no such message")
    with pytest.raises(SourceMessageError) as caught:
        retr_to_spool(INFO, spool, failing(error), ceiling=None)
    assert caught.value is error and spool.aborted


def test_no_reply_is_read_without_room_in_the_spool_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("connector.poll.fetch.spool_directory", lambda: str(tmp_path))
    monkeypatch.setattr(
        "connector.poll.fetch.disk_usage", lambda path: shutil.disk_usage(path)._replace(free=1024)
    )
    seen: list[int | None] = []
    spool = WatchedSpool()
    with pytest.raises(SpoolError, match="has 1024 bytes free"):
        retr_to_spool(
            MessageInfo(1, "uid-1", 8 * 1024 * 1024), spool, sending(MESSAGE, seen=seen), ceiling=None
        )
    assert seen == [] and spool.aborted


# --- the pipelined path goes through the same step ----------------------------------------------------


class _Reply:
    def __init__(self, number: int, data: bytes, repaired: bool) -> None:
        self.number = number
        self._data = data
        self._repaired = repaired

    def into(self, sink: Sink, *, max_bytes: int | None = None) -> Streamed:
        sink.write(self._data)
        return Streamed(len(self._data), self._repaired)


class _PipelinedSource:
    """Just what a ``Prefetcher`` asks of a ``Pop3Client``: each reply says whether it was repaired, and
    there is no client-wide "last body" to ask afterwards."""

    peer = "fake:110"

    def __init__(self, replies: dict[int, tuple[bytes, bool]]) -> None:
        self._replies = replies

    def retr_many(self, numbers: Iterable[int], *, window: int = 1) -> Generator[_Reply, None, None]:
        for number in numbers:
            yield _Reply(number, *self._replies[number])


def test_the_prefetcher_records_each_replys_own_repairs() -> None:
    short = MessageInfo(3, "uid-3", 50_000)
    infos = [MessageInfo(1, "uid-1", len(MESSAGE)), MessageInfo(2, "uid-2", len(MESSAGE)), short]
    source = _PipelinedSource({1: (MESSAGE, True), 2: (MESSAGE, False), 3: (b"Subject: cut\r\n\r\n", False)})
    deliveries = [Delivery(info, recover=False, attempts=0) for info in infos]
    spools: list[WatchedSpool] = []

    def spool_for(info: MessageInfo) -> MessageSpool:
        spools.append(WatchedSpool(info.uidl))
        return spools[-1]

    with Prefetcher(source, deliveries, spool_for) as prefetcher:  # type: ignore[arg-type]
        fetched = list(prefetcher)
    assert [f.message.repairs if f.message else None for f in fetched[:2]] == [
        "bare LF/CR line endings made CRLF",
        None,
    ]
    assert isinstance(fetched[2].error, SourceShortReplyError) and spools[2].aborted
    for item in fetched:
        item.close()
