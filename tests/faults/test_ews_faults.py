"""Network faults between the connector and the EWS test server (HTTPS through the fault proxy).

TLS hides the requests from the proxy, so faults fire by byte count, not on a command. Whatever the fault,
the poll ends (no hang), nothing is lost or created twice, and the next, healthy poll finishes the mailbox
exactly once: CreateItem is not idempotent, so this leans on the recovery lookup by InternetMessageId.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.poll.engine import SyncEngine
from tests.configs import EWS_MAILBOX as MAILBOX
from tests.configs import EWS_SERVICE, EWS_SERVICE_PASSWORD, ews_destination, make_config
from tests.delivery import assert_at_most_once, assert_exactly_once, assert_nothing_lost
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.ews import EwsServer
from tests.servers.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

MESSAGES = [simple(n, size=6_000, message_id=n != 1) for n in range(4)]

FAULTS = {
    "refused": Fault("refuse"),
    "reset-in-tls-handshake": Fault("reset", after=50),
    "reset-in-a-response": Fault("reset", "down", after=9_000),
    "cut-in-a-request": Fault("cut", "up", after=20_000),
    "reset-in-a-request": Fault("reset", "up", after=30_000),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_ews_fault_then_recovery(
    fault: str, tmp_path: Path, ews: EwsServer, dovecot: Dovecot, mail_users: MailUsers, sqlite_url: str
) -> None:
    ews.add_user(EWS_SERVICE, EWS_SERVICE_PASSWORD, impersonation=True)
    ews.add_mailbox(MAILBOX)
    dovecot.seed(mail_users.source.name, MESSAGES)
    port = int(ews.service_endpoint.split(":")[2].split("/")[0])
    with FaultProxy("127.0.0.1", port) as proxy:
        endpoint = ews.service_endpoint.replace(f":{port}/", f":{proxy.port}/")
        config = make_config(
            tmp_path,
            dovecot,
            mail_users,
            sqlite_url,
            name=mail_users.source.name,
            account={"mailbox": MAILBOX, "timeout": "5s"},
            destination=ews_destination(ews, service_endpoint=endpoint),
        )
        database = open_database(sqlite_url)
        try:
            engine = SyncEngine(config, Ledger(database))
            account = config.accounts[0]
            proxy.inject(FAULTS[fault])
            first = engine.poll(account)
            proxy.heal()
            assert first.ok or first.error, "a failed poll must say why"
            delivered = [item.mime for item in ews.items(MAILBOX)]
            assert_at_most_once(MESSAGES, delivered)
            assert_nothing_lost(MESSAGES, delivered, dovecot.maildir_messages(mail_users.source.name))

            second = engine.poll(account)
            assert second.status == "ok", (second.error, second.problems)
        finally:
            database.dispose()
    assert_exactly_once(MESSAGES, [item.mime for item in ews.items(MAILBOX)])
    assert dovecot.maildir_count(mail_users.source.name) == 0
