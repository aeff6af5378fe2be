"""Configurations for tests against the Dovecot fixture: as TOML text (for the CLI) or parsed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connector.config import Config, load_config
from tests.servers.dovecot import Dovecot, MailUsers


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(header: str, fields: dict[str, Any]) -> str:
    return f"{header}\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in fields.items())


def config_toml(
    dovecot: Dovecot,
    users: MailUsers,
    database: str,
    *,
    account: dict[str, Any] | None = None,
    destination: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    name: str = "alice",
) -> str:
    """One account reading ``users.source`` over plain POP3 into ``users.destination`` over plain IMAP."""
    service = {"database": database, "max_workers": 4}
    account_fields: dict[str, Any] = {
        "name": name,
        "host": dovecot.host,
        "port": dovecot.ports.pop3,
        "tls": "none",
        "username": users.source.name,
        "password": users.source.password,
        "destination": "dovecot",
        "timeout": "20s",
        **(account or {}),
    }
    destination_fields: dict[str, Any] = {
        "name": "dovecot",
        "type": "imap",
        "host": dovecot.host,
        "port": dovecot.ports.imap,
        "tls": "none",
        "username": users.destination.name,
        "password": users.destination.password,
        **(destination or {}),
    }
    return "\n".join(
        [
            _table("[service]", service),
            _table("[defaults]", defaults or {}),
            _table("[[destinations]]", destination_fields),
            _table("[[accounts]]", account_fields),
        ]
    )


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_config(tmp_path: Path, dovecot: Dovecot, users: MailUsers, database: str, **kwargs: Any) -> Config:
    return load_config(
        write_config(tmp_path / "config.toml", config_toml(dovecot, users, database, **kwargs))
    )


def write_tables(
    path: Path, database: str, destinations: list[dict[str, Any]], accounts: list[dict[str, Any]]
) -> Path:
    """A config file with any servers: one [[destinations]]/[[accounts]] table per dict."""
    parts = [_table("[service]", {"database": database})]
    parts += [_table("[[destinations]]", fields) for fields in destinations]
    parts += [_table("[[accounts]]", fields) for fields in accounts]
    path.write_text("\n".join(parts))
    return path
