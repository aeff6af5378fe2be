"""The pop-connector command with OAuth on both sides, from a TOML file as an admin writes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acceptance.conftest import ROOT
from tests.integration.oauth.conftest import OAuthSync

pytestmark = pytest.mark.acceptance


def run(config: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **env},
        check=False,
    )


def test_check_and_sync_with_oauth_from_toml(oauth_sync: OAuthSync, tmp_path: Path) -> None:
    source_app = oauth_sync.register(oauth_sync.users.source.name)
    destination_app = oauth_sync.register(oauth_sync.users.destination.name)
    server, dovecot, users = oauth_sync.token_server, oauth_sync.dovecot, oauth_sync.users
    config = tmp_path / "config.toml"
    secret = 'client_secret = { env = "SOURCE_SECRET" }'
    config.write_text(
        f"""\
[service]
database = "{oauth_sync.database}"

[[destinations]]
name = "exo"
type = "imap"
host = "{dovecot.host}"
port = {dovecot.ports.imap}
tls = "none"
auth = "oauth2"

[destinations.oauth]
token_url = "{server.token_url}"
client_id = "{destination_app.client_id}"
client_secret = {{ env = "DESTINATION_SECRET" }}

[[accounts]]
name = "alice"
host = "{dovecot.host}"
port = {dovecot.ports.pop3}
tls = "none"
username = "{users.source.name}"
auth = "oauth2"
oauth = {{ token_url = "{server.token_url}", client_id = "{source_app.client_id}", {secret} }}
destination = "exo"
destination_username = "{users.destination.name}"
folder = "Imported/Hosted"
"""
    )
    env = {"SOURCE_SECRET": source_app.secret, "DESTINATION_SECRET": destination_app.secret}
    oauth_sync.seed(1, 2)
    check = run(config, "check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "alice: POP3" in check.stdout and "alice: destination exo OK" in check.stdout
    sync = run(config, "--log-level", "DEBUG", "sync", env=env)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert "alice: ok delivered=2" in sync.stdout
    assert len(dovecot.imap_messages(users.destination.name, "Imported.Hosted")) == 2
    output = check.stdout + check.stderr + sync.stdout + sync.stderr
    assert "AUTH XOAUTH2" in output  # the DEBUG trace was on
    apps = (source_app.client_id, destination_app.client_id)
    tokens = [token.value for token in server.issued() if token.client_id in apps]
    for secret in [*tokens, source_app.secret, destination_app.secret]:
        assert secret not in output
