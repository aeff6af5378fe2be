"""``pop-connector check``: log in to every server the configuration names, changing nothing."""

from __future__ import annotations

from collections.abc import Callable

from connector.config import Config
from connector.connections import Connections
from connector.errors import ConnectorError


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
        destination = config.destination_for(account)
        try:
            session = connections.open_destination(destination, account)
            try:
                detail = session.check()
            finally:
                session.close()
            out(f"{account.name}: destination {destination.name} OK ({detail})")
        except ConnectorError as exc:
            all_ok = False
            out(f"{account.name}: destination {destination.name} FAILED: {exc.message}")
    return all_ok
