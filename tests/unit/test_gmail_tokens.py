"""The token file of a personal Gmail consent (connector/destinations/gmail_tokens.py): the one format that
``authorize`` writes and the Gmail destination reads, written atomically with mode 600."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from connector import redaction
from connector.destinations.gmail_tokens import (
    GMAIL_SCOPES,
    StoredToken,
    TokenFileError,
    desktop_client,
    find_token_file,
    read_token,
    rotate,
    token_file,
    token_files,
    write_token,
)


def _token(refresh: str = "tokens-test-refresh-1") -> StoredToken:
    return StoredToken(
        address="Alice@Gmail.example",
        client_id="client-1.apps.example",
        client_secret="tokens-test-client-secret-1",
        refresh_token=refresh,
        token_uri="https://127.0.0.1:9/token",
    )


def test_a_written_token_reads_back_the_same_with_mode_600(tmp_path: Path) -> None:
    path = token_file(tmp_path / "tokens", "Alice@Gmail.example")
    write_token(path, _token())
    assert path.name == "alice@gmail.example.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_token(path) == _token()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_the_file_is_google_auths_authorized_user_format(tmp_path: Path) -> None:
    path = token_file(tmp_path, "alice@gmail.example")
    write_token(path, _token())
    data = json.loads(path.read_text())
    assert data["type"] == "authorized_user"
    assert data["account"] == "Alice@Gmail.example"
    assert data["scopes"] == list(GMAIL_SCOPES)
    assert {"client_id", "client_secret", "refresh_token", "token_uri"} <= data.keys()


def test_a_token_file_replaced_by_a_more_open_one_is_written_back_with_mode_600(tmp_path: Path) -> None:
    path = token_file(tmp_path, "alice@gmail.example")
    path.write_text("{}")
    path.chmod(0o644)
    write_token(path, _token())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reading_registers_the_secrets_with_redaction(tmp_path: Path) -> None:
    path = tmp_path / "bob@gmail.example.json"
    data = _token().to_json() | {
        "client_secret": "tokens-test-secret-read-2",
        "refresh_token": "tokens-rt-read-2",
    }
    path.write_text(json.dumps(data))
    read_token(path)
    assert redaction.redact("a tokens-rt-read-2 b tokens-test-secret-read-2") == "a **** b ****"


def test_a_malformed_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "carol@gmail.example.json"
    path.write_text(json.dumps({"account": "carol@gmail.example", "refresh_token": "tokens-rt-bad-3"}))
    with pytest.raises(TokenFileError) as caught:
        read_token(path)
    assert "client_id is missing" in str(caught.value)
    assert "tokens-rt-bad-3" not in str(caught.value)
    path.write_text("not json tokens-rt-bad-4")
    with pytest.raises(TokenFileError, match="not JSON") as caught:
        read_token(path)
    assert "tokens-rt-bad-4" not in str(caught.value)


def test_rotate_writes_a_new_refresh_token_back_and_nothing_when_it_is_the_same(tmp_path: Path) -> None:
    path = token_file(tmp_path, "alice@gmail.example")
    write_token(path, _token())
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert rotate(path, _token(), "tokens-test-refresh-1") == _token()
    assert rotate(path, _token(), None) == _token()
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    rotated = rotate(path, _token(), "tokens-test-refresh-2")
    assert rotated.refresh_token == "tokens-test-refresh-2"
    assert read_token(path) == rotated
    assert redaction.redact("tokens-test-refresh-2") == "****"


def test_find_token_file_names_the_one_user_or_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="no consent given yet"):
        find_token_file(tmp_path / "missing", None)
    with pytest.raises(TokenFileError, match=r"no consent for alice@gmail\.example"):
        find_token_file(tmp_path, "alice@gmail.example")
    write_token(token_file(tmp_path, "alice@gmail.example"), _token())
    (tmp_path / ".alice@gmail.example.json.x.tmp").write_text("{}")  # an unfinished write
    assert find_token_file(tmp_path, None).name == "alice@gmail.example.json"
    assert find_token_file(tmp_path, "ALICE@gmail.example").name == "alice@gmail.example.json"
    write_token(token_file(tmp_path, "bob@gmail.example"), _token())
    assert [p.name for p in token_files(tmp_path)] == ["alice@gmail.example.json", "bob@gmail.example.json"]
    with pytest.raises(TokenFileError, match="several users"):
        find_token_file(tmp_path, None)


@pytest.mark.parametrize("address", ["../etc/passwd", ".hidden", "a/b@example", ""])
def test_an_address_cannot_name_a_file_outside_the_directory(tmp_path: Path, address: str) -> None:
    with pytest.raises(TokenFileError):
        token_file(tmp_path, address)


def test_desktop_client_reads_googles_download_and_registers_its_secret() -> None:
    text = json.dumps(
        {
            "installed": {
                "client_id": "desk.apps.example",
                "client_secret": "tokens-desktop-secret-5",
                "auth_uri": "https://127.0.0.1:1/auth",
                "token_uri": "https://127.0.0.1:1/token",
            }
        }
    )
    client = desktop_client(text)
    assert (client.client_id, client.token_uri) == ("desk.apps.example", "https://127.0.0.1:1/token")
    assert "tokens-desktop-secret-5" not in repr(client)
    assert redaction.redact("tokens-desktop-secret-5") == "****"
    with pytest.raises(TokenFileError, match="Desktop app"):
        desktop_client(json.dumps({"type": "service_account"}))
