"""A POP3 server that answers at once for any user, for load benchmarks (bench/distributed.py --scale).

Every login is accepted and every maildrop is empty (``STAT`` 0, empty ``UIDL`` and ``LIST``): a poll
against it is the idle poll of a mailbox with nothing new, and costs the server next to nothing. One
asyncio event loop in one process, no thread per connection, so that at thousands of connections per
second the server is not what a benchmark measures. Run it in a process of its own (its CPU apart from
the workers')::

    python -m tests.servers.instant_pop3 --port 0     # prints "listening on 127.0.0.1:PORT"

or in a thread with ``InstantPop3Server`` (tests). It serves plain TCP on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys
import threading
from types import TracebackType

GREETING = b"+OK instant POP3 ready\r\n"
CAPABILITIES = b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\nPIPELINING\r\n.\r\n"
EMPTY_LISTING = b"+OK 0 messages\r\n.\r\n"

# One reply per verb; a session's state (logged in or not) does not matter to an idle poll.
_REPLIES = {
    b"CAPA": CAPABILITIES,
    b"USER": b"+OK\r\n",
    b"PASS": b"+OK maildrop ready\r\n",
    b"APOP": b"+OK maildrop ready\r\n",
    b"STAT": b"+OK 0 0\r\n",
    b"UIDL": EMPTY_LISTING,
    b"LIST": EMPTY_LISTING,
    b"NOOP": b"+OK\r\n",
    b"RSET": b"+OK\r\n",
}
_QUIT = b"+OK bye\r\n"
_UNKNOWN = b"-ERR no such message or command\r\n"


class _Session(asyncio.Protocol):
    def __init__(self, counts: list[int]) -> None:
        self.counts = counts
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counts[0] += 1
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        replies = []
        while (end := self.buffer.find(b"\n")) >= 0:
            line, self.buffer = self.buffer[:end].rstrip(b"\r"), self.buffer[end + 1 :]
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"QUIT":
                replies.append(_QUIT)
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            # UIDL n / LIST n of a message that does not exist.
            reply = _REPLIES.get(verb, _UNKNOWN)
            if verb in (b"UIDL", b"LIST") and line[len(verb) :].strip():
                reply = _UNKNOWN
            replies.append(reply)
        if replies:
            self.transport.write(b"".join(replies))
        if len(self.buffer) > 4096:  # no command is that long
            self.transport.close()


async def _serve(host: str, port: int, started: asyncio.Future[int], stop: asyncio.Event) -> list[int]:
    counts = [0]
    server = await asyncio.get_running_loop().create_server(
        lambda: _Session(counts), host, port, backlog=4096, reuse_address=True
    )
    async with server:
        started.set_result(server.sockets[0].getsockname()[1])
        await stop.wait()
    return counts


class InstantPop3Server:
    """The server in a thread of this process (tests): ``with InstantPop3Server() as server: server.port``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.connections = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    def __enter__(self) -> InstantPop3Server:
        self._thread = threading.Thread(target=self._run, name="instant-pop3", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the instant POP3 server did not start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        started: asyncio.Future[int] = self._loop.create_future()
        task = asyncio.create_task(_serve(self.host, 0, started, self._stop))
        self.port = await started
        self._ready.set()
        self.connections = (await task)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        started: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(_serve(args.host, args.port, started, stop))
        print(f"listening on {args.host}:{await started}", flush=True)
        return await task

    counts = asyncio.run(run())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"served {counts[0]} connections, {usage.ru_utime + usage.ru_stime:.2f} s of CPU",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
