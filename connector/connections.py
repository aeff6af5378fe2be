"""The one place where configuration becomes live connections. Tests replace a ``Connections``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from connector.config import Account, Destination, EwsDestination, ImapDestination, ews_mailbox
from connector.destinations.base import DestinationSession
from connector.destinations.imap import ImapSession, open_imap
from connector.errors import DestinationConnectError
from connector.pop3 import Pop3Client, connect_pop3
from connector.tls import make_ssl_context


def open_source(account: Account) -> Pop3Client:
    """Connect and log in to the account's POP3 server."""
    context = None
    if account.tls != "none":
        context = make_ssl_context(verify=account.tls_verify, ca_file=account.ca_file)
    client = connect_pop3(
        account.host,
        account.effective_port,
        tls=account.tls,
        ssl_context=context,
        timeout=account.timeout.total_seconds(),
    )
    try:
        client.login(account.username, account.password.get_secret_value(), method=account.auth)
    except BaseException:
        client.close()
        raise
    return client


def open_imap_destination(destination: ImapDestination, account: Account) -> ImapSession:
    """Log in to the IMAP destination, as the account's own user when it names one."""
    if account.destination_username is not None and account.destination_password is not None:
        username, secret = account.destination_username, account.destination_password
    else:
        assert destination.username is not None and destination.password is not None  # config validated
        username, secret = destination.username, destination.password
    context = None
    if destination.tls != "none":
        context = make_ssl_context(verify=destination.tls_verify, ca_file=destination.ca_file)
    return open_imap(
        host=destination.host,
        port=destination.effective_port,
        tls=destination.tls,
        ssl_context=context,
        timeout=account.timeout.total_seconds(),
        username=username,
        password=secret.get_secret_value(),
        folder=account.folder,
        mark_seen=account.mark_seen,
        create_folder=destination.create_folders,
    )


def open_ews_destination(destination: EwsDestination, account: Account) -> DestinationSession:
    """A session that delivers into the account's Exchange mailbox (exchangelib is imported only here)."""
    try:
        from connector.destinations.ews import open_ews
    except ImportError as exc:
        # Temporary, not per message: installing the extra fixes it without losing any attempts.
        raise DestinationConnectError(
            f"destination {destination.name!r}: EWS support is not installed ({exc.name} is missing); "
            "install it with: pip install 'pop-connector[ews]'"
        ) from exc

    if account.destination_username is not None and account.destination_password is not None:
        destination = destination.model_copy(
            update={"username": account.destination_username, "password": account.destination_password}
        )
    mailbox = ews_mailbox(account, destination)
    assert mailbox is not None  # config validated
    return open_ews(
        destination,
        mailbox=mailbox,
        folder=account.folder,
        mark_seen=account.mark_seen,
        timeout=account.timeout.total_seconds(),
    )


def open_destination(destination: Destination, account: Account) -> DestinationSession:
    if isinstance(destination, EwsDestination):
        return open_ews_destination(destination, account)
    return open_imap_destination(destination, account)


@dataclass(frozen=True)
class Connections:
    open_source: Callable[[Account], Pop3Client] = open_source
    open_destination: Callable[[Destination, Account], DestinationSession] = open_destination
