"""Configuration: parsing, inheritance from [defaults], secrets, and error messages with field paths."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from connector.config import load_config, parse_duration, resolve_database_url
from connector.errors import ConfigError

BASE = """
[[destinations]]
name = "local"
type = "imap"
host = "127.0.0.1"
username = "archive"
password = "secret"

[[accounts]]
name = "alice"
host = "pop.example.net"
username = "alice"
password = "pw"
destination = "local"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), (45, 45), ("250ms", 0.25)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5 minutes", "m5", "-3s", "1x", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    account = config.accounts[0]
    assert account.poll_interval == timedelta(minutes=5)
    assert account.retention.mode == "delete"
    assert account.retry.max_attempts == 5
    assert account.tls == "implicit" and account.tls_verify is True
    assert account.effective_port == 995
    assert config.destinations[0].effective_port == 993
    assert account.folder == "INBOX"
    assert config.service.database is not None and config.service.database.startswith("sqlite:///")


def test_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    text = (
        '[defaults]\npoll_interval = "30s"\nretry = { max_attempts = 3, max_backoff = "2h" }\n'
        'retention = { mode = "days", days = 14 }\nfolder = "Imported/Hosted"\n'
        + BASE
        + 'retry = { initial_backoff = "2m" }\nretention = "keep"\n'
    )
    account = load_config(write(tmp_path, text)).accounts[0]
    assert account.poll_interval == timedelta(seconds=30)
    assert account.retry.max_attempts == 3  # partial retry tables inherit the rest
    assert account.retry.initial_backoff == timedelta(minutes=2)
    assert account.retry.max_backoff == timedelta(hours=2)
    assert account.retention.mode == "keep" and account.retention.days is None
    assert account.folder == "Imported/Hosted"


def test_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALICE_PW", "from-env")
    secret_file = tmp_path / "imap.secret"
    secret_file.write_text("from-file\n")
    text = BASE.replace('password = "pw"', 'password = { env = "ALICE_PW" }').replace(
        'password = "secret"', f'password = {{ file = "{secret_file}" }}'
    )
    config = load_config(write(tmp_path, text))
    assert config.accounts[0].password.get_secret_value() == "from-env"
    assert config.destinations[0].password is not None
    assert config.destinations[0].password.get_secret_value() == "from-file"
    assert "from-env" not in repr(config)


def test_missing_env_secret_names_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    text = BASE.replace('password = "pw"', 'password = { env = "NOT_SET_ANYWHERE" }')
    message = error_of(tmp_path, text)
    assert "accounts[0].password: environment variable NOT_SET_ANYWHERE is not set" in message
    assert str(tmp_path / "config.toml") in message


def test_missing_secret_file(tmp_path: Path) -> None:
    text = BASE.replace('password = "pw"', 'password = { file = "/nonexistent/secret" }')
    assert "accounts[0].password: cannot read secret file /nonexistent/secret" in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('retention = { mode = "days" }', 'accounts[0].retention: mode "days" needs days = N'),
        (
            'retention = { mode = "days", days = 0 }',
            "accounts[0].retention.days: Input should be greater than 0",
        ),
        (
            'retention = { mode = "keep", days = 3 }',
            'accounts[0].retention: days is only used with mode = "days"',
        ),
        ('tls = "ssl"', "accounts[0].tls: Input should be 'implicit', 'starttls' or 'none'"),
        ("port = 0", "accounts[0].port: Input should be greater than or equal to 1"),
        ('poll_interval = "soon"', "accounts[0].poll_interval: 'soon' is not a duration"),
        ("colour = 1", "accounts[0].colour: unknown field (check the spelling)"),
        (
            "retry = { max_attempts = 0 }",
            "accounts[0].retry.max_attempts: Input should be greater than or equal to 1",
        ),
        (
            'retry = { initial_backoff = "2h", max_backoff = "1h" }',
            "accounts[0].retry: max_backoff must not be shorter than initial_backoff",
        ),
        (
            'destination_username = "x"',
            "accounts[0]: destination_username and destination_password go together",
        ),
    ],
)
def test_account_errors_name_the_field(tmp_path: Path, extra: str, expected: str) -> None:
    assert expected in error_of(tmp_path, BASE + extra + "\n")


def test_missing_required_field(tmp_path: Path) -> None:
    assert "accounts[0].username: required field is missing" in error_of(
        tmp_path, BASE.replace('username = "alice"\n', "")
    )


def test_unknown_destination(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE.replace('destination = "local"', 'destination = "nowhere"'))
    assert "accounts[0].destination: unknown destination 'nowhere' (known: local)" in message


def test_duplicate_account_names(tmp_path: Path) -> None:
    second = BASE[BASE.index("[[accounts]]") :]
    assert "accounts[1].name: duplicate name 'alice'" in error_of(tmp_path, BASE + second)


def test_bad_default_reported_once_under_defaults(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[defaults]\npoll_interval = "0s"\n' + BASE)
    assert len(message.splitlines()) == 1
    assert "defaults.poll_interval: poll_interval must be at least 1s" in message


def test_destination_without_username_needs_account_login(tmp_path: Path) -> None:
    text = BASE.replace('username = "archive"\npassword = "secret"\n', "")
    assert "destination 'local' has no username" in error_of(tmp_path, text)
    text += 'destination_username = "alice@corp"\ndestination_password = "x"\n'
    assert load_config(write(tmp_path, text)).accounts[0].destination_username == "alice@corp"


def test_toml_syntax_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "this is not toml\n")
    assert "TOML syntax error" in message and "line" in message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.toml")


def test_relative_sqlite_is_relative_to_config(tmp_path: Path) -> None:
    assert resolve_database_url("sqlite:///state.db", tmp_path) == f"sqlite:///{tmp_path / 'state.db'}"
    assert resolve_database_url("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert resolve_database_url("postgresql+psycopg://h/db", tmp_path) == "postgresql+psycopg://h/db"


def test_default_database_in_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert resolve_database_url(None, Path("/etc")) == f"sqlite:///{tmp_path / 'state' / 'state.db'}"


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IMAP_PASSWORD", "ALICE_POP_PASSWORD", "BOB_POP_PASSWORD", "BOB_IMAP_PASSWORD"):
        monkeypatch.setenv(name, "x")
    for name in ("EXO_CLIENT_SECRET", "CAROL_POP_PASSWORD"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("CATCHALL_POP_PASSWORD", "x")  # the catch-all routing example
    config = load_config(Path(__file__).parents[2] / "config.example.toml")
    assert config.accounts
