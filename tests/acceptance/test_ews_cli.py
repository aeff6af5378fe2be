"""`pop-connector check` and `sync` with an EWS destination, as a process, against the EWS test server."""

from __future__ import annotations

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


def test_check_then_sync_into_exchange(
    ews: EwsServer,
    dovecot: Dovecot,
    mail_users: MailUsers,
    write_cfg: Callable[..., Path],
    run_cli: RunCli,
) -> None:
    ews.add_user(SERVICE, PASSWORD, impersonation=True)
    ews.add_mailbox(MAILBOX)
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
