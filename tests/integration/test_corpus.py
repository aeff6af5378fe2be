"""The hostile-message corpus (tests/corpus/*.eml, made by make_corpus.py) through real Dovecot: every
message is delivered exactly once, or quarantined with a reason, and the mailbox around it goes on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.delivery import match_deliveries
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration

CORPUS = sorted((Path(__file__).parents[1] / "corpus").glob("*.eml"))


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


def test_every_hostile_message_is_delivered_or_quarantined(
    make_sync: SyncFactory, dovecot: Dovecot, mail_users: MailUsers, sqlite_url: str
) -> None:
    hostile = [path.read_bytes() for path in CORPUS]
    dovecot.seed(mail_users.source.name, [simple(1), *hostile, simple(2)])
    # What the POP3 server serves is the reference (Dovecot's Maildir keeps LF line endings, so a bare CR
    # before a CRLF in the file as seeded already comes back as one line break).
    served = dovecot.pop3_contents(mail_users.source.name)
    assert len(served) == len(hostile) + 2
    config, engine = make_sync(account={"retry": {"max_attempts": 1}})

    result = engine.poll(config.accounts[0])
    assert result.status == "ok", result.error

    delivered = dovecot.imap_messages(mail_users.destination.name)
    counts = match_deliveries(served, delivered)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
        failed = dict(conn.execute("SELECT uidl, last_error FROM messages WHERE state = 'failed'").fetchall())
    assert all(reason for reason in failed.values()), "a quarantined message must say why"
    assert len(failed) == result.quarantined
    not_delivered = [CORPUS[i - 1].name for i in range(1, len(served) - 1) if counts[i] == 0]
    assert len(not_delivered) == len(failed), (not_delivered, failed)
    assert counts[0] == 1 and counts[len(served) - 1] == 1, "the mailbox around the corpus goes on"
    assert max(counts.values()) == 1, "delivered twice"
    assert dovecot.maildir_count(mail_users.source.name) == len(failed)
