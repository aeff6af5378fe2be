"""Pipelined RETR against the real Dovecot (which offers PIPELINING) gives exactly the bytes that RETR one
at a time gives against the scripted server without PIPELINING."""

from __future__ import annotations

import io

from bench.data import message
from connector.pop3 import Pop3Client, connect_pop3
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import ScriptedPop3Server, StoredMessage

MESSAGES = [
    message(1, 5 * 1024),
    b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n...three\r\nend.\r\n",
    message(2, 300 * 1024),  # larger than one read: a reply split over many pieces
    b"Subject: " + b"long line " * 20_000 + b"\r\n\r\nbody\r\n",
    message(3, 100),
]


def fetch_all(client: Pop3Client, window: int) -> list[bytes]:
    bodies = []
    with client:
        for reply in client.retr_many(range(1, len(MESSAGES) + 1), window=window):
            sink = io.BytesIO()
            reply.into(sink)
            bodies.append(sink.getvalue())
    return bodies


def test_pipelined_retr_from_dovecot_equals_one_at_a_time(dovecot: Dovecot, mail_users: MailUsers) -> None:
    dovecot.seed(mail_users.source.name, MESSAGES)
    client = connect_pop3(dovecot.host, dovecot.ports.pop3, tls="none", ssl_context=None, timeout=30)
    client.login(mail_users.source.name, mail_users.source.password)
    assert client.pipelining
    from_dovecot = fetch_all(client, window=4)

    stored = [StoredMessage(f"u{n}", content) for n, content in enumerate(MESSAGES)]
    with ScriptedPop3Server(stored, pipelining=False) as server:
        client = connect_pop3(server.host, server.port, tls="none", ssl_context=None, timeout=30)
        client.login("alice", "secret")
        assert not client.pipelining
        from_scripted = fetch_all(client, window=4)

    assert from_dovecot == from_scripted == MESSAGES
