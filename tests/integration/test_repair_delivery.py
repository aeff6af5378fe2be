"""Repaired and unparsable messages delivered to the real Dovecot IMAP server (issue 4)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from connector.ledger.store import Ledger
from tests.integration.conftest import SyncFactory
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import ScriptedPop3Server, StoredMessage, dot_stuffed

pytestmark = pytest.mark.integration

LONG = b"z" * 3000
# Bare LF line endings, a NUL byte and a 3000-octet line, as a sloppy server sends them on the wire.
DAMAGED_WIRE = b"Subject: damaged\nMessage-ID: <damaged@x>\n\nnul\0byte\n" + LONG + b"\n.\r\n"
REPAIRED = b"Subject: damaged\r\nMessage-ID: <damaged@x>\r\n\r\nnulbyte\r\n" + LONG + b"\r\n"
GARBAGE = b"\x01\x02 no header section at all \xff\xfe\r\n\xc3(\r\n"


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def pop3() -> Iterator[ScriptedPop3Server]:
    messages = [
        StoredMessage("damaged", REPAIRED, wire=DAMAGED_WIRE),
        StoredMessage("garbage", GARBAGE, wire=dot_stuffed(GARBAGE.split(b"\r\n")[:-1])),
    ]
    with ScriptedPop3Server(messages) as server:
        yield server


def test_repairs_are_delivered_recorded_and_found_again(
    dovecot: Dovecot,
    mail_users: MailUsers,
    pop3: ScriptedPop3Server,
    make_sync: SyncFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, engine = make_sync(
        account={"port": pop3.port, "username": pop3.username, "password": pop3.password, "retention": "keep"}
    )
    account = config.accounts[0]
    caplog.set_level(logging.DEBUG, logger="connector")
    result = engine.poll(account)
    assert (result.status, result.delivered, result.failed) == ("ok", 2, 0), result
    delivered = dovecot.imap_messages(mail_users.destination.name)
    assert delivered[0] == REPAIRED  # CRLF, no NUL, the long line whole
    # Unparsable: still delivered, as raw bytes, with only a Message-ID added so it can be found again.
    assert delivered[1].endswith(GARBAGE) and delivered[1].startswith(b"Message-ID: <pop-connector.")
    ledger: Ledger = engine.ledger  # type: ignore[attr-defined]
    with ledger.engine.begin() as connection:
        repairs = dict(connection.execute(text("SELECT uidl, repairs FROM messages")).all())
        assert "CRLF" in repairs["damaged"] and "1 NUL" in repairs["damaged"]
        # The 3000-octet line went as it was: no repair, and only a DEBUG line says so.
        assert "998" not in repairs["damaged"]
        long_lines = [record for record in caplog.records if "over 998 octets" in record.getMessage()]
        assert [record.levelno for record in long_lines] == [logging.DEBUG]
        assert "left as they are" in long_lines[0].getMessage()
        # As after a crash between APPEND and the ledger commit: the delivered copies must be found.
        connection.execute(text("UPDATE messages SET state = 'pending'"))
    again = engine.poll(account)
    assert (again.delivered, again.recovered) == (0, 2), again
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 2
