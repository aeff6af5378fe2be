"""``pop-connector check``: log in to every server the configuration names, changing nothing."""

from __future__ import annotations

from collections.abc import Callable

from connector.config import Account, Config
from connector.connections import Connections
from connector.errors import ConnectorError
from connector.policies.routing import routed_mailboxes


def run_checks(config: Config, out: Callable[[str], None], connections: Connections | None = None) -> bool:
    """Each account: POP3 login and STAT, then QUIT (no DELE, so nothing changes); its destination:
    login and folder access. Every failure is reported; the rest are still checked."""
    connections = connections or Connections()
    out(f"configuration OK: {len(config.accounts)} accounts, {len(config.destinations)} destinations")
    all_ok = True
    for account in config.accounts:
        try:
            with connections.open_source(account) as pop:
                count, size = pop.stat()
            out(
                f"{account.name}: POP3 {account.host}:{account.effective_port} OK ({count} messages, "
                f"{size} bytes)"
            )
        except ConnectorError as exc:
            all_ok = False
            out(f"{account.name}: POP3 {account.host}:{account.effective_port} FAILED: {exc.message}")
        all_ok = _check_destinations(config, account, out, connections) and all_ok
    return all_ok


def _check_destinations(
    config: Config, account: Account, out: Callable[[str], None], connections: Connections
) -> bool:
    """The account's destination, or for a catch-all account each mailbox its routing names."""
    destination = config.destination_for(account)
    if account.routing is None:
        targets: list[tuple[str | None, str]] = [(None, destination.name)]
    else:
        targets = [
            (mailbox, f"{destination.name} as {mailbox}") for mailbox in routed_mailboxes(account.routing)
        ]
    all_ok = True
    for mailbox, label in targets:
        try:
            if mailbox is None:
                session = connections.open_destination(destination, account)
            else:
                session = connections.open_recipient(destination, account, mailbox)
            try:
                detail = session.check()
            finally:
                session.close()
            out(f"{account.name}: destination {label} OK ({detail})")
        except ConnectorError as exc:
            all_ok = False
            out(f"{account.name}: destination {label} FAILED: {exc.message}")
    return all_ok
