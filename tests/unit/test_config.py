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


ACCOUNTS = BASE[BASE.index("[[accounts]]") :]

# Each broken configuration and the exact error it gives (after "<file>: "), one line per problem.
BROKEN_CONFIGS = {
    "days-without-days": (
        BASE + 'retention = { mode = "days" }',
        'accounts[0].retention: mode "days" needs days = N',
    ),
    "days-zero": (
        BASE + 'retention = { mode = "days", days = 0 }',
        "accounts[0].retention.days: Input should be greater than 0",
    ),
    "days-with-keep": (
        BASE + 'retention = { mode = "keep", days = 3 }',
        'accounts[0].retention: days is only used with mode = "days", not "keep"',
    ),
    "unknown-retention-mode": (
        BASE + 'retention = "forever"',
        "accounts[0].retention.mode: Input should be 'delete', 'keep' or 'days'",
    ),
    "tls-ssl": (BASE + 'tls = "ssl"', "accounts[0].tls: Input should be 'implicit', 'starttls' or 'none'"),
    "port-zero": (BASE + "port = 0", "accounts[0].port: Input should be greater than or equal to 1"),
    "duration-word": (
        BASE + 'poll_interval = "soon"',
        "accounts[0].poll_interval: 'soon' is not a duration; write e.g. '30s', '5m', '1h' or '1h30m'",
    ),
    "negative-duration": (
        BASE + 'retry = { initial_backoff = "-5s" }',
        "accounts[0].retry.initial_backoff: '-5s' is not a duration; write e.g. '30s', '5m', '1h' or '1h30m'",
    ),
    "poll-interval-under-1s": (
        BASE + 'poll_interval = "500ms"',
        "accounts[0].poll_interval: poll_interval must be at least 1s",
    ),
    "timeout-zero": (BASE + 'timeout = "0s"', "accounts[0].timeout: timeout must be positive"),
    "timeout-overflow": (BASE + "timeout = 1e30", "accounts[0].timeout: 1e+30 is too long for a duration"),
    "unknown-field": (BASE + "colour = 1", "accounts[0].colour: unknown field (check the spelling)"),
    "max-attempts-zero": (
        BASE + "retry = { max_attempts = 0 }",
        "accounts[0].retry.max_attempts: Input should be greater than or equal to 1",
    ),
    "backoffs-reversed": (
        BASE + 'retry = { initial_backoff = "2h", max_backoff = "1h" }',
        "accounts[0].retry: max_backoff must not be shorter than initial_backoff",
    ),
    "destination-username-alone": (
        BASE + 'destination_username = "x"',
        "accounts[0]: destination_username and destination_password go together",
    ),
    "empty-account-name": (
        BASE.replace('\nname = "alice"', '\nname = ""'),
        "accounts[0].name: String should have at least 1 character",
    ),
    "jitter-over-1": (
        BASE + "poll_jitter = 2",
        "accounts[0].poll_jitter: Input should be less than or equal to 1",
    ),
    "tls-verify-word": (
        BASE + 'tls_verify = "maybe"',
        "accounts[0].tls_verify: Input should be a valid boolean, unable to interpret input",
    ),
    "password-number": (
        BASE.replace('password = "pw"', "password = 5"),
        'accounts[0].password: expected a string, { env = "NAME" } or { file = "/path" }',
    ),
    "password-unknown-source": (
        BASE.replace('password = "pw"', 'password = { vault = "x" }'),
        'accounts[0].password: expected a string, { env = "NAME" } or { file = "/path" }',
    ),
    "account-name-with-space": (
        BASE.replace('\nname = "alice"', '\nname = "bad name!"'),
        "accounts[0].name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._@+-]*$'",
    ),
    "missing-username": (
        BASE.replace('username = "alice"\n', ""),
        "accounts[0].username: required field is missing",
    ),
    "unknown-destination": (
        BASE.replace('destination = "local"', 'destination = "nowhere"'),
        "accounts[0].destination: unknown destination 'nowhere' (known: local)",
    ),
    "duplicate-account": (BASE + ACCOUNTS, "accounts[1].name: duplicate name 'alice'"),
    "destination-port-70000": (
        BASE.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = 70000'),
        "destinations[0].port: Input should be less than or equal to 65535",
    ),
    "destination-without-host": (
        BASE.replace('host = "127.0.0.1"\n', ""),
        "destinations[0].host: required field is missing",
    ),
    "destination-user-without-password": (
        BASE.replace('password = "secret"\n', ""),
        "destinations[0]: username is set but password is missing",
    ),
    "max-workers-zero": (
        "[service]\nmax_workers = 0\n" + BASE,
        "service.max_workers: Input should be greater than or equal to 1",
    ),
    "unknown-service-field": (
        "[service]\nthreads = 4\n" + BASE,
        "service.threads: unknown field (check the spelling)",
    ),
    "unknown-section": ("[logging]\nlevel = 1\n" + BASE, "logging: unknown field (check the spelling)"),
    "bad-default-reported-once": (
        '[defaults]\npoll_interval = "0s"\n' + BASE,
        "defaults.poll_interval: poll_interval must be at least 1s",
    ),
    "two-problems-two-lines": (
        BASE + 'port = 0\ntls = "ssl"',
        "accounts[0].port: Input should be greater than or equal to 1\n"
        "accounts[0].tls: Input should be 'implicit', 'starttls' or 'none'",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN_CONFIGS))
def test_broken_config_gives_its_exact_error(tmp_path: Path, name: str) -> None:
    text, expected = BROKEN_CONFIGS[name]
    path = tmp_path / "config.toml"
    prefix = f"{path.resolve()}: "
    assert error_of(tmp_path, text + "\n") == "\n".join(prefix + line for line in expected.split("\n"))


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
    for name in ("CATCHALL_POP_PASSWORD", "IMAP_MASTER_PASSWORD"):  # the catch-all routing example
        monkeypatch.setenv(name, "x")
    config = load_config(Path(__file__).parents[2] / "config.example.toml")
    assert config.accounts
