"""Acceptance fixtures: a config file for the real Dovecot and a way to run the CLI as a process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.configs import config_toml, write_config
from tests.servers.dovecot import Dovecot, MailUsers

ROOT = Path(__file__).resolve().parents[2]

RunCli = Callable[..., subprocess.CompletedProcess[str]]


def catch_all_config(
    write_cfg: Callable[..., Path], dovecot: Dovecot, rules: dict[str, str], **fields: Any
) -> Path:
    """A config whose account routes ``rules`` (address pattern -> mailbox), logging in as the master user;
    ``fields`` go to ``write_cfg``."""
    config = write_cfg(
        destination={"master_username": dovecot.master.name, "master_password": dovecot.master.password},
        **fields,
    )
    table = ", ".join(f'{{ match = "{match}", mailbox = "{mailbox}" }}' for match, mailbox in rules.items())
    config.write_text(config.read_text() + f"[accounts.routing]\nrules = [{table}]\n")
    return config


@pytest.fixture
def write_cfg(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, sqlite_url: str
) -> Callable[..., Path]:
    def write(**kwargs: Any) -> Path:
        kwargs.setdefault("name", "alice")
        return write_config(tmp_path / "config.toml", config_toml(dovecot, mail_users, sqlite_url, **kwargs))

    return write


@pytest.fixture
def run_cli() -> RunCli:
    def run(*args: str, module: str = "connector", timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            check=False,
        )

    return run
