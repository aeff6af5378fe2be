"""``pop-connector accounts``: ``sync-config`` (the accounts registry of distributed mode) and
``check-file`` (one accounts file, checked on its own: connector/accounts_file.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine

from connector.accounts_file import AccountFile, FileAccounts, files_from_config, read_files
from connector.config import (
    ACCOUNT_COLUMNS,
    Config,
    account_rows_errors,
    parse_config,
    read_toml,
)
from connector.errors import ConfigError

EXIT_OK, EXIT_CONFIG = 0, 2


def sync_config(config: Config, engine: Engine) -> int:
    from connector.service.distributed import sync_accounts

    summary = sync_accounts(engine, config.accounts)
    print(f"accounts: {summary.added} added, {summary.active} active, {summary.inactive} inactive")
    return EXIT_OK


def check_file(path: Path, config_file: Path | None, out: Callable[[str], None] = print) -> int:
    """Every error of the file, each with its line, or how many accounts it has; 2 when it has errors.

    With a configuration the rows are checked as its accounts would be (its destinations, its
    ``[defaults]``, the defaults of the file's ``[[account_files]]`` table, names unique beside its
    ``[[accounts]]``), but without its other account files; without one, each row on its own."""
    if config_file is None:
        files = read_files(FileAccounts(files=[AccountFile(path, str(path))]), ACCOUNT_COLUMNS, {})
        errors, count = account_rows_errors(files), len(files.rows)
        against = "no configuration given (--config or $POP_CONNECTOR_CONFIG), so destinations not checked"
    else:
        errors, count = _check_with(path, config_file)
        against = f"checked against {config_file}"
    if errors:
        for line in errors:
            out(line)
        out(f"{path}: {len(errors)} error{'s' if len(errors) != 1 else ''}")
        return EXIT_CONFIG
    out(f"{path}: {count} account{'s' if count != 1 else ''} ({against})")
    return EXIT_OK


def _check_with(path: Path, config_file: Path) -> tuple[list[str], int]:
    data = read_toml(config_file)
    source = config_file.resolve()
    named = files_from_config(data, source, ACCOUNT_COLUMNS).files
    table = next((f for f in named if f.path.resolve() == path.resolve()), None)
    account_file = (
        AccountFile(path, str(path), table.table, table.defaults) if table else AccountFile(path, str(path))
    )
    try:
        config = parse_config(data, source, account_files=[account_file])
    except ConfigError as exc:
        return str(exc).splitlines(), 0
    in_toml = data.get("accounts", [])
    return [], len(config.accounts) - (len(in_toml) if isinstance(in_toml, list) else 0)
