"""The pop-connector command end to end, as an admin runs it, against the real Dovecot."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import ROOT, RunCli
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance


def test_sync_status_and_second_sync(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(4)])
    config = write_cfg()
    first = run_cli("--config", str(config), "sync")
    assert first.returncode == 0, first.stderr
    assert "alice: ok delivered=4" in first.stdout and "deleted=4" in first.stdout
    second = run_cli("--config", str(config), "sync")
    assert second.returncode == 0 and "alice: ok delivered=0" in second.stdout
    status = run_cli("--config", str(config), "status", "--json")
    (record,) = json.loads(status.stdout)
    assert record["account"] == "alice" and record["last_result"] == "ok"
    assert record["messages"]["deleted"] == 0  # pruned once gone from the server
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 4
    text = run_cli("--config", str(config), "status")
    assert text.returncode == 0
    assert text.stdout.splitlines()[:2] == [
        "1 account: 1 ok, 0 backing off, 0 failing auth, 0 suspended, 0 polling now, 0 never polled",
        "alice: ok",
    ]


def test_config_from_environment_variable(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path]
) -> None:
    config = write_cfg()
    result = subprocess.run(
        [sys.executable, "-m", "connector", "sync"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**__import__("os").environ, "POP_CONNECTOR_CONFIG": str(config)},
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_dry_run_lists_and_changes_nothing(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(2)])
    result = run_cli("--config", str(write_cfg()), "sync", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would deliver 2 (2 new" in result.stdout and "deliver #1" in result.stdout
    assert dovecot.maildir_count(mail_users.source.name) == 2
    assert dovecot.imap_messages(mail_users.destination.name) == []


def test_wrong_password_exits_1_and_names_the_account(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    result = run_cli("--config", str(write_cfg(account={"password": "not-the-password"})), "sync")
    assert result.returncode == 1
    assert "alice: auth_error" in result.stdout
    assert "not-the-password" not in result.stdout + result.stderr


def test_config_error_exits_2_with_field_path(tmp_path: Path, run_cli: RunCli) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[defaults]\nretention = { mode = "days", days = -1 }\n')
    result = run_cli("--config", str(config), "sync")
    assert result.returncode == 2
    assert f"{config}: defaults.retention.days: Input should be greater than 0" in result.stderr


def test_usage_error_exits_2(run_cli: RunCli) -> None:
    assert run_cli("frobnicate").returncode == 2


def test_unknown_account_exits_2(write_cfg: Callable[..., Path], run_cli: RunCli) -> None:
    result = run_cli("--config", str(write_cfg()), "sync", "--account", "nobody")
    assert result.returncode == 2 and "no account named 'nobody'" in result.stderr


def test_check_logs_in_everywhere_and_changes_nothing(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1)])
    ok = run_cli("--config", str(write_cfg(account={"folder": "Not/Yet"})), "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "alice: POP3" in ok.stdout and "OK (1 messages" in ok.stdout
    assert dovecot.maildir_count(mail_users.source.name) == 1
    assert dovecot.folders(mail_users.destination.name) == ["INBOX"]
    bad = run_cli("--config", str(write_cfg(destination={"password": "nope"})), "check")
    assert bad.returncode == 1 and "destination dovecot FAILED" in bad.stdout


def test_db_upgrade(write_cfg: Callable[..., Path], run_cli: RunCli) -> None:
    result = run_cli("--config", str(write_cfg()), "db", "upgrade")
    assert result.returncode == 0 and "up to date" in result.stdout


def test_run_service_polls_and_stops_cleanly_on_sigterm(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path]
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    config = write_cfg(defaults={"poll_interval": "1s", "poll_jitter": 0})
    process = subprocess.Popen(
        [sys.executable, "-m", "connector", "--config", str(config), "run"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(dovecot.imap_messages(mail_users.destination.name)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        dovecot.seed(mail_users.source.name, [simple(7)])  # picked up by a later poll
        while len(dovecot.imap_messages(mail_users.destination.name)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == 0, stderr
    assert "service stopped" in stderr
    assert len(dovecot.imap_messages(mail_users.destination.name)) == 4
    assert dovecot.maildir_count(mail_users.source.name) == 0
