"""The one place where configuration becomes live connections. Tests replace a ``Connections``."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from connector.config import (
    Account,
    Destination,
    EwsDestination,
    GmailDestination,
    ImapDestination,
    ews_mailbox,
)
from connector.destinations.base import DestinationSession
from connector.errors import (
    DestinationConnectError,
    OAuthError,
    OAuthRefusedError,
    SourceAuthError,
    SourceConnectError,
)
from connector.oauth import DEFAULT_PROVIDERS, TokenProvider, TokenProviders, login_with_token
from connector.pop3 import Pop3Client, connect_pop3
from connector.pop3.client import FORBIDDEN_IN_ARGUMENTS
from connector.tls import shared_ssl_context

if TYPE_CHECKING:
    from connector.destinations.imap import ImapSession, MasterUser

# Each destination's module (and its library: imapclient, exchangelib, the Google clients) is imported when
# a session to it opens: a poll with nothing to deliver opens none and loads none of them.


def _connect_source(account: Account) -> Pop3Client:
    context = None
    if account.tls != "none":
        # Shared: building a context per poll cost more CPU than the rest of an idle poll.
        context = shared_ssl_context(verify=account.tls_verify, ca_file=account.ca_file)
    return connect_pop3(
        account.host,
        account.effective_port,
        tls=account.tls,
        ssl_context=context,
        timeout=account.timeout.total_seconds(),
    )


def open_source(account: Account, providers: TokenProviders = DEFAULT_PROVIDERS) -> Pop3Client:
    """Connect and log in to the account's POP3 server."""
    if account.auth == "oauth2":
        return _open_source_oauth2(account, providers)
    assert account.password is not None  # config validated
    client = _connect_source(account)
    try:
        client.login(account.username, account.password.get_secret_value(), method=account.auth)
    except BaseException:
        client.close()
        raise
    return client


def _open_source_oauth2(account: Account, providers: TokenProviders) -> Pop3Client:
    """AUTH XOAUTH2 as the account's user. A retry with a new token uses a new connection: some servers
    hang up after a failed AUTH."""
    assert account.oauth is not None  # config validated
    provider = providers.get(account.oauth.credentials())

    def attempt(token: str) -> Pop3Client:
        client = _connect_source(account)
        try:
            initial = account.auth_initial_response
            client.authenticate_xoauth2(account.username, token, initial_response=initial)
        except BaseException:
            client.close()
            raise
        return client

    try:
        return login_with_token(provider, attempt, SourceAuthError)
    except OAuthError as exc:
        # A refused app registration is a login failure of this account; an unreachable token
        # endpoint is a temporary one, like an unreachable server.
        error_type = SourceAuthError if isinstance(exc, OAuthRefusedError) else SourceConnectError
        where = f"{account.host}:{account.effective_port}"
        raise error_type(f"{where}: no OAuth token: {exc.message}") from exc


@dataclass(frozen=True)
class ProbeTarget:
    """Where and as whom the idle probe (connector/poll/probe.py) logs in: what ``open_source`` would use."""

    host: str
    port: int
    # None: plaintext (tls = "none"); else implicit TLS with this context, verifying ``host``.
    context: ssl.SSLContext | None
    username: str
    password: str
    timeout: float


def probe_target(account: Account) -> ProbeTarget | None:
    """The account's POP3 server for the idle probe; None when the probe cannot log in as ``open_source``
    does (other login methods, STLS: policies/idle.py ``probe_refusal`` says which), or would refuse to
    send its credentials (a line break in one would make it two commands: the second, a DELE say, would
    be carried out; the full poll reports it)."""
    if account.auth != "user" or account.tls == "starttls" or account.password is None:
        return None
    password = account.password.get_secret_value()
    if any(bad in value for value in (account.username, password) for bad in FORBIDDEN_IN_ARGUMENTS):
        return None
    context = None
    if account.tls == "implicit":
        context = shared_ssl_context(verify=account.tls_verify, ca_file=account.ca_file)
    return ProbeTarget(
        account.host,
        account.effective_port,
        context,
        account.username,
        password,
        account.timeout.total_seconds(),
    )


def _open_imap_as(
    destination: ImapDestination,
    account: Account,
    username: str,
    *,
    password: str | None = None,
    token_provider: TokenProvider | None = None,
    master: MasterUser | None = None,
) -> ImapSession:
    from connector.destinations.imap import open_imap

    context = None
    if destination.tls != "none":
        context = shared_ssl_context(verify=destination.tls_verify, ca_file=destination.ca_file)
    return open_imap(
        host=destination.host,
        port=destination.effective_port,
        tls=destination.tls,
        ssl_context=context,
        timeout=account.timeout.total_seconds(),
        username=username,
        password=password,
        token_provider=token_provider,
        master=master,
        folder=account.folder,
        mark_seen=account.mark_seen,
        create_folder=destination.create_folders,
        multiappend=destination.multiappend,
    )


def open_imap_destination(
    destination: ImapDestination, account: Account, providers: TokenProviders = DEFAULT_PROVIDERS
) -> ImapSession:
    """Log in to the IMAP destination, as the account's own user when it names one.

    With ``auth = "oauth2"`` the user is the target mailbox (for Exchange Online app-only access, the
    mailbox the app was given FullAccess to) and the password is a token from the destination's app, or
    (Gmail over IMAP) from the consent that user gave with ``pop-connector authorize``.
    """
    username = account.destination_username or destination.username
    assert username is not None  # config validated
    password = None
    token_provider = None
    if destination.auth == "oauth2":
        token_provider = providers.get(destination.oauth_credentials(username))
    else:
        secret = account.destination_password or destination.password
        assert secret is not None  # config validated
        password = secret.get_secret_value()
    return _open_imap_as(destination, account, username, password=password, token_provider=token_provider)


def open_ews_destination(destination: EwsDestination, account: Account) -> DestinationSession:
    """A session that delivers into the account's Exchange mailbox."""
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


def open_gmail_destination(
    destination: GmailDestination, account: Account, mailbox: str | None = None
) -> DestinationSession:
    from connector.destinations.gmail import open_gmail

    return open_gmail(destination, account, mailbox or account.mailbox)


def open_destination(destination: Destination, account: Account) -> DestinationSession:
    if isinstance(destination, EwsDestination):
        return open_ews_destination(destination, account)
    if isinstance(destination, GmailDestination):
        return open_gmail_destination(destination, account)
    return open_imap_destination(destination, account)


def open_recipient_destination(
    destination: Destination, account: Account, mailbox: str
) -> DestinationSession:
    """A session into one recipient's ``mailbox`` for a catch-all account: EWS impersonates it, IMAP logs
    in to it as the destination's master user (config validated that one of them applies)."""
    if isinstance(destination, EwsDestination):
        return open_ews_destination(destination, account.model_copy(update={"mailbox": mailbox}))
    if isinstance(destination, GmailDestination):
        return open_gmail_destination(destination, account, mailbox)
    from connector.destinations.imap import MasterUser

    assert destination.master_username is not None and destination.master_password is not None
    master = MasterUser(
        destination.master_username,
        destination.master_password.get_secret_value(),
        style=destination.master_login,
        separator=destination.master_separator,
    )
    return _open_imap_as(destination, account, mailbox, master=master)


@dataclass(frozen=True)
class Connections:
    open_source: Callable[[Account], Pop3Client] = open_source
    open_destination: Callable[[Destination, Account], DestinationSession] = open_destination
    open_recipient: Callable[[Destination, Account, str], DestinationSession] = open_recipient_destination
    # Where the idle probe connects; None: where ``open_source`` does when that is the real one.
    probe: Callable[[Account], ProbeTarget | None] | None = None

    @property
    def probes(self) -> bool:
        """False, so that every poll is a full one, when a test replaced ``open_source`` (with a fake server
        the probe would not reach) and set no ``probe``."""
        return self.probe is not None or self.open_source is open_source

    def probe_target(self, account: Account) -> ProbeTarget | None:
        """The idle probe's target for ``account`` (None: the full poll polls it)."""
        if not self.probes:
            return None
        return (self.probe or probe_target)(account)
