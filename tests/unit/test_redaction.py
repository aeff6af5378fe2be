"""The redaction registry: what the configuration loader feeds it, and what it leaves alone."""

from __future__ import annotations

from pathlib import Path

from connector import redaction
from connector.config import load_config
from connector.errors import SourceAuthError

CONFIG = """
[service]
database = "postgresql+psycopg://ledger:db%2Fpass-1@db.example/ledger"
status_token = "status-token-1"

[[destinations]]
name = "imap"
type = "imap"
host = "imap.example"
username = "svc"
password = "destination-pw-1"
master_username = "master"
master_password = "master-pw-1"

[[destinations]]
name = "exo"
type = "imap"
host = "outlook.office365.com"
username = "box@contoso.example"
auth = "oauth2"
oauth = { tenant_id = "t", client_id = "c", client_secret = "client-secret-1" }

[[accounts]]
name = "alice"
host = "pop.example"
username = "alice"
password = "pop-pw-1"
destination = "imap"
destination_username = "alice-imap"
destination_password = "own-destination-pw-1"
"""
SECRETS = [
    "db%2Fpass-1",
    "db/pass-1",
    "status-token-1",
    "destination-pw-1",
    "master-pw-1",
    "client-secret-1",
    "pop-pw-1",
    "own-destination-pw-1",
]


def test_every_secret_of_a_loaded_configuration_is_redacted(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    text = "the server said: " + " | ".join(SECRETS)
    assert redaction.redact(text) == text  # nothing known before the configuration is read
    load_config(path)
    assert redaction.redact(text) == "the server said: " + " | ".join(["****"] * len(SECRETS))
    error = SourceAuthError(f"pop.example:110: PASS failed: -ERR wrong password pop-pw-1 for {SECRETS[0]}")
    assert str(error) == "pop.example:110: PASS failed: -ERR wrong password **** for ****"


def test_longest_first_and_too_short_ones_left_alone() -> None:
    redaction.register("abcdef", "abc", "xy", None)
    assert redaction.redact("abcdefg abcx xy") == "****g ****x xy"
