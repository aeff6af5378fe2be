"""Live tests against a real Gmail mailbox or Google Workspace user. Skipped unless set up:

    POP_CONNECTOR_LIVE_GMAIL_USER              the address to import into
  and either (Google Workspace, a service account with domain-wide delegation for the user):
    POP_CONNECTOR_LIVE_GMAIL_KEY_FILE          the service account's JSON key
  or (personal Gmail, after `pop-connector authorize`):
    POP_CONNECTOR_LIVE_GMAIL_CLIENT_SECRETS    the Desktop app client's JSON
    POP_CONNECTOR_LIVE_GMAIL_TOKEN_DIR         where `authorize` stored the consent
  optional:
    POP_CONNECTOR_LIVE_GMAIL_IMPORT=1          also import one test message (label "pop-connector-live-test")

Run: ``python -m pytest tests/live/test_gmail_live.py -v``. Without IMPORT it only signs in and reads the
profile and labels (`check`); with it, one small message is imported, found again by the recovery lookup,
and left in the mailbox (the connector's scopes cannot delete mail). See docs/gmail.md for the set-up.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from connector.config import Account, GmailDestination
from connector.destinations.base import look_up
from connector.destinations.gmail import open_gmail
from connector.message import MessageSpool, fallback_message_id, stamp_key

PREFIX = "POP_CONNECTOR_LIVE_GMAIL_"
LABEL = "pop-connector-live-test"

pytestmark = pytest.mark.live


def _env(name: str) -> str | None:
    return os.environ.get(PREFIX + name) or None


def _destination() -> tuple[GmailDestination, str]:
    user, key, secrets, tokens = _env("USER"), _env("KEY_FILE"), _env("CLIENT_SECRETS"), _env("TOKEN_DIR")
    if not user or not (key or (secrets and tokens)):
        pytest.skip(f"set {PREFIX}USER and KEY_FILE, or CLIENT_SECRETS and TOKEN_DIR")
    fields: dict[str, object] = {"name": "live", "type": "gmail", "labels": [LABEL], "account_label": ""}
    if key:
        fields["service_account_key"] = {"file": key}
    else:
        fields |= {"client_secrets": {"file": secrets}, "token_dir": tokens}
    return GmailDestination.model_validate(fields), user


def _account(user: str) -> Account:
    return Account.model_validate(
        {
            "name": "live",
            "host": "pop.invalid",
            "username": "live",
            "password": "unused-live",
            "destination": "live",
            "mailbox": user,
        }
    )


def test_sign_in_and_check() -> None:
    destination, user = _destination()
    session = open_gmail(destination, _account(user), user)
    try:
        assert user.lower() in str(session.check()).lower()
    finally:
        session.close()


def test_import_once_and_find_it_again() -> None:
    if not _env("IMPORT"):
        pytest.skip(f"set {PREFIX}IMPORT=1 to import one test message")
    destination, user = _destination()
    account = _account(user)
    uidl = f"live-{datetime.now(UTC):%Y%m%d%H%M%S}"
    spool = MessageSpool(
        uidl,
        fallback_message_id("live", "pop.invalid", "live", uidl),
        stamp_key=stamp_key("live", "pop.invalid", "live"),
    )
    spool.write(
        f"Subject: POP Connector live test {uidl}\r\nFrom: live@pop.invalid\r\nTo: {user}\r\n"
        f"Date: {datetime.now(UTC):%a, %d %b %Y %H:%M:%S +0000}\r\n\r\n"
        "A test message; it may be deleted.\r\n".encode()
    )
    session = open_gmail(destination, account, user)
    try:
        with spool.finish() as message:
            ref = session.deliver(message)
            assert ref.startswith("gmail:")
            assert look_up(session, message) is not None
    finally:
        session.close()
