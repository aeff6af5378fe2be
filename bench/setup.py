"""Preparing a run: users on the throwaway Dovecot, connector configs, a primed ledger."""

from __future__ import annotations

import poplib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from bench import data
from bench.baseline import Endpoint
from connector.ledger.database import open_database
from connector.ledger.models import MessageRow
from connector.ledger.records import MessageState
from connector.ledger.store import Ledger
from tests.servers.dovecot import Dovecot, MailUser
from tests.servers.ews import EwsServer

# The EWS test server's service account for scenario 7 (it impersonates the target mailboxes).
SERVICE = "svc-import@corp.example"
SERVICE_PASSWORD = "bench-service-pw"


def endpoint(dovecot: Dovecot, user: MailUser, port: int | None = None, *, tls: bool = False) -> Endpoint:
    """The user's POP3 endpoint; with ``tls``, POP3S verified against the Dovecot's CA."""
    if tls:
        return Endpoint(dovecot.host, dovecot.ports.pop3s, user.name, user.password, str(dovecot.ca_file))
    return Endpoint(dovecot.host, port or dovecot.ports.pop3, user.name, user.password)


def imap_endpoint(dovecot: Dovecot, user: MailUser) -> dict[str, Any]:
    return endpoint(dovecot, user, dovecot.ports.imap).__dict__


def uidls(source: Endpoint) -> list[str]:
    """The server's unique-ids (also makes Dovecot index a freshly seeded maildrop before timing)."""
    pop = poplib.POP3(source.host, source.port, timeout=600)
    try:
        pop.user(source.user)
        pop.pass_(source.password)
        return [entry.split()[1].decode() for entry in pop.uidl()[1]]
    finally:
        pop.quit()


def _quoted(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def connector_config(
    path: Path,
    database: str,
    dovecot: Dovecot,
    sources: Sequence[MailUser],
    destination: MailUser,
    *,
    retention: str = "delete",
    pop3_port: int | None = None,
    tls: bool = False,
) -> Path:
    """A config with one account per source user, all delivering into ``destination``'s INBOX; with
    ``tls``, POP3S (implicit TLS) verified against the Dovecot's CA."""
    source_tls = (
        f'port = {dovecot.ports.pop3s}\ntls = "implicit"\nca_file = {_quoted(dovecot.ca_file)}\n'
        if tls
        else f'port = {pop3_port or dovecot.ports.pop3}\ntls = "none"\n'
    )
    parts = [
        f"[service]\ndatabase = {_quoted(database)}\n",
        '[[destinations]]\nname = "dovecot"\ntype = "imap"\n'
        f'host = {_quoted(dovecot.host)}\nport = {dovecot.ports.imap}\ntls = "none"\n'
        f"username = {_quoted(destination.name)}\npassword = {_quoted(destination.password)}\n",
    ]
    for user in sources:
        parts.append(
            f"[[accounts]]\nname = {_quoted(user.name)}\nhost = {_quoted(dovecot.host)}\n{source_tls}"
            f"username = {_quoted(user.name)}\npassword = {_quoted(user.password)}\n"
            f'destination = "dovecot"\nfolder = "INBOX"\nretention = {_quoted(retention)}\n'
            'timeout = "600s"\n'
        )
    path.write_text("\n".join(parts))
    return path


def ews_connector_config(
    path: Path,
    database: str,
    dovecot: Dovecot,
    source: MailUser,
    ews: EwsServer,
    *,
    mailbox: str,
    service_endpoint: str,
    create_batch: int,
) -> Path:
    """One account reading ``source`` into ``mailbox`` on the EWS test server (Basic login of its service
    account ``SERVICE`` with impersonation, its CA trusted), ``create_batch`` messages per CreateItem."""
    text = (
        f"[service]\ndatabase = {_quoted(database)}\n\n"
        '[[destinations]]\nname = "exchange"\ntype = "ews"\n'
        f'service_endpoint = {_quoted(service_endpoint)}\nauth = "basic"\nversion = "Exchange2016"\n'
        f"username = {_quoted(SERVICE)}\npassword = {_quoted(SERVICE_PASSWORD)}\nimpersonation = true\n"
        f"ca_file = {_quoted(ews.ca_file)}\ncreate_batch = {create_batch}\n\n"
        f"[[accounts]]\nname = {_quoted(source.name)}\nhost = {_quoted(dovecot.host)}\n"
        f'port = {dovecot.ports.pop3}\ntls = "none"\n'
        f"username = {_quoted(source.name)}\npassword = {_quoted(source.password)}\n"
        f'destination = "exchange"\nmailbox = {_quoted(mailbox)}\nfolder = "Inbox"\n'
        'retention = "delete"\ntimeout = "600s"\n'
    )
    path.write_text(text)
    return path


def idle_maildrops(dovecot: Dovecot, count: int, database: str) -> list[MailUser]:
    """``count`` users with one message each, and the ledger at ``database`` knowing each as delivered:
    every poll of them is an idle one (scenario 5, bench.idle_parts, bench.idle_design)."""
    users = [dovecot.new_user("idle") for _ in range(count)]
    for user in users:
        dovecot.seed(user.name, [data.message(0, 2048)])
    prime_ledger(database, {user.name: uidls(endpoint(dovecot, user)) for user in users})
    return users


def prime_ledger(database: str, delivered: Mapping[str, Sequence[str]]) -> None:
    """Record, per account name, these UIDLs as delivered long ago (as if earlier polls had run)."""
    engine = open_database(database)
    try:
        ledger = Ledger(engine)
        now = datetime.now(UTC)
        for account, account_uidls in delivered.items():
            account_id = ledger.account_id(account)
            rows = [
                {
                    "account_id": account_id,
                    "uidl": uidl,
                    "state": MessageState.DELIVERED.value,
                    "attempts": 1,
                    "first_seen_at": now,
                    "updated_at": now,
                    "delivered_at": now,
                    "destination_ref": "imap:INBOX",
                }
                for uidl in account_uidls
            ]
            if rows:
                with engine.begin() as connection:
                    connection.execute(insert(MessageRow), rows)
    finally:
        engine.dispose()
