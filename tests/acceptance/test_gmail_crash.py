"""SIGKILL at each step of a Gmail import, then a rerun: every message is in the Gmail mailbox exactly once
(the rerun's lookup finds what the killed process imported), none is lost."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.destinations.gmail_tokens import GMAIL_SCOPES
from tests.acceptance.conftest import RunCli
from tests.configs import write_tables
from tests.delivery import assert_exactly_once
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.gmail import GmailServer

pytestmark = pytest.mark.acceptance

USER = "alice@example.com"


@pytest.fixture
def gmail() -> Iterator[GmailServer]:
    with GmailServer() as server:
        server.add_user(USER)
        yield server


@pytest.fixture
def config(
    gmail: GmailServer, dovecot: Dovecot, mail_users: MailUsers, sqlite_url: str, tmp_path: Path
) -> str:
    account = gmail.tokens.add_service_account(scopes=GMAIL_SCOPES, users=[USER])
    key = account.write_key(tmp_path / "service-account.json")
    destination = {
        "name": "workspace",
        "type": "gmail",
        "service_account_key": {"file": str(key)},
        "api_url": gmail.api_url,
        "ca_file": str(gmail.ca_file),
    }
    fields = {
        "name": "alice",
        "host": dovecot.host,
        "port": dovecot.ports.pop3,
        "tls": "none",
        "username": mail_users.source.name,
        "password": mail_users.source.password,
        "destination": "workspace",
        "mailbox": USER,
        "timeout": "20s",
    }
    return str(write_tables(tmp_path / "config.toml", sqlite_url, [destination], [fields]))


@pytest.mark.parametrize(
    ("point", "imported_before_crash", "recovered"),
    [
        # The 2nd message's ``delivered`` commits with the 3rd's ``pending``: killed before it, the 2nd is
        # imported but recorded ``pending``.
        ("before-pending", 2, 1),
        ("before-import", 2, 0),
        ("after-import", 3, 1),  # Gmail has the 3rd message, the ledger does not know
        ("mid-upload", 2, 0),  # the 3rd message's upload was cut after its first chunk
    ],
)
def test_killed_then_rerun_imports_exactly_once(
    gmail: GmailServer,
    dovecot: Dovecot,
    mail_users: MailUsers,
    config: str,
    run_cli: RunCli,
    point: str,
    imported_before_crash: int,
    recovered: int,
) -> None:
    messages = [simple(n, size=300_000) for n in range(5)]  # each goes in a resumable upload of 2 chunks
    messages[2] = simple(2, size=300_000, message_id=False)  # and one whose Message-ID the connector adds
    dovecot.seed(mail_users.source.name, messages)
    served = dovecot.pop3_contents(mail_users.source.name)
    crashed = run_cli(
        point, "3", "--", "--config", config, "sync", module="tests.acceptance.gmail_crash_driver"
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    assert dovecot.maildir_count(mail_users.source.name) == 5  # nothing is deleted before QUIT
    assert len(gmail.imports_for(USER)) == imported_before_crash
    if point == "mid-upload":  # an upload session holds the first chunk, and no more
        assert [len(up.data) for up in gmail.sessions.values() if up.done is None] == [256 * 1024]

    rerun = run_cli("--config", config, "sync")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_exactly_once(served, [record.data for record in gmail.imports_for(USER)])
    assert dovecot.maildir_count(mail_users.source.name) == 0
    assert f"recovered={recovered}" in rerun.stdout, rerun.stdout

    third = run_cli("--config", config, "sync")
    assert third.returncode == 0 and "delivered=0 recovered=0" in third.stdout, third.stdout
