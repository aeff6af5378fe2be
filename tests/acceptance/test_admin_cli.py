"""`pop-connector quarantine list|retry` and `resume`, as an admin runs them, against the real Dovecot."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance


def test_quarantine_list_and_retry_checks_the_destination_first(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    # Dovecot refuses APPENDs over quota_max_mail_size for good: both big messages end in quarantine.
    limited = dovecot.new_user("limited", userdb_fields={"quota_max_mail_size": "10K"})
    big = [simple(1, size=30_000), simple(2, size=30_000)]
    dovecot.seed(mail_users.source.name, big)
    config = str(
        write_cfg(
            account={"retry": {"max_attempts": 1}},
            destination={"username": limited.name, "password": limited.password},
        )
    )
    assert run_cli("--config", config, "sync").returncode == 1
    listing = run_cli("--config", config, "quarantine", "list")
    assert listing.returncode == 0 and listing.stdout.count("attempts=1") == 2, listing.stdout
    assert "reason:" in listing.stdout and "LIMIT" in listing.stdout
    ids = [int(found) for found in re.findall(r"^\s+(\d+)\s+alice", listing.stdout, re.MULTILINE)]
    assert len(ids) == 2
    assert dovecot.maildir_count(mail_users.source.name) == 2  # quarantined mail stays on the server

    # Now a destination that takes them, where the first one already is (as if a refusal had lied).
    dovecot.seed(mail_users.destination.name, [big[0]])
    config = str(write_cfg(account={"retry": {"max_attempts": 1}}))
    retry = run_cli("--config", config, "quarantine", "retry", str(ids[0]))
    assert retry.returncode == 0 and "1 message(s) will be retried" in retry.stdout, retry.stdout
    first = run_cli("--config", config, "sync")
    assert "delivered=0 recovered=1" in first.stdout, first.stdout + first.stderr
    assert run_cli("--config", config, "quarantine", "retry", "--all").returncode == 0
    second = run_cli("--config", config, "sync")
    assert second.returncode == 0 and "delivered=1" in second.stdout, second.stdout
    assert sorted(dovecot.imap_messages(mail_users.destination.name)) == sorted(big)
    assert run_cli("--config", config, "quarantine", "list").stdout.strip() == "no quarantined messages"
    assert run_cli("--config", config, "quarantine", "retry").returncode == 2
    dovecot.remove_user(limited.name)


def test_suspended_account_is_shown_and_resumed(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    wrong = str(write_cfg(account={"password": "wrong-pw-123", "retry": {"max_consecutive_failures": 1}}))
    assert run_cli("--config", wrong, "sync").returncode == 1
    status = run_cli("--config", wrong, "status")
    assert "SUSPENDED since" in status.stdout and "pop-connector resume alice" in status.stdout
    assert "wrong-pw-123" not in status.stdout + status.stderr
    fixed = str(write_cfg(account={"retry": {"max_consecutive_failures": 1}}))
    still = run_cli("--config", fixed, "sync")
    assert still.returncode == 1 and "alice: suspended" in still.stdout
    resumed = run_cli("--config", fixed, "resume", "alice")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout
    after = run_cli("--config", fixed, "sync")
    assert after.returncode == 0 and "delivered=1" in after.stdout, after.stdout
    assert run_cli("--config", fixed, "resume", "nobody").returncode == 2


def test_baseline_records_what_is_there_without_downloading(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1), simple(2)])
    config = str(write_cfg())
    baseline = run_cli("--config", config, "baseline", "--account", "alice")
    assert baseline.returncode == 0 and "2 of the 2 messages" in baseline.stdout, baseline.stderr
    dovecot.seed(mail_users.source.name, [simple(3)])
    sync = run_cli("--config", config, "sync")
    assert sync.returncode == 0 and "delivered=1" in sync.stdout and "deleted=1" in sync.stdout
    assert dovecot.imap_messages(mail_users.destination.name) == [simple(3)]
    assert dovecot.maildir_count(mail_users.source.name) == 2  # never delivered by us: never deleted
    status = run_cli("--config", config, "status", "--json")
    assert '"seen": 2' in status.stdout
    again = run_cli("--config", config, "baseline", "--account", "alice")
    assert "0 of the 2 messages" in again.stdout


def _addressed(n: int, *lines: str) -> bytes:
    return simple(n).replace(b"To: alice@example.net\r\n", "".join(f"{line}\r\n" for line in lines).encode())


def test_routes_previews_a_catch_all_mailbox_and_sync_refuses_it(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    dovecot.seed(
        mail_users.source.name,
        [
            _addressed(1, "Delivered-To: catchall@hosted.example", "X-Original-To: alice@example.org"),
            _addressed(2, "To: alice@example.org, x@sales.example.org", "Cc: bob@example.org"),
            _addressed(3, "To: stranger@elsewhere.example"),
        ],
    )
    config = write_cfg()
    config.write_text(
        config.read_text()
        + "[accounts.routing]\n"
        + 'rules = [{ match = "alice@example.org", mailbox = "alice@corp.example" }, '
        + '{ match = "*@sales.example.org", mailbox = "sales@corp.example" }]\n'
    )
    routes = run_cli("--config", str(config), "routes", "--account", "alice")
    assert routes.returncode == 0, routes.stderr
    lines = routes.stdout.splitlines()
    assert "3 messages on the server" in lines[0]
    assert "-> alice@corp.example (by X-Original-To: alice@example.org)" in lines[1]
    assert "-> alice@corp.example (by To: alice@example.org), sales@corp.example (by To: x@sales" in lines[2]
    assert "left on the server" in lines[3]
    sync = run_cli("--config", str(config), "sync")
    assert sync.returncode == 1 and "not implemented yet" in sync.stdout
    assert dovecot.maildir_count(mail_users.source.name) == 3
    assert dovecot.imap_messages(mail_users.destination.name) == []
