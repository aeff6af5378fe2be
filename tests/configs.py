"""Configurations for tests against the Dovecot fixture: as TOML text (for the CLI) or parsed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connector.config import Config, load_config
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.ews import EwsServer

# The EWS test server's service account (with the ApplicationImpersonation role) and target mailbox.
EWS_SERVICE = "svc-import@corp.example"
EWS_SERVICE_PASSWORD = "Imp0rt-secret!"
EWS_MAILBOX = "alice@corp.example"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
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
    service: dict[str, Any] | None = None,
) -> str:
    """One account reading ``users.source`` over plain POP3 into ``users.destination`` over plain IMAP.

    A ``destination`` with ``type = "ews"`` replaces the IMAP destination altogether (named "exchange").
    """
    service = {"database": database, "max_workers": 4, **(service or {})}
    destination_fields: dict[str, Any]
    if (destination or {}).get("type") == "ews":
        destination_fields = {"name": "exchange", **(destination or {})}
    else:
        destination_fields = {
            "name": "dovecot",
            "type": "imap",
            "host": dovecot.host,
            "port": dovecot.ports.imap,
            "tls": "none",
            "username": users.destination.name,
            "password": users.destination.password,
            **(destination or {}),
        }
    account_fields: dict[str, Any] = {
        "name": name,
        "host": dovecot.host,
        "port": dovecot.ports.pop3,
        "tls": "none",
        "username": users.source.name,
        "password": users.source.password,
        "destination": destination_fields["name"],
        "timeout": "20s",
        **(account or {}),
    }
    return "\n".join(
        [
            _table("[service]", service),
            _table("[defaults]", defaults or {}),
            _table("[[destinations]]", destination_fields),
            _table("[[accounts]]", account_fields),
        ]
    )


def ews_destination(ews: EwsServer, **overrides: Any) -> dict[str, Any]:
    """Fields of an impersonating EWS destination on the test server, trusting its CA; auth is the default."""
    return {
        "type": "ews",
        "service_endpoint": ews.service_endpoint,
        "username": EWS_SERVICE,
        "password": EWS_SERVICE_PASSWORD,
        "impersonation": True,
        "ca_file": str(ews.ca_file),
        **overrides,
    }


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_config(tmp_path: Path, dovecot: Dovecot, users: MailUsers, database: str, **kwargs: Any) -> Config:
    return load_config(
        write_config(tmp_path / "config.toml", config_toml(dovecot, users, database, **kwargs))
    )


def write_tables(
    path: Path,
    database: str,
    destinations: list[dict[str, Any]],
    accounts: list[dict[str, Any]],
    service: dict[str, Any] | None = None,
) -> Path:
    """A config file with any servers: one [[destinations]]/[[accounts]] table per dict; ``service``: more
    fields of [service]."""
    parts = [_table("[service]", {"database": database, **(service or {})})]
    parts += [_table("[[destinations]]", fields) for fields in destinations]
    parts += [_table("[[accounts]]", fields) for fields in accounts]
    path.write_text("\n".join(parts))
    return path
