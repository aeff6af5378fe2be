"""The delivery journal (connector/ledger/journal.py) and `pop-connector report` on real servers: what was
moved stays provable after the ledger forgot the messages, and after a restart."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from connector.cli.delivery_report import build, render
from connector.ledger.database import open_database
from connector.ledger.models import DeliveryRow
from connector.ledger.store import Ledger
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration


def test_every_delivery_is_journaled_and_the_totals_outlive_the_ledgers_rows(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    config, engine = make_sync()
    account = config.accounts[0]

    first = engine.poll(account)
    assert (first.delivered, first.deleted) == (3, 3)
    # The messages are gone from the server: the next polls forget their rows (policies/listing.py).
    engine.poll(account)

    entries = engine.ledger.journal.deliveries(account.name)
    delivered = dovecot.imap_messages(mail_users.destination.name)
    assert len(entries) == 3 == len(delivered)
    for (entry, at), n in zip(entries, range(3), strict=True):
        assert entry.message_id == f"<msg-{n}@example.org>" or entry.message_id
        assert entry.size > len(simple(n)) and len(entry.sha256) == 64  # the stamp line was added
        assert entry.ref.startswith("imap:") and not entry.recovered and entry.recipient is None
        assert entry.poll_started_at is not None and at >= entry.poll_started_at

    # A new process: the same totals from the database alone.
    assert config.service.database is not None
    again = Ledger(open_database(config.service.database))
    [totals] = again.journal.totals([account.name])
    assert (totals.messages, totals.recovered, totals.quarantined) == (3, 0, 0)
    assert totals.bytes == sum(entry.size for entry, _ in entries)
    assert totals.first_delivery_at is not None and totals.last_delivery_at is not None

    [report] = build(again, [account.name])
    assert report.on_server == 0
    assert report.verdict == "complete: source empty, 3 delivered, 0 quarantined"
    rows = json.loads(render([report], "json"))
    assert rows[0]["delivered"] == 3 and rows[0]["quarantined"] == []
    page = render([report], "html")
    assert page.startswith("<!DOCTYPE html>") and "complete: source empty" in page and "<script" not in page


def test_a_migration_in_progress_says_what_is_left(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(4)])
    config, engine = make_sync(account={"max_messages_per_poll": 1})
    account = config.accounts[0]

    engine.poll(account)

    [report] = build(engine.ledger, [account.name])
    assert report.totals.messages == 1
    assert report.on_server == 4  # listed before the one was deleted at QUIT
    assert report.verdict.startswith("in progress: 4 on the server")
    table = render([report], "table")
    assert account.name in table and "in progress" in table


def test_journal_rows_older_than_the_retention_are_pruned_but_the_totals_stay(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(0)])
    config, engine = make_sync(service={"journal_retention": "30d"})
    account = config.accounts[0]
    engine.poll(account)
    with engine.ledger.engine.begin() as connection:  # as if delivered 40 days ago
        connection.execute(update(DeliveryRow).values(delivered_at=datetime.now(UTC) - timedelta(days=40)))

    dovecot.seed(mail_users.source.name, [simple(1)])
    engine.poll(account)

    entries = engine.ledger.journal.deliveries(account.name)
    assert [entry.size for entry, _ in entries] and len(entries) == 1  # only the recent one
    [totals] = engine.ledger.journal.totals([account.name])
    assert totals.messages == 2


def test_a_delivery_whose_record_was_never_committed_is_not_journaled(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    """The journal row rides with the deferred ``delivered`` write: a poll that dies before committing it
    journals nothing, and the next poll, which finds the message in the destination, journals it once as
    recovered."""
    dovecot.seed(mail_users.source.name, [simple(0)])
    config, engine = make_sync()
    account = config.accounts[0]
    ledger = engine.ledger
    original = ledger.poll_finished

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the process dies before the poll's last transaction

    ledger.poll_finished = crash  # type: ignore[method-assign]
    original_flush = ledger.flush
    ledger.flush = crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        engine.poll(account)
    ledger.poll_finished = original  # type: ignore[method-assign]
    ledger.flush = original_flush  # type: ignore[method-assign]
    ledger.discard_deferred(ledger.account_id(account.name) or 0)
    assert ledger.journal.deliveries(account.name) == []

    result = engine.poll(account)

    assert (result.delivered, result.recovered) == (0, 1)
    [(entry, _)] = ledger.journal.deliveries(account.name)
    assert entry.recovered
    [totals] = ledger.journal.totals([account.name])
    assert (totals.messages, totals.recovered) == (1, 1)
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 1
