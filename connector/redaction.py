"""The secrets this process knows, and the one function that cuts them out of text before it is kept.

Every place that writes text a person or a file keeps (the log formatters of ``connector.ops.logs``, the
protocol logs, POP3 error texts that end up in the ledger and on the status page) passes it through
``redact``. The registry is fed where secrets come into being, not where they are used:

* the configuration loader (``connector.config.parse_config``): every secret of every configuration it
  returns, at start and after each reload (``register_config``);
* the OAuth token cache (``connector.oauth``): each access token and rotated refresh token as soon as it is
  obtained, and the base64 XOAUTH2 response built from a token.

Nothing is ever removed: a secret of an earlier configuration, or an expired token, is harmless to keep
and a line about it may still be written late. Secrets shorter than ``MIN_LENGTH`` are not registered:
blindly replacing two characters would garble every line and hide nothing.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import BaseModel, SecretStr

REDACTED = "****"
MIN_LENGTH = 3

_lock = threading.Lock()
_known: set[str] = set()
# While they are few: every secret, longest first, so that a secret containing another is replaced whole.
# Replaced as a whole tuple, so that ``redact`` can read it without the lock.
_ordered: tuple[str, ...] = ()
# Above this many, ``redact`` finds secrets through ``_by_head`` instead of looking for each in turn: a scan
# costs ~50 ns per secret and line, so 100,000 accounts' passwords made every log line cost 16 ms.
SCAN_UP_TO = 128
# Every secret under its first HEAD characters (shorter ones under their first MIN_LENGTH, apart): a text is
# looked up once per position, so the work per line grows with its length, not with the number of secrets.
# Eight characters, as many secrets share their first three (100,000 passwords of one pattern made a line
# with that prefix try each). Each entry is replaced whole.
HEAD = 8
_by_head: dict[str, tuple[str, ...]] = {}
_short_by_head: dict[str, tuple[str, ...]] = {}
# Secrets with a "*" in them: replacing another secret by REDACTED may make one of these appear, so they
# are looked for after the replacements, as a scan would.
_starred: tuple[str, ...] = ()


def longest_first(secret: str) -> tuple[int, str]:
    """The order secrets are replaced in: longest first; secrets of one length in a fixed order, so that
    two that overlap in a line are always resolved alike."""
    return -len(secret), secret


def register(*secrets: str | None) -> None:
    """From now on ``redact`` replaces each of ``secrets`` (None and too short ones are ignored)."""
    global _ordered, _starred
    fresh = {secret for secret in secrets if secret is not None and len(secret) >= MIN_LENGTH}
    if fresh <= _known:
        return
    with _lock:
        fresh -= _known
        _known.update(fresh)
        # Grouped first: one new tuple per head, not one per secret (100,000 of a head would be quadratic).
        added: dict[tuple[int, str], list[str]] = {}
        for secret in fresh:
            width = HEAD if len(secret) >= HEAD else MIN_LENGTH
            added.setdefault((width, secret[:width]), []).append(secret)
        for (width, head), secrets_of_head in added.items():
            table = _by_head if width == HEAD else _short_by_head
            table[head] = (*table.get(head, ()), *secrets_of_head)
        _starred = (*_starred, *(secret for secret in fresh if "*" in secret))
        _ordered = tuple(sorted(_known, key=longest_first)) if len(_known) <= SCAN_UP_TO else ()


def register_config(config: BaseModel) -> None:
    """Every secret of a configuration: each ``SecretStr`` field at any depth, and the password of any
    URL (a database URL such as ``postgresql://user:pw@host/db``)."""
    register(*secrets_in(config))


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``****``: each secret in turn, longest first, so
    that a secret containing another is replaced whole."""
    ordered = _ordered
    if not ordered:
        if not _known:
            return text
        ordered = tuple(sorted(_in(text), key=longest_first))
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _in(text: str) -> set[str]:
    """Every registered secret that is in ``text`` (and those with a "*", see ``_starred``), found through
    the indexes of heads: what ``redact`` would replace if it looked for every secret in turn."""
    found = set(_starred)
    for table, width in ((_by_head, HEAD), (_short_by_head, MIN_LENGTH)):
        if not table:
            continue
        for start in range(len(text) - width + 1):
            candidates = table.get(text[start : start + width])
            if candidates:
                found.update(secret for secret in candidates if text.startswith(secret, start))
    return found


def secrets_in(value: object) -> list[str]:
    # Imported here, not at the top: the command line's parser (and so `--help`) imports this module
    # through the log set-up, and needs none of pydantic. Imported once per walk, not once per value: a
    # configuration of 100,000 accounts has millions of values.
    from pydantic import BaseModel, SecretStr

    return _secrets(value, BaseModel, SecretStr)


# Values that never hold a secret, tested by exact type before anything slower (most fields are these).
_PLAIN = frozenset({type(None), bool, int, float, timedelta})


def _secrets(root: object, model: type[BaseModel], secret: type[SecretStr]) -> list[str]:
    # A loop over a stack, not a recursive generator: 100,000 accounts are 4 million values, and a
    # generator frame per value was most of loading such a configuration (docs/scaling.md).
    found: list[str] = []
    stack = [root]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in _PLAIN:
            continue
        if isinstance(value, str):
            if "://" in value and "@" in value:
                found.extend(_url_password(value))
        elif isinstance(value, secret):
            found.append(value.get_secret_value())
        elif isinstance(value, model):
            stack.extend(getattr(value, name) for name in type(value).model_fields)
        elif isinstance(value, list | tuple | set | frozenset):
            stack.extend(value)
        elif isinstance(value, Mapping):  # an ABC: the slowest test, last
            stack.extend(value.values())
    return found


def _url_password(url: str) -> Iterator[str]:
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        return
    if password:
        yield password  # as written in the URL (percent-encoded) ...
        yield urllib.parse.unquote(password)  # ... and as a driver may quote it back
