"""Live tests against a real Exchange Online tenant. Skipped unless credentials are in the environment:

    POP_CONNECTOR_LIVE_EXO_TENANT_ID       directory (tenant) ID or domain, e.g. contoso.onmicrosoft.com
    POP_CONNECTOR_LIVE_EXO_CLIENT_ID       application (client) ID of the app registration
    POP_CONNECTOR_LIVE_EXO_CLIENT_SECRET   its client secret, or instead:
    POP_CONNECTOR_LIVE_EXO_CERTIFICATE_FILE  PEM with private key and certificate (or .pfx)
    POP_CONNECTOR_LIVE_EXO_MAILBOX         the mailbox the app was given FullAccess to
  optional:
    POP_CONNECTOR_LIVE_EXO_DELIVER=1       also APPEND one test message (folder below, created if missing)
    POP_CONNECTOR_LIVE_EXO_FOLDER          default "pop-connector-live-test"
    POP_CONNECTOR_LIVE_EXO_POP3=1          also log in over POP3 with XOAUTH2 (needs POP.AccessAsApp)

Run: ``python -m pytest tests/live -v``. Nothing is written unless DELIVER is set; the POP3 test only
runs STAT. See docs/exchange-online.md for the tenant set-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connector.destinations.imap import ImapSession, open_imap
from connector.errors import SourceAuthError
from connector.message import MessageSpool, fallback_message_id
from connector.oauth import EntraCredentials, TokenProviders, login_with_token
from connector.pop3 import connect_pop3
from connector.tls import make_ssl_context

PREFIX = "POP_CONNECTOR_LIVE_EXO_"
HOST = "outlook.office365.com"

pytestmark = pytest.mark.live


def _env(name: str) -> str | None:
    return os.environ.get(PREFIX + name) or None


def _credentials() -> EntraCredentials:
    tenant, client, mailbox = _env("TENANT_ID"), _env("CLIENT_ID"), _env("MAILBOX")
    secret, certificate = _env("CLIENT_SECRET"), _env("CERTIFICATE_FILE")
    if not (tenant and client and mailbox and (secret or certificate)):
        pytest.skip(f"set {PREFIX}TENANT_ID, CLIENT_ID, MAILBOX and CLIENT_SECRET or CERTIFICATE_FILE")
    return EntraCredentials(
        tenant_id=tenant,
        client_id=client,
        client_secret=secret,
        certificate_file=Path(certificate) if certificate else None,
    )


@pytest.fixture(scope="module")
def providers() -> TokenProviders:
    return TokenProviders()


@pytest.fixture
def session(providers: TokenProviders) -> Iterator[ImapSession]:
    credentials = _credentials()
    imap = open_imap(
        host=HOST,
        port=993,
        tls="implicit",
        ssl_context=make_ssl_context(),
        timeout=60,
        username=os.environ[PREFIX + "MAILBOX"],
        password=None,
        token_provider=providers.get(credentials),
        folder=_env("FOLDER") or "pop-connector-live-test",
        mark_seen=False,
    )
    with imap:
        yield imap


def test_imap_xoauth2_login_and_folder_check(session: ImapSession) -> None:
    found = session.check()
    assert found.folder == session.folder


def test_imap_delivery(session: ImapSession) -> None:
    if _env("DELIVER") != "1":
        pytest.skip(f"set {PREFIX}DELIVER=1 to append a test message")
    now = datetime.now(UTC)
    raw = (
        f"From: pop-connector live test <noreply@example.invalid>\r\nTo: {session.folder}\r\n"
        f"Subject: pop-connector live test {now.isoformat()}\r\nDate: {now:%a, %d %b %Y %H:%M:%S +0000}\r\n"
        f"Message-ID: <live-{now.timestamp()}@pop-connector.invalid>\r\n\r\nA test message.\r\n"
    ).encode()
    spool = MessageSpool("live", fallback_message_id("live", "live", "live", "live"))
    spool.write(raw)
    with spool.finish() as message:
        reference = session.deliver(message)
        assert reference.startswith(f"imap:{session.folder}")
        assert session.find(message) is not None


def test_pop3_xoauth2_login(providers: TokenProviders) -> None:
    credentials = _credentials()
    if _env("POP3") != "1":
        pytest.skip(f"set {PREFIX}POP3=1 to log in over POP3 (the app needs POP.AccessAsApp)")
    provider = providers.get(credentials)
    mailbox = os.environ[PREFIX + "MAILBOX"]
    with connect_pop3(HOST, 995, tls="implicit", ssl_context=make_ssl_context(), timeout=60) as client:
        login_with_token(provider, lambda token: client.authenticate_xoauth2(mailbox, token), SourceAuthError)
        count, size = client.stat()
        assert count >= 0 and size >= 0
