"""`pop-connector check` and `sync` with an EWS destination, as a process, against the EWS test server."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli
from tests.configs import EWS_MAILBOX as MAILBOX
from tests.configs import EWS_SERVICE as SERVICE
from tests.configs import EWS_SERVICE_PASSWORD as PASSWORD
from tests.configs import ews_destination
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.ews import EwsServer

pytestmark = pytest.mark.acceptance


@pytest.fixture
def exchange(ews: EwsServer) -> EwsServer:
    """The EWS test server with an impersonating service account and the target mailbox."""
    ews.add_user(SERVICE, PASSWORD, impersonation=True)
    ews.add_mailbox(MAILBOX)
    return ews


def test_check_then_sync_into_exchange(
    exchange: EwsServer,
    dovecot: Dovecot,
    mail_users: MailUsers,
    write_cfg: Callable[..., Path],
    run_cli: RunCli,
) -> None:
    ews = exchange
    dovecot.seed(mail_users.source.name, [simple(1)])
    account = {"mailbox": MAILBOX, "folder": "Inbox/Hosted"}
    checked = run_cli("--config", str(write_cfg(account=account, destination=ews_destination(ews))), "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "destination exchange OK" in checked.stdout and "creates Hosted" in checked.stdout
    assert set(ews.ops()) <= {"ConvertId", "GetFolder", "FindFolder"} and ews.items() == []
    bad = write_cfg(account=account, destination=ews_destination(ews, password="nope"))
    refused = run_cli("--config", str(bad), "check")
    assert refused.returncode == 1 and "destination exchange FAILED" in refused.stdout
    assert "nope" not in refused.stdout + refused.stderr
    synced = run_cli("--config", str(write_cfg(account=account, destination=ews_destination(ews))), "sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert [item.mime for item in ews.items(MAILBOX, "Inbox/Hosted")] == [simple(1)]
    assert dovecot.maildir_count(mail_users.source.name) == 0


def test_config_error_names_the_field(
    write_cfg: Callable[..., Path], run_cli: RunCli, ews: EwsServer
) -> None:
    result = run_cli("--config", str(write_cfg(destination=ews_destination(ews))), "check")
    assert result.returncode == 2
    assert "accounts[0].mailbox: destination 'exchange' uses impersonation" in result.stdout + result.stderr


def test_protocol_log_records_the_ews_conversation_without_secrets(
    tmp_path: Path,
    exchange: EwsServer,
    dovecot: Dovecot,
    mail_users: MailUsers,
    write_cfg: Callable[..., Path],
    run_cli: RunCli,
) -> None:
    ews = exchange
    dovecot.seed(mail_users.source.name, [simple(1)])
    logs = tmp_path / "protocol"
    config = write_cfg(
        account={"mailbox": MAILBOX, "protocol_log": True},
        destination=ews_destination(ews, auth="basic"),  # Basic: the credentials ride on every request
    )
    config.write_text(
        config.read_text().replace("[service]\n", f'[service]\nprotocol_log_dir = "{logs}"\n', 1)
    )
    synced = run_cli("--config", str(config), "--log-level", "DEBUG", "sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    trace = (logs / "alice.log").read_text()
    assert (
        "connector.ews.wire" in trace
        and "> CreateItem (message " in trace
        and "< CreateItem: success" in trace
    )
    basic = base64.b64encode(f"{SERVICE}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, mail_users.source.password, basic):
        assert secret not in trace and secret not in synced.stdout + synced.stderr
