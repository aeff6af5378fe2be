"""Failure paths of a poll: refused messages, a full destination, TLS, large messages."""

from __future__ import annotations

import tracemalloc

import pytest

from connector.ledger.records import MessageState
from tests.integration.conftest import SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def test_refused_message_stays_on_server_and_the_rest_goes_on(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    # Dovecot refuses any APPEND over quota_max_mail_size with NO [LIMIT]: a permanent, per-message refusal.
    limited = dovecot.new_user("limited", userdb_fields={"quota_max_mail_size": "10K"})
    dovecot.seed(mail_users.source.name, [simple(0), simple(1, size=30_000), simple(2)])
    config, engine = make_sync(
        account={"retry": {"max_attempts": 2}},
        destination={"username": limited.name, "password": limited.password},
    )
    account = config.accounts[0]
    first = engine.poll(account)
    assert (first.delivered, first.failed, first.quarantined, first.status) == (2, 1, 0, "ok")
    assert any("LIMIT" in problem for problem in first.problems), first.problems
    assert dovecot.maildir_count(mail_users.source.name) == 1
    second = engine.poll(account)
    assert (second.delivered, second.failed, second.quarantined) == (0, 1, 1)
    account_id = engine.ledger.account_id(account.name) or 0
    (row,) = engine.ledger.known_messages(account_id).values()
    assert row.state is MessageState.FAILED and row.attempts == 2
    third = engine.poll(account)
    assert (third.delivered, third.failed) == (0, 0)  # quarantined: not tried again
    assert dovecot.maildir_count(mail_users.source.name) == 1  # and never deleted
    dovecot.remove_user(limited.name)


def test_full_destination_stops_the_poll_without_burning_attempts(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    full = dovecot.new_user("full", quota="12K")
    users = MailUsers(source=mail_users.source, destination=full)
    dovecot.seed(users.source.name, [simple(n, size=5000) for n in range(5)])
    config, engine = make_sync(destination={"username": full.name, "password": full.password})
    account = config.accounts[0]
    result = engine.poll(account)
    assert result.status == "error" and result.error is not None and "quota" in result.error.lower()
    assert 1 <= result.delivered < 5
    assert dovecot.maildir_count(users.source.name) == 5 - result.delivered
    account_id = engine.ledger.account_id(account.name) or 0
    pending = [
        r for r in engine.ledger.known_messages(account_id).values() if r.state is MessageState.PENDING
    ]
    # One message was refused for the quota; with MULTIAPPEND the rest of its batch was recorded too and
    # never tried. None of them lost an attempt.
    assert len(pending) >= 1 and all(row.attempts == 0 for row in pending)
    assert len(pending) + result.delivered <= 5
    dovecot.remove_user(full.name)


def test_tls_everywhere_with_the_test_ca(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1), simple(2)])
    config, engine = make_sync(
        account={"tls": "implicit", "port": dovecot.ports.pop3s, "ca_file": str(dovecot.ca_file)},
        destination={"tls": "starttls", "port": dovecot.ports.imap, "ca_file": str(dovecot.ca_file)},
    )
    assert engine.poll(config.accounts[0]).delivered == 1 + 1
    dovecot.seed(mail_users.source.name, [simple(3)])
    config, engine = make_sync(
        account={"tls": "starttls", "port": dovecot.ports.pop3, "ca_file": str(dovecot.ca_file)},
        destination={"tls": "implicit", "port": dovecot.ports.imaps, "ca_file": str(dovecot.ca_file)},
    )
    assert engine.poll(config.accounts[0]).delivered == 1
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3


def test_untrusted_certificate_is_refused(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(account={"tls": "implicit", "port": dovecot.ports.pop3s})
    result = engine.poll(config.accounts[0])
    assert result.status == "error" and result.error is not None and "certificate" in result.error.lower()
    assert dovecot.maildir_count(mail_users.source.name) == 1
    config, engine = make_sync(account={"tls": "implicit", "port": dovecot.ports.pop3s, "tls_verify": False})
    assert engine.poll(config.accounts[0]).delivered == 1


def test_twenty_megabyte_message(dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory) -> None:
    big = simple(1, size=20 * 1024 * 1024)
    dovecot.seed(mail_users.source.name, [big])
    config, engine = make_sync()
    tracemalloc.start()
    try:
        result = engine.poll(config.accounts[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (result.delivered, result.deleted) == (1, 1), result
    # One copy of the message for APPEND, plus buffers: never two copies.
    assert peak < 1.5 * len(big), f"peak Python allocations {peak / 2**20:.1f} MiB for a 20 MiB message"
    (body,) = dovecot.imap_messages(mail_users.destination.name)
    assert body == big


def test_per_account_destination_login(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    other = dovecot.new_user("own")
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(
        account={"destination_username": other.name, "destination_password": other.password}
    )
    assert engine.poll(config.accounts[0]).delivered == 1
    assert len(dovecot.imap_messages(other.name)) == 1
    assert dovecot.imap_messages(mail_users.destination.name) == []
    dovecot.remove_user(other.name)


def test_untrusted_destination_certificate_fails_the_poll_not_the_message(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    config, engine = make_sync(destination={"tls": "implicit", "port": dovecot.ports.imaps})
    result = engine.poll(config.accounts[0])
    assert result.status == "error" and result.error is not None and "certificate" in result.error.lower()
    account_id = engine.ledger.account_id(config.accounts[0].name) or 0
    (row,) = engine.ledger.known_messages(account_id).values()
    assert (row.state, row.attempts) == (MessageState.PENDING, 0)
    assert dovecot.maildir_count(mail_users.source.name) == 1
