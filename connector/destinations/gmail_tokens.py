"""The consent of one personal Gmail user, kept on disk: the one format that ``pop-connector authorize``
writes and the Gmail destination reads (and writes back when Google rotates the refresh token).

One file per Gmail address, ``<destination.tokens()>/<address>.json`` (the address in lower case: Gmail
addresses are case-insensitive), mode 600 in a directory of mode 700. Every write goes to a temporary file
in the same directory, is flushed to disk and then renamed over the old file, so a crash leaves either the
old token or the new one, never half of one, and a reader never sees a partly written file.

The JSON is google-auth's ``authorized_user`` format (``google.oauth2.credentials.Credentials`` fields) plus
the address the consent was given for::

    {
      "type": "authorized_user",
      "account": "alice@gmail.com",
      "client_id": "1234-abc.apps.googleusercontent.com",
      "client_secret": "...",
      "refresh_token": "...",
      "token_uri": "https://oauth2.googleapis.com/token",
      "scopes": ["https://www.googleapis.com/auth/gmail.insert", "..."]
    }

Access tokens are not kept: they last an hour and the refresh token gets a new one at start.

Every secret read or written here (client secret, refresh token) is registered with
``connector.redaction`` before anything else is done with it. Errors (``TokenFileError``) name the file and
what is wrong with it, never its content.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from connector import redaction

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
GOOGLE_AUTH_URI = "https://accounts.google.com/o/oauth2/auth"

# What the Gmail destination needs, and no more:
# * gmail.insert: users.messages.import (it can add mail, not read, change or delete any);
# * gmail.labels: list the labels and create the account's label;
# * gmail.readonly: the recovery lookup (messages.list with q=rfc822msgid:..., then messages.get of the
#   candidates' headers) and users.getProfile. gmail.metadata would read headers too, but Gmail refuses
#   the ``q`` search parameter to any token that carries gmail.metadata (even beside gmail.readonly), and
#   without a search the lookup cannot find the message: so gmail.readonly, and never gmail.metadata.
GMAIL_INSERT_SCOPE = "https://www.googleapis.com/auth/gmail.insert"
GMAIL_LABELS_SCOPE = "https://www.googleapis.com/auth/gmail.labels"
GMAIL_READONLY_SCOPE = "https://www.googleapis.com/auth/gmail.readonly"
GMAIL_SCOPES: tuple[str, ...] = (GMAIL_INSERT_SCOPE, GMAIL_LABELS_SCOPE, GMAIL_READONLY_SCOPE)

TOKEN_TYPE = "authorized_user"
_SUFFIX = ".json"
# Writers in this process (two accounts of one address rotating at once) take turns per file.
_write_locks: dict[Path, threading.Lock] = {}
_write_locks_lock = threading.Lock()


class TokenFileError(Exception):
    """A token file is missing, unreadable or not a token file (the message says which, never what is in
    it). The destination turns it into an authentication failure that names the ``authorize`` command."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class DesktopClient:
    """The OAuth client of type "Desktop app" that ``client_secrets`` holds (Google's JSON download:
    ``{"installed": {"client_id": ..., "client_secret": ..., "auth_uri": ..., "token_uri": ...}}``)."""

    client_id: str
    client_secret: str = field(repr=False)
    auth_uri: str = GOOGLE_AUTH_URI
    token_uri: str = GOOGLE_TOKEN_URI


@dataclass(frozen=True)
class StoredToken:
    """One user's consent: enough for google-auth to get access tokens without asking the user again."""

    address: str
    client_id: str
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_uri: str = GOOGLE_TOKEN_URI
    scopes: tuple[str, ...] = GMAIL_SCOPES

    def to_json(self) -> dict[str, Any]:
        return {
            "type": TOKEN_TYPE,
            "account": self.address,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "refresh_token": self.refresh_token,
            "token_uri": self.token_uri,
            "scopes": list(self.scopes),
        }

    def with_refresh_token(self, refresh_token: str) -> StoredToken:
        return replace(self, refresh_token=refresh_token)


def desktop_client(client_secrets: str) -> DesktopClient:
    """Parse the text of a ``client_secrets`` JSON (the "installed" client; a "web" one is taken too).
    Raises ``TokenFileError`` when it is not one; the client secret is registered with redaction first."""
    try:
        data = json.loads(client_secrets)
    except ValueError as exc:
        raise TokenFileError("client_secrets is not JSON (download the OAuth client's JSON again)") from exc
    inner = None
    if isinstance(data, Mapping):
        inner = data.get("installed", data.get("web"))
    if not isinstance(inner, Mapping):
        raise TokenFileError(
            'client_secrets is not the JSON of an OAuth client (expected {"installed": {...}}, as Google '
            'Cloud Console downloads it for a client of type "Desktop app")'
        )
    secret = inner.get("client_secret")
    redaction.register(secret if isinstance(secret, str) else None)
    client_id = inner.get("client_id")
    if not isinstance(client_id, str) or not client_id or not isinstance(secret, str) or not secret:
        raise TokenFileError("client_secrets lacks client_id or client_secret")
    auth_uri = inner.get("auth_uri") or GOOGLE_AUTH_URI
    token_uri = inner.get("token_uri") or GOOGLE_TOKEN_URI
    if not isinstance(auth_uri, str) or not isinstance(token_uri, str):
        raise TokenFileError("client_secrets has an auth_uri or token_uri that is not a string")
    return DesktopClient(client_id, secret, auth_uri, token_uri)


def token_file(directory: Path, address: str) -> Path:
    """Where the consent of ``address`` is kept in ``directory``."""
    name = address.strip().lower()
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise TokenFileError(f"{address!r} is not an address a token file can be named after")
    return directory / f"{name}{_SUFFIX}"


def token_files(directory: Path) -> list[Path]:
    """The token files in ``directory`` (none when it does not exist), sorted; temporary files of an
    unfinished write (their names start with ".") are not token files."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenFileError(f"cannot list {directory}: {exc.strerror or exc}", directory) from exc
    return sorted(
        p for p in entries if p.name.endswith(_SUFFIX) and not p.name.startswith(".") and p.is_file()
    )


def find_token_file(directory: Path, address: str | None) -> Path:
    """The token file of ``address``; with None, the only one there is. Raises ``TokenFileError`` when
    there is none (no consent given yet) or, for None, when there are several (say which user)."""
    if address is not None:
        path = token_file(directory, address)
        if not path.is_file():
            raise TokenFileError(f"no consent for {address} yet: {path} does not exist", path)
        return path
    found = token_files(directory)
    if not found:
        raise TokenFileError(f"no consent given yet: no token file in {directory}", directory)
    if len(found) > 1:
        names = ", ".join(path.name.removesuffix(_SUFFIX) for path in found)
        raise TokenFileError(
            f"{directory} has the consent of several users ({names}): set the account's mailbox to the one "
            "to deliver into",
            directory,
        )
    return found[0]


def read_token(path: Path) -> StoredToken:
    """The consent in ``path``; its secrets are registered with redaction before anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise TokenFileError(f"{path} does not exist", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise TokenFileError(f"cannot read {path}: {reason}", path) from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TokenFileError(f"{path} is not JSON", path) from exc
    if not isinstance(data, Mapping):
        raise TokenFileError(f"{path} is not a token file (not a JSON object)", path)
    # First thing: whatever happens next, these never reach a log line or an error text.
    redaction.register(*(data.get(key) for key in ("client_secret", "refresh_token", "token")))
    values: dict[str, str] = {}
    for key in ("account", "client_id", "client_secret", "refresh_token"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise TokenFileError(f"{path} is not a token file: {key} is missing", path)
        values[key] = value
    token_uri = data.get("token_uri", GOOGLE_TOKEN_URI)
    scopes = data.get("scopes", list(GMAIL_SCOPES))
    if isinstance(scopes, str):
        scopes = scopes.split()
    if (
        not isinstance(token_uri, str)
        or not isinstance(scopes, list)
        or not all(isinstance(s, str) for s in scopes)
    ):
        raise TokenFileError(f"{path} is not a token file: token_uri or scopes is malformed", path)
    return StoredToken(
        address=values["account"],
        client_id=values["client_id"],
        client_secret=values["client_secret"],
        refresh_token=values["refresh_token"],
        token_uri=token_uri,
        scopes=tuple(scopes),
    )


def write_token(path: Path, token: StoredToken) -> None:
    """Write ``token`` to ``path`` atomically, mode 600 (its directory made with mode 700 if missing)."""
    redaction.register(token.client_secret, token.refresh_token)
    text = json.dumps(token.to_json(), indent=2) + "\n"
    with _lock_for(path):
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _replace_atomically(path, text.encode("utf-8"))
        except OSError as exc:
            raise TokenFileError(f"cannot write {path}: {exc.strerror or type(exc).__name__}", path) from exc


def rotate(path: Path, token: StoredToken, refresh_token: str | None) -> StoredToken:
    """After a refresh: when the token endpoint gave a new refresh token (Google may rotate it), write it
    back to ``path`` so that a restart does not need a new consent. Returns the token now kept."""
    if refresh_token is None or refresh_token == token.refresh_token:
        return token
    rotated = token.with_refresh_token(refresh_token)
    write_token(path, rotated)
    return rotated


def _lock_for(path: Path) -> threading.Lock:
    with _write_locks_lock:
        return _write_locks.setdefault(path.absolute(), threading.Lock())


def _replace_atomically(path: Path, data: bytes) -> None:
    # mkstemp creates the file with mode 600 itself: the secret never sits in a more open file.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (where the platform lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
