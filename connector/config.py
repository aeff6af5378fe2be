"""The configuration file: TOML, validated by pydantic, every error naming file, field path and cause.

``[defaults]`` is validated on its own first and then merged under each account, so that a bad default is
reported once (``defaults.retry.max_attempts``) and a bad account value at its own path
(``accounts[2].retention.days``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from connector import redaction
from connector.accounts_file import (
    AccountFile,
    FileAccounts,
    by_line,
    columns_of,
    files_from_config,
    read_files,
)
from connector.errors import ConfigError
from connector.oauth_endpoints import ENTRA_AUTHORITY_HOST, EXCHANGE_ONLINE_SCOPE, check_token_url
from connector.tls import TlsMode, check_ca_file

if TYPE_CHECKING:
    # connector.oauth (its token fetchers, urllib.request) loads when credentials are made, not with the
    # configuration: a command that gets no token does not need it (connector/oauth_endpoints.py).
    from connector.oauth import Credentials

CONFIG_ENV = "POP_CONNECTOR_CONFIG"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '5m' or '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION_PART.findall(text)
        if not parts or _DURATION_PART.sub("", text).strip():
            raise ValueError(f"{value!r} is not a duration; write e.g. '30s', '5m', '1h' or '1h30m'")
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    else:
        raise ValueError("expected a duration such as '30s', '5m' or '1h'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{value!r} is too long for a duration") from None


def _resolve_secret(value: object) -> SecretStr:
    """Inline string, ``{ env = "NAME" }`` or ``{ file = "/path" }``; resolved at load time."""
    if isinstance(value, SecretStr):
        return value
    if isinstance(value, str):
        return SecretStr(value)
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"env"} and isinstance(value["env"], str):
            name = value["env"]
            if name not in os.environ:
                raise ValueError(f"environment variable {name} is not set")
            return SecretStr(os.environ[name])
        if keys == {"file"} and isinstance(value["file"], str):
            path = Path(value["file"])
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
            # Files written by `echo` or editors end with a newline that is not part of the secret.
            return SecretStr(text.rstrip("\r\n"))
    raise ValueError('expected a string, { env = "NAME" } or { file = "/path" }')


_SIZE_RE = re.compile(r"(\d+)\s*([kmg]?)i?b?")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: object) -> int:
    """``"25MB"``, ``"512K"``, ``"1G"`` (units of 1024) or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '25MB' or a number of bytes")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip().lower())):
        number = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a size; write e.g. '25MB', '512KB' or a number of bytes")
    if number <= 0:
        raise ValueError("a size must be positive")
    return number


# The hard bound on any one message, whatever LIST says (policies/sizes.py): well above real mail.
DEFAULT_MESSAGE_SIZE_CEILING = 200 * 1024 * 1024

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret)]
# Checked at load time: a missing or unreadable one is a configuration error naming the field.
CaFile = Annotated[Path, AfterValidator(check_ca_file)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetentionPolicy(_Model):
    """What happens on the POP3 server once a message is delivered."""

    mode: Literal["delete", "keep", "days"] = "delete"
    days: int | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: object) -> object:
        return {"mode": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _days_only_with_days_mode(self) -> RetentionPolicy:
        if self.mode == "days" and self.days is None:
            raise ValueError('mode "days" needs days = N')
        if self.mode != "days" and self.days is not None:
            raise ValueError(f'days is only used with mode = "days", not "{self.mode}"')
        return self


class RetryPolicy(_Model):
    max_attempts: int = Field(default=5, ge=1, le=1000)
    initial_backoff: Duration = timedelta(minutes=1)
    max_backoff: Duration = timedelta(hours=1)
    # Retrying a refused login at the normal rate could get the mailbox locked by the provider.
    auth_failure_backoff: Duration = timedelta(hours=1)
    # 0 = never suspend. The default is about two days of failures at the default max_backoff.
    max_consecutive_failures: int = Field(default=50, ge=0, le=100_000)

    @model_validator(mode="after")
    def _ordered(self) -> RetryPolicy:
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must not be shorter than initial_backoff")
        return self


def parse_listen_address(value: object) -> tuple[str, int] | None:
    """``"HOST:PORT"``, ``"[IPv6]:PORT"`` or a bare port (then loopback only); port 0 picks a free one."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return value  # already parsed (model_copy)
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]")
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{value!r} is not a listen address; write e.g. '127.0.0.1:9108' or '9108'")
    return host, int(port_text)


class ServiceConfig(_Model):
    database: str | None = None
    max_workers: int = Field(default=8, ge=1, le=256)
    # Operations listener (metrics, health, status page); see connector/ops/web.py.
    metrics: Annotated[tuple[str, int] | None, BeforeValidator(parse_listen_address)] = None
    status_token: Secret | None = None
    status_refresh: Duration = timedelta(seconds=15)
    health_grace: Duration = timedelta(minutes=10)

    @field_validator("status_token")
    @classmethod
    def _token_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 8:
            raise ValueError("status_token must be at least 8 characters (a short token protects nothing)")
        return value

    # "distributed": `run` is one of several workers sharing a PostgreSQL database (connector/distributed).
    mode: Literal["embedded", "distributed"] = "embedded"
    dispatch_interval: Duration = timedelta(seconds=10)
    worker_name: str | None = Field(default=None, min_length=1, max_length=200)
    heartbeat_interval: Duration = timedelta(seconds=10)
    stalled_after: Duration = timedelta(seconds=30)
    # The delivery journal (connector/ledger/journal.py): how long its rows are kept (0: for ever); the
    # per-account totals are kept whatever this is.
    journal_retention: Duration = timedelta(days=365)
    # The poll lease (one poll per account across processes and machines): renewed every third of it
    # while a poll runs; a process that dies holding one blocks its account this long at most.
    lease_ttl: Duration = timedelta(minutes=2)

    @field_validator("lease_ttl")
    @classmethod
    def _lease_long_enough(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError("lease_ttl must be at least 1s (a poll renews its lease every third of it)")
        return value

    @field_validator("dispatch_interval")
    @classmethod
    def _dispatch_fits_a_minute(cls, value: timedelta) -> timedelta:
        # It becomes the seconds field of a cron schedule, so it must divide a minute evenly.
        seconds = value.total_seconds()
        if not seconds.is_integer() or not 1 <= seconds <= 60 or 60 % int(seconds):
            raise ValueError("dispatch_interval must be a whole number of seconds that divides 60 (1s..60s)")
        return value

    @model_validator(mode="after")
    def _stall_after_heartbeats(self) -> ServiceConfig:
        if self.heartbeat_interval < timedelta(seconds=1):
            raise _PathError("service.heartbeat_interval", "heartbeat_interval must be at least 1s")
        if self.stalled_after < 2 * self.heartbeat_interval:
            raise _PathError(
                "service.stalled_after", "stalled_after must be at least twice heartbeat_interval"
            )
        return self

    # Protocol logs (connector/ops/protocol_log.py): where, and how they rotate.
    protocol_log_dir: Path | None = None
    protocol_log_max_bytes: ByteSize = 10 * 1024 * 1024
    protocol_log_backups: int = Field(default=5, ge=0, le=1000)


_Policy = TypeVar("_Policy", bound=_Model)
# One object per distinct policy, shared by every account (and every reload) that has it: 100,000 accounts
# held 100,000 equal copies of their retry and retention policies, a third of their memory
# (docs/scaling.md). Policies are frozen, so sharing one changes nothing; distinct policies are few.
_SHARED_POLICIES: dict[_Model, _Model] = {}


def _shared(policy: _Policy) -> _Policy:
    shared = _SHARED_POLICIES.setdefault(policy, policy)
    assert isinstance(shared, type(policy))
    return shared


class Defaults(_Model):
    """Values every account inherits unless it sets its own."""

    poll_interval: Duration = timedelta(minutes=5)
    poll_jitter: float = Field(default=0.1, ge=0, le=1)
    retention: RetentionPolicy = RetentionPolicy()
    retry: RetryPolicy = RetryPolicy()
    timeout: Duration = timedelta(seconds=60)
    folder: str = "INBOX"
    mark_seen: bool = False
    # Limits and selection (docs/policies.md). None / 0 = no limit.
    max_message_size: ByteSize | None = None
    oversize: Literal["skip", "headers_only"] = "skip"
    max_messages_per_poll: int = Field(default=0, ge=0)
    # No message above this is downloaded, whatever max_message_size and oversize say.
    message_size_ceiling: ByteSize = DEFAULT_MESSAGE_SIZE_CEILING
    start: Literal["all", "new"] = "all"
    # A message missing from the listing is forgotten after both (policies.listing).
    forget_missing_after_polls: int = Field(default=3, ge=1, le=10_000)
    forget_missing_after: Duration = timedelta(hours=24)
    # Write this account's POP3/IMAP conversation to its own rotating file (secrets redacted).
    protocol_log: bool = False

    @field_validator("retention", "retry")
    @classmethod
    def _shared_policy(cls, value: _Policy) -> _Policy:
        return _shared(value)

    @field_validator("poll_interval")
    @classmethod
    def _positive_interval(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError("poll_interval must be at least 1s")
        return value

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("timeout must be positive")
        return value

    @model_validator(mode="after")
    def _limit_under_ceiling(self) -> Defaults:
        limit, ceiling = self.max_message_size, self.message_size_ceiling
        if limit is not None and limit > ceiling:
            raise ValueError(
                f"max_message_size ({limit} bytes) is above message_size_ceiling ({ceiling} bytes), which "
                "no message may pass: raise message_size_ceiling too"
            )
        return self


class OAuthSettings(_Model):
    """Where XOAUTH2 logins get their token: Microsoft Entra (``tenant_id``), any token endpoint
    (``token_url``), or a Gmail user's own consent (``client_secrets``: Gmail over IMAP, the consent given
    with ``pop-connector authorize``). See docs/exchange-online.md and docs/gmail.md."""

    tenant_id: str | None = Field(default=None, min_length=1)
    token_url: str | None = None
    client_id: str | None = Field(default=None, min_length=1)
    client_secret: Secret | None = None
    certificate_file: Path | None = None
    certificate_thumbprint: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f:]{40,59}$")
    certificate_password: Secret | None = None
    scope: str | None = None
    authority_host: str = ENTRA_AUTHORITY_HOST
    refresh_token: Secret | None = None
    client_auth: Literal["body", "basic"] = "body"
    ca_file: CaFile | None = None
    timeout: Duration = timedelta(seconds=30)
    # Google (Gmail over IMAP): the JSON of an OAuth client of type "Desktop app". Each address's consent
    # is given once with `pop-connector authorize DESTINATION --user ADDRESS`, which keeps its refresh
    # token in token_dir (relative: under the state directory; default gmail/<destination name>).
    client_secrets: Secret | None = None
    token_dir: Path | None = None

    @field_validator("token_url", "authority_host")
    @classmethod
    def _secure_url(cls, value: str | None) -> str | None:
        return None if value is None else check_token_url(value)

    @model_validator(mode="after")
    def _one_provider(self) -> OAuthSettings:
        chosen = [name for name in _OAUTH_PROVIDERS if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "set either tenant_id (Microsoft Entra), token_url (another provider) or client_secrets "
                "(Google: a Desktop app client, then `pop-connector authorize`)"
            )
        if self.client_secrets is not None:
            # The client is in the JSON and the user's consent in token_dir: nothing else applies.
            unused = sorted(self.model_fields_set & _NOT_WITH_CLIENT_SECRETS)
            if unused:
                raise ValueError(
                    f"{', '.join(unused)}: not used with client_secrets (the JSON names the client; "
                    "`pop-connector authorize` gives the consent)"
                )
            return self
        if self.token_dir is not None:
            raise ValueError("token_dir is only used with client_secrets")
        if self.client_id is None:
            raise ValueError("client_id: required field is missing")
        if self.tenant_id is not None:
            if (self.client_secret is None) == (self.certificate_file is None):
                raise ValueError("Microsoft Entra needs either client_secret or certificate_file")
            if self.refresh_token is not None:
                raise ValueError("refresh_token is only used with token_url")
        else:
            if self.certificate_file is not None:
                raise ValueError("certificate_file is only used with tenant_id (Microsoft Entra)")
            if self.client_secret is None and self.refresh_token is None:
                raise ValueError("token_url needs client_secret (or refresh_token)")
        if self.certificate_file is None and (self.certificate_thumbprint or self.certificate_password):
            raise ValueError("certificate_thumbprint and certificate_password go with certificate_file")
        return self

    @property
    def google(self) -> bool:
        """A Gmail user's own consent (``client_secrets``), not an application's token."""
        return self.client_secrets is not None

    def credentials(self) -> Credentials:
        """The provider's key: equal settings share one token cache."""
        # A Google consent depends on the destination and the user: ImapDestination.oauth_credentials.
        from connector.oauth import EntraCredentials, TokenEndpointCredentials

        assert self.client_id is not None, "no credentials() for client_secrets"
        secret = self.client_secret.get_secret_value() if self.client_secret else None
        timeout = self.timeout.total_seconds()
        if self.tenant_id is not None:
            password = self.certificate_password
            return EntraCredentials(
                tenant_id=self.tenant_id,
                client_id=self.client_id,
                client_secret=secret,
                certificate_file=self.certificate_file,
                certificate_thumbprint=self.certificate_thumbprint,
                certificate_password=password.get_secret_value() if password else None,
                scope=self.scope or EXCHANGE_ONLINE_SCOPE,
                authority_host=self.authority_host,
                ca_file=self.ca_file,
                timeout=timeout,
            )
        assert self.token_url is not None  # validated above
        refresh = self.refresh_token
        return TokenEndpointCredentials(
            token_url=self.token_url,
            client_id=self.client_id,
            client_secret=secret,
            scope=self.scope,
            refresh_token=refresh.get_secret_value() if refresh else None,
            client_auth=self.client_auth,
            ca_file=self.ca_file,
            timeout=timeout,
        )


_OAUTH_PROVIDERS = ("tenant_id", "token_url", "client_secrets")
_NOT_WITH_CLIENT_SECRETS = frozenset(
    {
        "client_id",
        "client_secret",
        "certificate_file",
        "certificate_thumbprint",
        "certificate_password",
        "scope",
        "authority_host",
        "refresh_token",
        "client_auth",
    }
)


def token_directory(token_dir: Path | None, destination: str) -> Path:
    """Where ``authorize`` keeps a destination's consents: ``token_dir``, relative to the state directory,
    by default ``gmail/<destination>``."""
    base = token_dir if token_dir is not None else Path("gmail") / destination
    return base if base.is_absolute() else default_state_dir() / base


LoginMethod = Literal["password", "oauth2"]
# How a master user logs in as a recipient: SASL PLAIN with the recipient as authorisation identity
# (RFC 4616), or LOGIN "recipient<separator>master" (Dovecot's auth_master_user_separator).
MasterLogin = Literal["sasl", "separator"]


def _check_oauth(auth: str, oauth: OAuthSettings | None) -> None:
    if auth == "oauth2" and oauth is None:
        raise ValueError('auth = "oauth2" needs an oauth table (tenant_id or token_url, client_id, ...)')
    if auth != "oauth2" and oauth is not None:
        raise ValueError(f'oauth is only used with auth = "oauth2", not "{auth}"')


class ImapDestination(_Model):
    name: str = Field(min_length=1)
    type: Literal["imap"]
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsMode = "implicit"
    tls_verify: bool = True
    ca_file: CaFile | None = None
    username: str | None = None
    password: Secret | None = None
    auth: LoginMethod = "password"
    oauth: OAuthSettings | None = None
    create_folders: bool = True
    # Several messages per APPEND where the server offers MULTIAPPEND (off: for a server that mishandles it).
    multiappend: bool = True
    # Catch-all accounts log in as each recipient with these (a master user / proxy authorisation).
    master_username: str | None = None
    master_password: Secret | None = None
    master_login: MasterLogin = "sasl"
    master_separator: str = Field(default="*", min_length=1)

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.tls == "implicit" else 143)

    @model_validator(mode="after")
    def _master_pair(self) -> ImapDestination:
        if (self.master_username is None) != (self.master_password is None):
            raise ValueError("master_username and master_password go together")
        return self

    @model_validator(mode="after")
    def _password_with_username(self) -> ImapDestination:
        _check_oauth(self.auth, self.oauth)
        if self.auth == "oauth2":
            if self.password is not None:
                raise ValueError('password is not used with auth = "oauth2"')
        elif self.username is not None and self.password is None:
            raise ValueError("username is set but password is missing")
        return self

    def google_tokens(self) -> Path:
        """Where ``authorize`` keeps the consents of this destination (``oauth.client_secrets``)."""
        return token_directory(self.oauth.token_dir if self.oauth else None, self.name)

    def oauth_credentials(self, user: str) -> Credentials:
        """Where the XOAUTH2 token of ``user`` comes from: the destination's app, or ``user``'s own
        consent kept by ``authorize`` (Gmail over IMAP)."""
        from connector.oauth import GoogleConsentCredentials

        assert self.oauth is not None  # validated: auth = "oauth2"
        if not self.oauth.google:
            return self.oauth.credentials()
        return GoogleConsentCredentials(
            destination=self.name,
            address=user,
            token_dir=self.google_tokens(),
            ca_file=self.oauth.ca_file,
            timeout=self.oauth.timeout.total_seconds(),
        )


EwsAuth = Literal["ntlm", "basic", "oauth2"]
# Exchange versions exchangelib can be told instead of probing the server (the ``version`` field).
EwsVersion = Literal["Exchange2013", "Exchange2013_SP1", "Exchange2016", "Exchange2019"]
DEFAULT_EWS_MAX_MESSAGE_SIZE = 35 * 1024 * 1024
# Messages one CreateItem request may carry (exchangelib sends at most 100 items per request).
DEFAULT_EWS_CREATE_BATCH = 10
MAX_EWS_CREATE_BATCH = 100


class EwsDestination(_Model):
    """Exchange Web Services (on-premises Exchange 2013-2019 and Subscription Edition), via exchangelib."""

    name: str = Field(min_length=1)
    type: Literal["ews"]
    service_endpoint: str | None = None
    autodiscover: bool = False
    auth: EwsAuth = "ntlm"
    username: str | None = None
    password: Secret | None = None
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    token_url: str | None = None
    scope: str | None = None
    version: EwsVersion | None = None
    impersonation: bool = False
    max_connections: int = Field(default=4, ge=1, le=64)
    max_message_size: ByteSize = Field(default=DEFAULT_EWS_MAX_MESSAGE_SIZE, gt=0)
    # Messages created by one CreateItem request (1: one request per message; docs/exchange.md).
    create_batch: int = Field(default=DEFAULT_EWS_CREATE_BATCH, ge=1, le=MAX_EWS_CREATE_BATCH)
    tls_verify: bool = True
    ca_file: CaFile | None = None

    @field_validator("service_endpoint", "token_url")
    @classmethod
    def _https_only(cls, value: str | None) -> str | None:
        # Every EWS auth method sends something secret (password, NTLM exchange, bearer token) with each
        # request: plain HTTP is not offered at all.
        if value is not None and not value.lower().startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value

    @model_validator(mode="after")
    def _complete(self) -> EwsDestination:
        if self.service_endpoint is None and not self.autodiscover:
            raise ValueError("service_endpoint is required unless autodiscover = true")
        if self.auth == "oauth2":
            missing = [f for f in ("client_id", "client_secret") if getattr(self, f) is None]
            if self.tenant_id is None and self.token_url is None:
                missing.append("tenant_id (or token_url)")
            if missing:
                raise ValueError(f'auth = "oauth2" needs {", ".join(missing)}')
            if not self.impersonation:
                raise ValueError('auth = "oauth2" (an application token) needs impersonation = true')
        elif self.username is not None and self.password is None:
            raise ValueError("username is set but password is missing")
        return self


GMAIL_API_URL = "https://gmail.googleapis.com"
# Gmail's own limit for users.messages.import (the media upload of the raw message).
GMAIL_MAX_MESSAGE_SIZE = 150 * 1024 * 1024


class GmailDestination(_Model):
    """Gmail or Google Workspace through the Gmail API's ``users.messages.import``
    (connector/destinations/gmail.py; docs/gmail.md).

    Two ways to sign in, exactly one of them:

    * Google Workspace: ``service_account_key`` (the JSON key of a service account with domain-wide
      delegation), acting as each account's ``mailbox``;
    * personal Gmail: ``client_secrets`` (the JSON of an OAuth client of type "Desktop app"); the consent
      is given once with ``pop-connector authorize NAME [--user ADDRESS]``, which keeps the refresh token
      in ``token_dir`` (relative: under the state directory), one file per Gmail address, mode 600.
    """

    name: str = Field(min_length=1)
    type: Literal["gmail"]
    service_account_key: Secret | None = None
    client_secrets: Secret | None = None
    token_dir: Path | None = None
    # Labels every imported message gets (system labels by their id: INBOX, UNREAD, STARRED, ...).
    labels: list[str] = Field(default_factory=lambda: ["INBOX"])
    # A label per account, created when missing ("/" nests); "{account}" is the account's name. "" = none.
    account_label: str = "Hosted/{account}"
    mark_seen: bool = False
    never_mark_spam: bool = False
    process_for_calendar: bool = False
    max_message_size: ByteSize = Field(default=GMAIL_MAX_MESSAGE_SIZE, gt=0)
    api_url: str = GMAIL_API_URL
    tls_verify: bool = True
    ca_file: CaFile | None = None

    @field_validator("api_url")
    @classmethod
    def _https_only(cls, value: str) -> str:
        # Every request carries a bearer token: plain HTTP is not offered.
        if not value.lower().startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_way_to_sign_in(self) -> GmailDestination:
        if (self.service_account_key is None) == (self.client_secrets is None):
            raise ValueError(
                "set exactly one of service_account_key (Google Workspace, domain-wide delegation) and "
                'client_secrets (personal Gmail: an OAuth client of type "Desktop app", then run '
                "`pop-connector authorize`)"
            )
        if self.token_dir is not None and self.client_secrets is None:
            raise ValueError("token_dir is only used with client_secrets")
        return self

    @property
    def workspace(self) -> bool:
        """Signed in as a service account acting as each user (else: one user's own consent)."""
        return self.service_account_key is not None

    def tokens(self) -> Path:
        """Where ``authorize`` keeps the refresh tokens of this destination."""
        return token_directory(self.token_dir, self.name)

    def label_for(self, account: str) -> str | None:
        return self.account_label.replace("{account}", account) or None


Destination = Annotated[ImapDestination | EwsDestination | GmailDestination, Field(discriminator="type")]


DEFAULT_ROUTING_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To", "Cc")


class RoutingRule(_Model):
    """``match``: an address or a pattern (``*@sales.example.org``); ``mailbox``: the local mailbox."""

    match: str = Field(min_length=3, pattern=r"^[^@\s]+@[^@\s]+$")
    mailbox: str = Field(min_length=1)


class RoutingDefault(_Model):
    mailbox: str = Field(min_length=1)


class RoutingPolicy(_Model):
    """Catch-all (multidrop) routing of one POP mailbox to several local mailboxes
    (connector/policies/routing.py)."""

    headers: list[str] = Field(default_factory=lambda: list(DEFAULT_ROUTING_HEADERS), min_length=1)
    rules: list[RoutingRule] = Field(default_factory=list)
    default: RoutingDefault | None = None

    @model_validator(mode="after")
    def _routes_something(self) -> RoutingPolicy:
        if not self.rules and self.default is None:
            raise ValueError("routing needs rules, a default, or both")
        return self


class Account(Defaults):
    """One POP3 mailbox and where its mail goes. Inherited fields are filled from [defaults]."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")
    enabled: bool = True
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsMode = "implicit"
    tls_verify: bool = True
    ca_file: CaFile | None = None
    auth: Literal["user", "apop", "oauth2"] = "user"
    username: str = Field(min_length=1)
    password: Secret | None = None
    oauth: OAuthSettings | None = None
    # XOAUTH2 with the token on the AUTH line (RFC 5034 initial response) instead of after a "+".
    auth_initial_response: bool = False
    destination: str
    destination_username: str | None = None
    destination_password: Secret | None = None
    # The target mailbox (SMTP address) of an EWS or Gmail destination.
    mailbox: str | None = None
    routing: RoutingPolicy | None = None

    @property
    def effective_port(self) -> int:
        return self.port or (995 if self.tls == "implicit" else 110)

    @field_validator("mailbox")
    @classmethod
    def _smtp_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
            raise ValueError(f'{value!r} is not an SMTP address (write e.g. "alice@example.org")')
        return value

    @model_validator(mode="after")
    def _source_login(self) -> Account:
        _check_oauth(self.auth, self.oauth)
        if self.oauth is not None and self.oauth.google:
            raise ValueError(
                "oauth.client_secrets (a Gmail user's consent) is for IMAP destinations (imap.gmail.com), "
                "not for POP3 sources"
            )
        if self.auth == "oauth2" and self.password is not None:
            raise ValueError('password is not used with auth = "oauth2"')
        if self.auth != "oauth2" and self.password is None:
            raise ValueError("password: required field is missing")
        return self

    @model_validator(mode="after")
    def _destination_login_pair(self) -> Account:
        # An OAuth destination needs only the mailbox name; whether a password is missing is checked
        # against the destination in Config.
        if self.destination_password is not None and self.destination_username is None:
            raise ValueError("destination_username and destination_password go together")
        return self


# What an account file's header may name (connector/accounts_file.py).
ACCOUNT_COLUMNS = columns_of(Account)


class Config(_Model):
    service: ServiceConfig = ServiceConfig()
    defaults: Defaults = Defaults()
    destinations: list[Destination] = Field(default_factory=list)
    accounts: list[Account] = Field(default_factory=list)
    source: Path | None = Field(default=None, exclude=True)
    # The account files read (accounts_file, [[account_files]]); their accounts are in ``accounts``.
    account_file_paths: tuple[Path, ...] = Field(default=(), exclude=True)

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        _check_unique("destinations", [d.name for d in self.destinations])
        _check_unique("accounts", [a.name for a in self.accounts])
        by_name = {d.name: d for d in self.destinations}
        for index, account in enumerate(self.accounts):
            destination = by_name.get(account.destination)
            if destination is None:
                known = ", ".join(sorted(by_name)) or "none defined"
                raise _PathError(
                    f"accounts[{index}].destination",
                    f"unknown destination {account.destination!r} (known: {known})",
                )
            if account.routing is not None:
                _check_routing_account(index, account, destination)
                continue
            if isinstance(destination, EwsDestination):
                _check_ews_account(index, account, destination)
                continue
            if isinstance(destination, GmailDestination):
                _check_gmail_account(index, account, destination)
                continue
            if destination.username is None and account.destination_username is None:
                raise _PathError(
                    f"accounts[{index}]",
                    f"destination {destination.name!r} has no username, so the account needs "
                    "destination_username and destination_password",
                )
            _check_destination_password(index, account, destination)
            if account.mailbox is not None:
                raise _PathError(
                    f"accounts[{index}].mailbox", 'only used with an EWS destination (type = "ews")'
                )
        return self

    def destination_for(self, account: Account) -> ImapDestination | EwsDestination | GmailDestination:
        return next(d for d in self.destinations if d.name == account.destination)

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        raise ConfigError(f"no account named {name!r} in {self.source or 'the configuration'}")


def enabled_by_name(config: Config) -> dict[str, Account]:
    """The enabled accounts by name: the service and the workers keep this per configuration and look a
    poll's account up in it (a scan of the list per poll cost more than the poll's scheduling with 1,000
    accounts, more than an idle poll with 100,000)."""
    return {account.name: account for account in config.accounts if account.enabled}


def _check_destination_password(index: int, account: Account, destination: ImapDestination) -> None:
    oauth = destination.auth == "oauth2"
    if oauth and account.destination_password is not None:
        raise _PathError(
            f"accounts[{index}].destination_password",
            f"destination {destination.name!r} logs in with OAuth; destination_username alone names "
            "the mailbox",
        )
    if not oauth and account.destination_username is not None and account.destination_password is None:
        raise _PathError(f"accounts[{index}]", "destination_username and destination_password go together")


def _check_routing_account(
    index: int, account: Account, destination: ImapDestination | EwsDestination | GmailDestination
) -> None:
    """A catch-all account logs in as each recipient: IMAP through a master user, EWS by impersonation,
    Gmail as a Workspace service account acting as each user."""
    where = f"accounts[{index}]"
    if isinstance(destination, GmailDestination):
        if not destination.workspace:
            raise _PathError(
                where,
                f"catch-all routing delivers into each recipient's mailbox: destination {destination.name!r} "
                "needs service_account_key (Google Workspace, domain-wide delegation), not one user's "
                "consent",
            )
        return
    if isinstance(destination, EwsDestination):
        if not destination.impersonation:
            raise _PathError(
                where,
                f"catch-all routing delivers into each recipient's mailbox: destination {destination.name!r} "
                "needs impersonation = true",
            )
        _check_ews_folder(where, account)
        return
    if destination.master_username is None:
        raise _PathError(
            where,
            f"catch-all routing logs in as each recipient: destination {destination.name!r} needs "
            "master_username and master_password (a master user of the IMAP server)",
        )
    if account.mailbox is not None:
        raise _PathError(f"{where}.mailbox", 'only used with an EWS destination (type = "ews")')


class _PathError(ValueError):
    """A cross-field error that knows its own field path (pydantic would only say 'the whole file')."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _check_gmail_account(index: int, account: Account, destination: GmailDestination) -> None:
    where = f"accounts[{index}]"
    if destination.workspace and account.mailbox is None:
        raise _PathError(
            f"{where}.mailbox",
            f"required: the Google Workspace user to deliver into (destination {destination.name!r} signs "
            'in as a service account acting as that user), e.g. mailbox = "alice@example.com"',
        )
    if account.destination_username is not None or account.destination_password is not None:
        raise _PathError(
            f"{where}.destination_username",
            f"not used with a Gmail destination ({destination.name!r} signs in with OAuth 2.0)",
        )


def ews_mailbox(account: Account, destination: EwsDestination) -> str | None:
    """The mailbox an account delivers into: its own ``mailbox``, else the login's (when it is an address)."""
    if account.mailbox is not None:
        return account.mailbox
    login = account.destination_username or destination.username
    return login if login is not None and "@" in login else None


def _check_ews_account(index: int, account: Account, destination: EwsDestination) -> None:
    where = f"accounts[{index}]"
    if destination.impersonation and account.mailbox is None:
        raise _PathError(
            f"{where}.mailbox",
            f"destination {destination.name!r} uses impersonation, so the account must name its target "
            'mailbox (mailbox = "user@example.org")',
        )
    if ews_mailbox(account, destination) is None:
        raise _PathError(
            f"{where}.mailbox",
            f"required: the SMTP address of the Exchange mailbox to deliver into (destination "
            f"{destination.name!r} logs in as {account.destination_username or destination.username!r}, "
            "which is not an address)",
        )
    if destination.auth != "oauth2" and destination.username is None and account.destination_username is None:
        raise _PathError(
            where,
            f"destination {destination.name!r} has no username, so the account needs "
            "destination_username and destination_password",
        )
    _check_ews_folder(where, account)


def _check_ews_folder(where: str, account: Account) -> None:
    top = next((part for part in account.folder.split("/") if part), "Inbox")
    if top.lower() != "inbox":
        raise _PathError(
            f"{where}.folder",
            f'an EWS destination delivers into Inbox or a folder under it ("Inbox/{account.folder}"), '
            f"not {account.folder!r}",
        )


def _check_unique(section: str, names: list[str]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            raise _PathError(f"{section}[{index}].name", f"duplicate name {name!r}")
        seen.add(name)


# --- loading -------------------------------------------------------------------------------------------


def format_location(loc: tuple[int | str, ...]) -> str:
    """``('accounts', 2, 'retention', 'days')`` -> ``accounts[2].retention.days``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("imap", "ews", "function-after[_check_unique]"):
            continue  # discriminator tags are not something the user wrote
        else:
            text += f".{part}" if text else part
    return text


def _describe(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling)"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "union_tag_not_found":
        return 'type is missing (write type = "imap" or type = "ews")'
    if error["type"] == "union_tag_invalid":
        return f'unknown type {error["ctx"]["tag"]!r} (expected "imap" or "ews")'
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _errors_from(
    exc: ValidationError, prefix: tuple[int | str, ...], path: Path, place: Callable[[str], str] | None = None
) -> list[str]:
    """One line per problem: ``<file>: <field path>: <cause>``; ``place`` may say where a field path is
    written instead (an account file's row: connector/accounts_file.py)."""
    lines = []
    for error in exc.errors():
        ctx = error.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, _PathError):
            where, message = inner.path, inner.message
        else:
            where = format_location(prefix + tuple(error["loc"])) or "(top level)"
            message = _describe(error)
        lines.append(f"{place(where) if place else f'{path}: {where}'}: {message}")
    return list(dict.fromkeys(lines))  # a file's bad default is one line, not one per row


def _merging_defaults(defaults: Defaults) -> Callable[[object], object]:
    """What turns an ``[[accounts]]`` table or an account file's row into the account's fields: ``defaults``
    under it. Only the defaults the configuration sets are written into each account (an account's own
    defaults are the same as ``[defaults]``'s), dumped once, not once per account: 100,000 accounts each
    holding every default as set cost a dump per account and a large set of names in each account."""
    inherited = defaults.model_dump(exclude_unset=True)
    retry = defaults.retry.model_dump()

    def merge(account: object) -> object:
        if not isinstance(account, Mapping):
            return account
        merged: dict[str, Any] = dict(inherited)
        for key, value in account.items():
            if key == "retry" and isinstance(value, Mapping):
                # Partial retry tables inherit the rest; a retention mode replaces the whole policy.
                merged[key] = {**retry, **value}
            else:
                merged[key] = value
        return merged

    return merge


def parse_config(
    data: Mapping[str, Any], path: Path, *, account_files: Sequence[AccountFile] | None = None
) -> Config:
    """Validate already-parsed TOML and the account files it names (or ``account_files`` instead).
    Raises ConfigError listing every problem found."""
    raw_defaults = data.get("defaults", {})
    try:
        defaults = Defaults.model_validate(raw_defaults)
    except ValidationError as exc:
        raise ConfigError("\n".join(_errors_from(exc, ("defaults",), path))) from None
    raw_accounts = data.get("accounts", [])
    files = _account_files(data, path, raw_accounts, account_files)
    data = {key: value for key, value in data.items() if key not in ("accounts_file", "account_files")}
    if isinstance(raw_accounts, list):
        first = len(raw_accounts)
        merge = _merging_defaults(defaults)
        raw_accounts = [merge(account) for account in raw_accounts]
        raw_accounts += [merge(row.fields) for row in files.rows]
    else:
        first = 0  # pydantic says what is wrong with it

    def place(where: str) -> str:
        return files.place(where, first) or f"{path}: {where}"

    read_from = tuple(account_file.path for account_file in files.files)
    try:
        config = Config.model_validate(
            {**data, "accounts": raw_accounts, "source": path, "account_file_paths": read_from}
        )
    except ValidationError as exc:
        raise ConfigError("\n".join(by_line(files.errors + _errors_from(exc, (), path, place)))) from None
    if files.errors:
        raise ConfigError("\n".join(by_line(files.errors)))
    config = _with_database_default(config, path)
    # Before anything uses them: a reload's rotated passwords are redacted from its first log line on.
    redaction.register_config(config)
    return config


def account_rows_errors(files: FileAccounts) -> list[str]:
    """Each row of ``files`` checked as an account on its own, without a configuration (so its destination
    is not): ``accounts check-file`` with no configuration file."""
    errors = list(files.errors)
    for index, row in enumerate(files.rows):
        try:
            Account.model_validate(row.fields)
        except ValidationError as exc:
            errors += _errors_from(
                exc, ("accounts", index), Path(), lambda where: files.place(where, 0) or where
            )
    return by_line(errors)


def _account_files(
    data: Mapping[str, Any], path: Path, accounts: object, only: Sequence[AccountFile] | None
) -> FileAccounts:
    """The rows of the account files (connector/accounts_file.py), their names checked against
    ``[[accounts]]``."""
    files = (
        FileAccounts(files=list(only)) if only is not None else files_from_config(data, path, ACCOUNT_COLUMNS)
    )
    taken = {
        account["name"]: f"{path}: accounts[{index}]"
        for index, account in enumerate(accounts if isinstance(accounts, list) else [])
        if isinstance(account, Mapping) and isinstance(account.get("name"), str)
    }
    return read_files(files, ACCOUNT_COLUMNS, taken)


def _with_database_default(config: Config, path: Path) -> Config:
    database = resolve_database_url(config.service.database, path.parent)
    if config.service.mode == "distributed" and not database.startswith("postgresql"):
        raise ConfigError(
            f'{path}: service.mode: "distributed" needs a PostgreSQL database '
            f'(service.database = "postgresql+psycopg://user@host/dbname"), not {database.split(":")[0]}'
        )
    service = config.service.model_copy(update={"database": database})
    return config.model_copy(update={"service": service})


def resolve_database_url(database: str | None, base_dir: Path) -> str:
    """A relative SQLite path is relative to the config file; no URL means the state directory."""
    if database is None:
        return f"sqlite:///{default_state_dir() / 'state.db'}"
    prefix = "sqlite:///"
    if database.startswith(prefix) and not database.startswith(prefix + "/"):
        relative = database.removeprefix(prefix)
        if relative and relative != ":memory:":
            return f"{prefix}{(base_dir / relative).resolve()}"
    return database


def default_state_dir() -> Path:
    """systemd's $STATE_DIRECTORY when run as a unit, else the per-user data directory."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd may list several directories separated by ':'; the first is ours.
        return Path(state.split(":")[0])
    from platformdirs import user_data_dir

    return Path(user_data_dir("pop-connector", appauthor=False))


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    raise ConfigError(f"no configuration file: pass --config PATH or set {CONFIG_ENV}")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None


def load_config(path: Path) -> Config:
    return parse_config(read_toml(path), path.resolve())
