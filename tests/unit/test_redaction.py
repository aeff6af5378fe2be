"""The redaction registry: what the configuration loader feeds it, and what it leaves alone."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

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


# Secrets of their own alphabet (snowmen, stars and a few letters), unlike any text of the other tests,
# which share the process's registry.
_SNOW = "\u2603"
_many_secrets = st.lists(
    st.text(st.sampled_from([_SNOW, "*", "a", "b"]), min_size=3, max_size=8).map(lambda s: _SNOW + s),
    min_size=1,
    max_size=40,
)


def _scanned(text: str, secrets: set[str]) -> str:
    """What redaction is defined as: every secret in turn, longest first (``longest_first``)."""
    for secret in sorted(secrets, key=redaction.longest_first):
        if secret in text:
            text = text.replace(secret, redaction.REDACTED)
    return text


def test_many_secrets_are_found_through_their_heads() -> None:
    """Above ``SCAN_UP_TO`` secrets (100,000 accounts' passwords) a line is looked up once per position
    instead of once per secret: only the secrets whose head is in the line are tried."""
    redaction.register(*(f"{_SNOW}{n:06d}-pw" for n in range(redaction.SCAN_UP_TO + 1000)))
    line = f"account a1: login failed for {_SNOW}000042-pw and {_SNOW}000043-pw, not {_SNOW}x"
    assert redaction._in(line) <= {f"{_SNOW}000042-pw", f"{_SNOW}000043-pw"} | set(redaction._starred)
    assert redaction.redact(line) == "account a1: login failed for **** and ****, not " + _SNOW + "x"


@settings(max_examples=300)
@given(
    secrets=_many_secrets,
    pieces=st.lists(
        st.one_of(st.integers(0, 39), st.text(st.sampled_from([_SNOW, "*", "a", "b", " "]))), max_size=12
    ),
)
def test_found_through_heads_the_same_as_one_secret_after_another(
    secrets: list[str], pieces: list[int | str]
) -> None:
    """Whatever the secrets (prefixes of each other, overlapping, with the "*" that REDACTED brings in),
    finding them through the index redacts exactly what looking for each in turn does."""
    redaction.register(*(f"{_SNOW}{n:06d}-pw" for n in range(redaction.SCAN_UP_TO + 1)), *secrets)
    assert not redaction._ordered  # the index is in use
    text = "".join(secrets[piece % len(secrets)] if isinstance(piece, int) else piece for piece in pieces)
    assert redaction.redact(text) == _scanned(text, set(redaction._known))
