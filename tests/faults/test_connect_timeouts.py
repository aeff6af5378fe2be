"""The connect phase has a timeout too: a server whose accept queue is full never completes the TCP
handshake, and neither the POP3 client nor the IMAP destination may wait for it forever."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from connector.destinations.imap import open_imap
from connector.errors import DestinationConnectError, SourceConnectError
from connector.pop3 import connect_pop3


@pytest.fixture
def unanswering_port() -> Iterator[int]:
    """A port that listens but whose full backlog makes the kernel drop new SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
    except TimeoutError:
        pass
    else:
        pytest.fail("could not make a port that never completes the TCP handshake")
    finally:
        probe.close()
    try:
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


def test_pop3_connect_times_out(unanswering_port: int) -> None:
    with pytest.raises(SourceConnectError, match="timed out"):
        connect_pop3("127.0.0.1", unanswering_port, tls="none", ssl_context=None, timeout=1)


def test_imap_connect_times_out(unanswering_port: int) -> None:
    with pytest.raises(DestinationConnectError, match="timed out"):
        open_imap(
            host="127.0.0.1",
            port=unanswering_port,
            tls="none",
            ssl_context=None,
            timeout=1,
            username="u",
            password="p",
            folder="INBOX",
            mark_seen=False,
        )
