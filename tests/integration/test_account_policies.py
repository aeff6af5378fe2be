"""Account-level retry policies (issue 4): back-off, LOGIN-DELAY, auth failures, suspension, EXPIRE 0.

Faults Dovecot cannot produce on demand come from the scripted POP3 server; delivery goes to the real
Dovecot IMAP server either way.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from connector.cli.report import status_records, status_text
from connector.ledger.database import open_database
from connector.ledger.lease import PollLease
from connector.ledger.store import Ledger
from connector.poll import engine as engine_module
from tests.integration.conftest import SyncFactory, scripted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import CloseConnection, Pop3Session, ScriptedPop3Server, StoredMessage

pytestmark = pytest.mark.integration


@pytest.fixture
def database(sqlite_url: str) -> str:
    return sqlite_url


def ledger_of(engine: object) -> Ledger:
    return engine.ledger  # type: ignore[attr-defined,no-any-return]


def test_login_delay_reply_waits_for_the_announced_delay(
    pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.extra_capabilities = ["TOP", "UIDL", "USER", "RESP-CODES", "LOGIN-DELAY 900"]
    pop3.fail("PASS", "-ERR [LOGIN-DELAY] wait a little")
    config, engine = make_sync(account=scripted(pop3))
    before = datetime.now(UTC)
    result = engine.poll(config.accounts[0])
    assert result.status == "error" and "LOGIN-DELAY" in (result.error or "")
    assert result.next_poll_at is not None and result.next_poll_at >= before + timedelta(seconds=900)


def test_successful_poll_waits_at_least_login_delay(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.extra_capabilities = ["TOP", "UIDL", "USER", "LOGIN-DELAY 900"]
    config, engine = make_sync(account=scripted(pop3, poll_interval="1m"))
    before = datetime.now(UTC)
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered) == ("ok", 3)
    assert result.next_poll_at is not None and result.next_poll_at >= before + timedelta(seconds=900)


@pytest.fixture
def quick_in_use_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "IN_USE_RETRY_AFTER", 0.05)


@pytest.mark.usefixtures("quick_in_use_retry")
def test_a_maildrop_locked_once_is_polled_after_one_more_login(
    pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    """Another process's idle poll of the account holds the lock for a moment and leaves no trace in the
    ledger (a lease is taken by a poll's first write): no failure for that, one more login a little later."""
    pop3.fail("PASS", "-ERR [IN-USE] maildrop locked", times=1)
    config, engine = make_sync(account=scripted(pop3))
    result = engine.poll(config.accounts[0])
    assert (result.status, result.delivered, result.error) == ("ok", 3, None)
    (status,) = ledger_of(engine).statuses()
    assert status.consecutive_failures == 0
    assert sum(c.startswith("PASS") for c in pop3.recorded.commands) == 2


@pytest.mark.usefixtures("quick_in_use_retry")
def test_a_maildrop_locked_by_another_processs_poll_leaves_the_account_to_it(
    pop3: ScriptedPop3Server, make_sync: SyncFactory, database: str
) -> None:
    """The lock is another process's poll, which has taken the lease by the time this one would log in
    again: this poll is ``busy`` (skipped, no failure, no second login) and writes nothing."""
    config, engine = make_sync(account=scripted(pop3))
    account = config.accounts[0]
    other_process = Ledger(open_database(database))
    held: list[PollLease] = []

    def locked_by_the_other_poll(session: Pop3Session, _argument: str) -> None:
        account_id = other_process.account_id(account.name)
        assert account_id is not None
        taken = other_process.leases.take_for_poll(account_id, account.name, timedelta(minutes=5))
        assert isinstance(taken, PollLease)
        held.append(taken)
        session.err("[IN-USE] maildrop locked")

    pop3.on("PASS", locked_by_the_other_poll)
    try:
        result = engine.poll(account)
    finally:
        for lease in held:
            lease.close()
        other_process.engine.dispose()
    assert result.status == "busy" and "another process" in (result.error or "")
    assert result.delivered == 0 and sum(c.startswith("PASS") for c in pop3.recorded.commands) == 1
    (status,) = ledger_of(engine).statuses()
    assert status.consecutive_failures == 0


@pytest.mark.usefixtures("quick_in_use_retry")
def test_in_use_backs_off_exponentially(pop3: ScriptedPop3Server, make_sync: SyncFactory) -> None:
    pop3.fail("PASS", "-ERR [IN-USE] maildrop locked")
    config, engine = make_sync(account=scripted(pop3, retry={"initial_backoff": "10m", "max_backoff": "1d"}))
    account = config.accounts[0]
    first_start = datetime.now(UTC)
    first = engine.poll(account)
    second_start = datetime.now(UTC)
    second = engine.poll(account)
    assert first.status == second.status == "error" and "IN-USE" in (first.error or "")
    assert first.next_poll_at is not None and second.next_poll_at is not None
    # 10 minutes ±20%, then 20 minutes ±20%.
    assert first_start + timedelta(minutes=8) <= first.next_poll_at
    assert second.next_poll_at >= second_start + timedelta(minutes=16)
    (status,) = ledger_of(engine).statuses()
    assert status.consecutive_failures == 2
    assert "BACKING OFF after 2 failed polls" in status_text(status_records(config.accounts, [status]))


def test_refused_login_backs_off_an_hour_and_says_so(
    pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    config, engine = make_sync(account=scripted(pop3, password="wrong-password-xyz"))
    before = datetime.now(UTC)
    result = engine.poll(config.accounts[0])
    assert result.status == "auth_error"
    assert result.next_poll_at is not None and result.next_poll_at >= before + timedelta(hours=1)
    text = status_text(status_records(config.accounts, ledger_of(engine).statuses()))
    assert "AUTHENTICATION FAILING" in text and "wrong-password-xyz" not in text


def test_suspended_after_max_consecutive_failures_until_resumed(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    pop3.fail("PASS", "-ERR [SYS/TEMP] backend down", times=2)
    config, engine = make_sync(account=scripted(pop3, retry={"max_consecutive_failures": 2}))
    account = config.accounts[0]
    assert engine.poll(account).status == "error"
    assert engine.poll(account).status == "error"
    connections = pop3.recorded.connections
    suspended = engine.poll(account)
    assert suspended.status == "suspended" and not suspended.ok
    assert f"pop-connector resume {account.name}" in (suspended.error or "")
    assert pop3.recorded.connections == connections  # not even a connection while suspended
    text = status_text(status_records(config.accounts, ledger_of(engine).statuses()))
    assert "SUSPENDED since" in text and "2 consecutive failed polls" in text and "SYS/TEMP" in text
    assert ledger_of(engine).suspensions.resume(account.name)
    resumed = engine.poll(account)
    assert (resumed.status, resumed.delivered) == ("ok", 3)
    (status,) = ledger_of(engine).statuses()
    assert status.suspended_at is None and status.consecutive_failures == 0


def test_expire_zero_server_gets_no_quit_while_a_message_is_undelivered(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    # EXPIRE 0: QUIT would remove every retrieved message, also the one the destination refused.
    limited = dovecot.new_user("limited", userdb_fields={"quota_max_mail_size": "10K"})
    messages = [StoredMessage("a", simple(1)), StoredMessage("big", simple(2, size=30_000))]
    with ScriptedPop3Server(messages, capabilities=["TOP", "UIDL", "USER", "EXPIRE 0"]) as server:
        config, engine = make_sync(
            account=scripted(server, retry={"max_attempts": 2}),
            destination={"username": limited.name, "password": limited.password},
        )
        account = config.accounts[0]
        first = engine.poll(account)
        assert (first.delivered, first.failed, first.deleted) == (1, 1, 0)
        assert any("EXPIRE 0" in problem for problem in first.problems)
        assert "QUIT" not in server.recorded.commands and server.recorded.deleted == []
        second = engine.poll(account)  # the big one is quarantined, and was retrieved once more
        assert (second.quarantined, second.deleted) == (1, 0) and "QUIT" not in server.recorded.commands
        third = engine.poll(account)  # not retrieved now: QUIT is safe again
        assert (third.delivered, third.deleted) == (0, 1)
        assert server.recorded.deleted == ["a"] and [m.uidl for m in server.messages] == ["big"]
    dovecot.remove_user(limited.name)


def test_connection_dropped_in_the_middle_of_retr(
    dovecot: Dovecot, mail_users: MailUsers, pop3: ScriptedPop3Server, make_sync: SyncFactory
) -> None:
    def half_then_drop(session: Pop3Session, argument: str) -> None:
        if argument == "2":
            session.send_raw(b"+OK message follows\r\nSubject: test message 1\r\nFrom: half")
            raise CloseConnection
        session.default("RETR", argument)

    pop3.on("RETR", half_then_drop)
    config, engine = make_sync(account=scripted(pop3))
    account = config.accounts[0]
    first = engine.poll(account)
    assert first.status == "error" and "closed the connection" in (first.error or "")
    assert first.delivered == 1 and first.deleted == 0  # no QUIT: the server deletes nothing
    assert len(pop3.messages) == 3
    del pop3.hooks["RETR"]
    second = engine.poll(account)
    assert (second.status, second.delivered, second.deleted) == ("ok", 2, 3)
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 3  # none twice, none lost


def test_runaway_retr_reply_is_quarantined_so_the_mailbox_goes_on(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LIST says a few hundred bytes; RETR sends 60 KB. Past the bound the session is unusable, so that poll
    # fails, but the message is quarantined: the next poll gets past it instead of failing on it for ever.
    monkeypatch.setattr("connector.poll.fetch.RETR_SLACK_BYTES", 1000)
    runaway = b"Subject: runaway\r\n\r\n" + (b"y" * 998 + b"\r\n") * 60 + b".\r\n"
    messages = [
        StoredMessage("a", simple(1)),
        StoredMessage("runaway", simple(2), wire=runaway),
        StoredMessage("c", simple(3)),
    ]
    with ScriptedPop3Server(messages) as server:
        config, engine = make_sync(account=scripted(server))
        account = config.accounts[0]
        first = engine.poll(account)
        assert first.status == "error" and "longer than" in (first.error or ""), first
        assert first.quarantined == 1
        second = engine.poll(account)
        assert second.status == "ok", second
        assert [m.uidl for m in server.messages] == ["runaway"]  # left on the server
    assert sorted(dovecot.imap_messages(mail_users.destination.name)) == sorted([simple(1), simple(3)])
    (row,) = [q for q in ledger_of(engine).quarantine.messages() if q.uidl == "runaway"]
    assert "far more than" in (row.last_error or "")
