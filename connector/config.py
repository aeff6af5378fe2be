"""The configuration file: TOML, validated by pydantic, every error naming file, field path and cause.

``[defaults]`` is validated on its own first and then merged under each account, so that a bad default is
reported once (``defaults.retry.max_attempts``) and a bad account value at its own path
(``accounts[2].retention.days``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from connector.errors import ConfigError
from connector.tls import TlsMode

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


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret)]


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

    @model_validator(mode="after")
    def _ordered(self) -> RetryPolicy:
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must not be shorter than initial_backoff")
        return self


class ServiceConfig(_Model):
    database: str | None = None
    max_workers: int = Field(default=8, ge=1, le=256)


class Defaults(_Model):
    """Values every account inherits unless it sets its own."""

    poll_interval: Duration = timedelta(minutes=5)
    poll_jitter: float = Field(default=0.1, ge=0, le=1)
    retention: RetentionPolicy = RetentionPolicy()
    retry: RetryPolicy = RetryPolicy()
    timeout: Duration = timedelta(seconds=60)
    folder: str = "INBOX"
    mark_seen: bool = False

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


class ImapDestination(_Model):
    name: str = Field(min_length=1)
    type: Literal["imap"]
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsMode = "implicit"
    tls_verify: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password: Secret | None = None
    create_folders: bool = True

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.tls == "implicit" else 143)

    @model_validator(mode="after")
    def _password_with_username(self) -> ImapDestination:
        if self.username is not None and self.password is None:
            raise ValueError("username is set but password is missing")
        return self


Destination = ImapDestination


class Account(Defaults):
    """One POP3 mailbox and where its mail goes. Inherited fields are filled from [defaults]."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")
    enabled: bool = True
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsMode = "implicit"
    tls_verify: bool = True
    ca_file: Path | None = None
    auth: Literal["user", "apop"] = "user"
    username: str = Field(min_length=1)
    password: Secret
    destination: str
    destination_username: str | None = None
    destination_password: Secret | None = None

    @property
    def effective_port(self) -> int:
        return self.port or (995 if self.tls == "implicit" else 110)

    @model_validator(mode="after")
    def _destination_login_pair(self) -> Account:
        if (self.destination_username is None) != (self.destination_password is None):
            raise ValueError("destination_username and destination_password go together")
        return self


class Config(_Model):
    service: ServiceConfig = ServiceConfig()
    defaults: Defaults = Defaults()
    destinations: list[Destination] = Field(default_factory=list)
    accounts: list[Account] = Field(default_factory=list)
    source: Path | None = Field(default=None, exclude=True)

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
            if destination.username is None and account.destination_username is None:
                raise _PathError(
                    f"accounts[{index}]",
                    f"destination {destination.name!r} has no username, so the account needs "
                    "destination_username and destination_password",
                )
        return self

    def destination_for(self, account: Account) -> Destination:
        return next(d for d in self.destinations if d.name == account.destination)

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        raise ConfigError(f"no account named {name!r} in {self.source or 'the configuration'}")


class _PathError(ValueError):
    """A cross-field error that knows its own field path (pydantic would only say 'the whole file')."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


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
        elif part in ("imap", "function-after[_check_unique]"):
            continue  # discriminator tags are not something the user wrote
        else:
            text += f".{part}" if text else part
    return text


def _describe(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling)"
    if error["type"] == "missing":
        return "required field is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _errors_from(exc: ValidationError, prefix: tuple[int | str, ...], path: Path) -> list[str]:
    lines = []
    for error in exc.errors():
        ctx = error.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, _PathError):
            lines.append(f"{path}: {inner.path}: {inner.message}")
            continue
        where = format_location(prefix + tuple(error["loc"])) or "(top level)"
        lines.append(f"{path}: {where}: {_describe(error)}")
    return lines


def _merge_defaults(defaults: Defaults, account: object) -> object:
    if not isinstance(account, Mapping):
        return account
    merged: dict[str, Any] = dict(defaults.model_dump())
    for key, value in account.items():
        if key == "retry" and isinstance(value, Mapping):
            # Partial retry tables inherit the rest; a retention mode replaces the whole policy.
            merged[key] = {**defaults.retry.model_dump(), **value}
        else:
            merged[key] = value
    return merged


def parse_config(data: Mapping[str, Any], path: Path) -> Config:
    """Validate already-parsed TOML. Raises ConfigError listing every problem found."""
    raw_defaults = data.get("defaults", {})
    try:
        defaults = Defaults.model_validate(raw_defaults)
    except ValidationError as exc:
        raise ConfigError("\n".join(_errors_from(exc, ("defaults",), path))) from None
    raw_accounts = data.get("accounts", [])
    if isinstance(raw_accounts, list):
        raw_accounts = [_merge_defaults(defaults, account) for account in raw_accounts]
    try:
        config = Config.model_validate({**data, "accounts": raw_accounts, "source": path})
    except ValidationError as exc:
        raise ConfigError("\n".join(_errors_from(exc, (), path))) from None
    return _with_database_default(config, path)


def _with_database_default(config: Config, path: Path) -> Config:
    database = resolve_database_url(config.service.database, path.parent)
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


def load_config(path: Path) -> Config:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    return parse_config(data, path.resolve())
