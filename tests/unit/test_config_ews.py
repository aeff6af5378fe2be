"""EWS destinations in the configuration: fields, defaults, and errors with field paths."""

from __future__ import annotations

from pathlib import Path

import certifi
import pytest

from connector.config import EwsDestination, GmailDestination, ews_mailbox, load_config, parse_size
from tests.unit.test_config import error_of, write

EWS = """
[[destinations]]
name = "exchange"
type = "ews"
service_endpoint = "https://mail.corp.example/EWS/Exchange.asmx"
username = "CORP\\\\svc-import"
password = "secret"
impersonation = true

[[accounts]]
name = "alice"
host = "pop.example.net"
username = "alice"
password = "pw"
destination = "exchange"
mailbox = "alice@corp.example"
folder = "Inbox/Hosted"
"""


def load(tmp_path: Path, text: str) -> EwsDestination:
    destination = load_config(write(tmp_path, text)).destinations[0]
    assert isinstance(destination, EwsDestination)
    return destination


def test_defaults(tmp_path: Path) -> None:
    destination = load(tmp_path, EWS)
    assert (destination.auth, destination.max_connections, destination.tls_verify) == ("ntlm", 4, True)
    assert destination.max_message_size == 35 * 1024 * 1024
    assert destination.username == "CORP\\svc-import" and destination.version is None
    assert destination.create_batch == 10


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("impersonation = true", "bogus = 1\nimpersonation = true"), "destinations[0].bogus: unknown field"),
        (('type = "ews"', 'type = "exchange"'), "destinations[0]: unknown type 'exchange'"),
        (('type = "ews"\n', ""), "destinations[0]: type is missing"),
        (("https://mail", "http://mail"), "destinations[0].service_endpoint: must be an https:// URL"),
        (
            ('service_endpoint = "https://mail.corp.example/EWS/Exchange.asmx"\n', ""),
            "service_endpoint is required",
        ),
        (
            ('mailbox = "alice@corp.example"\n', ""),
            "accounts[0].mailbox: destination 'exchange' uses impersonation",
        ),
        (
            ('folder = "Inbox/Hosted"', 'folder = "Archive"'),
            "accounts[0].folder: an EWS destination delivers into",
        ),
        (
            ('mailbox = "alice@corp.example"', 'mailbox = "alice"'),
            "accounts[0].mailbox: 'alice' is not an SMTP address",
        ),
        (("impersonation = true", 'auth = "oauth2"\nimpersonation = true'), "needs client_id, client_secret"),
        (("impersonation = true", 'version = "Exchange2010"'), "destinations[0].version"),
        (("impersonation = true", 'max_message_size = "lots"\nimpersonation = true'), "is not a size"),
        (("impersonation = true", "create_batch = 0\nimpersonation = true"), "[0].create_batch"),
        (("impersonation = true", "create_batch = 101\nimpersonation = true"), "[0].create_batch"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in EWS
    assert expected in error_of(tmp_path, EWS.replace(old, new, 1))


def test_oauth2_and_sizes(tmp_path: Path) -> None:
    text = EWS.replace(
        "impersonation = true",
        'impersonation = true\nauth = "oauth2"\ntenant_id = "t"\nclient_id = "c"\nclient_secret = "s"\n'
        'max_message_size = "20MB"\nversion = "Exchange2019"\ncreate_batch = 100',
    )
    destination = load(tmp_path, text)
    assert destination.max_message_size == 20 * 1024 * 1024 and destination.version == "Exchange2019"
    assert destination.create_batch == 100
    text = text.replace("impersonation = true", "impersonation = false")
    assert "needs impersonation = true" in error_of(tmp_path, text)


def test_mailbox_defaults_to_an_address_login(tmp_path: Path) -> None:
    text = EWS.replace('username = "CORP\\\\svc-import"', 'username = "bob@corp.example"')
    text = text.replace("impersonation = true", "impersonation = false")
    text = text.replace('mailbox = "alice@corp.example"\n', "")
    config = load_config(write(tmp_path, text))
    destination = config.destinations[0]
    assert isinstance(destination, EwsDestination)
    assert ews_mailbox(config.accounts[0], destination) == "bob@corp.example"
    no_address = text.replace('username = "bob@corp.example"', 'username = "CORP\\\\bob"')
    assert "accounts[0].mailbox: required" in error_of(tmp_path, no_address)


def test_mailbox_is_only_for_ews(tmp_path: Path) -> None:
    imap = (
        EWS.replace('type = "ews"', 'type = "imap"\nhost = "imap.example"')
        .replace('service_endpoint = "https://mail.corp.example/EWS/Exchange.asmx"\n', "")
        .replace("impersonation = true\n", "")
    )
    assert "accounts[0].mailbox: only used with an EWS destination" in error_of(tmp_path, imap)


@pytest.mark.parametrize(
    ("value", "size"),
    [(1000, 1000), ("35MB", 35 * 1024**2), ("512 KB", 512 * 1024), ("1GB", 1024**3), ("10", 10)],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["35 megabytes", "", True, 1.5, "MB"])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_commented_example_in_config_example_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The EWS block of config.example.toml, uncommented, is a valid configuration."""
    text = (Path(__file__).parents[2] / "config.example.toml").read_text()
    start = text.index("# --- Exchange (EWS) destination")
    end = text.index("# --- end of the Exchange (EWS) example")
    lines = [line for line in text[start:end].splitlines()[3:] if not line.startswith("##")]
    uncommented = "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines)
    # A ca_file must exist and hold certificates (checked at load): certifi's bundle stands in for the CA.
    uncommented = uncommented.replace("/etc/ssl/corp-ca.pem", certifi.where())
    for name in ("EWS_PASSWORD", "CAROL_POP_PASSWORD"):
        monkeypatch.setenv(name, "x")
    destination = load(tmp_path, uncommented)
    assert destination.impersonation and destination.version == "Exchange2016"
    assert destination.username == "CORP\\svc-import" and destination.max_message_size == 35 * 1024 * 1024


def test_commented_gmail_example_in_config_example_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Gmail block of config.example.toml, uncommented, is a valid configuration."""
    text = (Path(__file__).parents[2] / "config.example.toml").read_text()
    start = text.index("# --- Gmail or Google Workspace destination")
    end = text.index("# --- end of the Gmail example")
    lines = [line for line in text[start:end].splitlines()[3:] if not line.startswith("##")]
    uncommented = "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines)
    key = tmp_path / "service-account.json"
    key.write_text('{"type": "service_account"}')
    uncommented = uncommented.replace("/etc/pop-connector/service-account.json", str(key))
    monkeypatch.setenv("DAVE_POP_PASSWORD", "x")
    config = load_config(write(tmp_path, uncommented))
    [destination] = config.destinations
    assert isinstance(destination, GmailDestination) and destination.workspace
    assert destination.labels == ["INBOX"] and destination.label_for("dave") == "Hosted/dave"
    assert config.accounts[0].mailbox == "dave@example.com"
