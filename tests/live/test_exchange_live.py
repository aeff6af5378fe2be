"""Against a real on-premises Exchange (EWS): run only when the environment names one (see docs/exchange.md).

    POP_CONNECTOR_LIVE_EWS_ENDPOINT=https://mail.corp.example/EWS/Exchange.asmx \\
    POP_CONNECTOR_LIVE_EWS_USERNAME='CORP\\svc-import' POP_CONNECTOR_LIVE_EWS_PASSWORD=... \\
    POP_CONNECTOR_LIVE_EWS_MAILBOX=test.user@corp.example python -m pytest tests/live -v

It creates one folder (POP_CONNECTOR_LIVE_EWS_FOLDER, default ``Inbox/pop-connector-live-test``) and one
message in it, finds the message again as crash recovery would, and deletes the message at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from connector.config import EwsDestination
from connector.destinations.ews import EwsSession, open_ews
from connector.message import FetchedMessage, MessageSpool

PREFIX = "POP_CONNECTOR_LIVE_EWS_"
pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not os.environ.get(PREFIX + "ENDPOINT"), reason=f"no live Exchange: set {PREFIX}ENDPOINT and friends"
    ),
]


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(PREFIX + name, default)


@pytest.fixture
def live() -> Iterator[EwsSession]:
    fields = {
        "service_endpoint": env("ENDPOINT"),
        "auth": env("AUTH", "ntlm"),
        "username": env("USERNAME"),
        "password": env("PASSWORD"),
        "tenant_id": env("TENANT_ID"),
        "client_id": env("CLIENT_ID"),
        "client_secret": env("CLIENT_SECRET"),
        "version": env("VERSION"),
        "ca_file": env("CA_FILE"),
        "impersonation": env("IMPERSONATION", "0") in ("1", "true", "yes"),
    }
    destination = EwsDestination.model_validate(
        {"name": "live", "type": "ews", **{key: value for key, value in fields.items() if value is not None}}
    )
    mailbox = env("MAILBOX") or env("USERNAME") or ""
    folder = env("FOLDER", "Inbox/pop-connector-live-test") or ""
    session = open_ews(destination, mailbox=mailbox, folder=folder, mark_seen=False, timeout=60.0)
    yield session
    session.close()


@pytest.fixture
def message() -> Iterator[FetchedMessage]:
    message_id = f"<live-{uuid.uuid4().hex}@pop-connector.test>"
    raw = (
        "Received: from mx.hosted.example by pop.hosted.example; Tue, 03 Jun 2025 08:01:05 +0000\r\n"
        "From: POP Connector live test <live@pop-connector.test>\r\n"
        f"To: {env('MAILBOX') or 'test@example.org'}\r\nSubject: POP Connector live test\r\n"
        f"Date: Tue, 03 Jun 2025 07:58:00 +0000\r\nMessage-ID: {message_id}\r\n\r\n"
        "Delivered by tests/live/test_exchange_live.py; deleted at the end of the test.\r\n"
    )
    spool = MessageSpool("live-1", message_id)
    spool.write(raw.encode())
    with spool.finish() as fetched:
        yield fetched


def test_check_deliver_find(live: EwsSession, message: FetchedMessage) -> None:
    print(live.check())
    assert live.find(message) is None
    reference = live.deliver(message)
    try:
        assert live.find(message) == reference
        folder = live._resolve_folder(create=False)
        (item,) = folder.filter(message_id=message.message_id).only(
            "id", "pop_connector_flags", "datetime_received"
        )
        assert item.pop_connector_flags & 0x8 == 0  # not a draft
        assert item.datetime_received.isoformat().startswith("2025-06-03T08:01:05")
    finally:
        folder = live._resolve_folder(create=False)
        folder.filter(message_id=message.message_id).delete()
