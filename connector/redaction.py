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
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import BaseModel

REDACTED = "****"
MIN_LENGTH = 3

_lock = threading.Lock()
_known: set[str] = set()
# Longest first, so that a secret containing another is replaced whole. Replaced as a whole tuple, so
# that ``redact`` can read it without the lock.
_ordered: tuple[str, ...] = ()


def register(*secrets: str | None) -> None:
    """From now on ``redact`` replaces each of ``secrets`` (None and too short ones are ignored)."""
    global _ordered
    fresh = {secret for secret in secrets if secret is not None and len(secret) >= MIN_LENGTH}
    if fresh <= _known:
        return
    with _lock:
        _known.update(fresh)
        _ordered = tuple(sorted(_known, key=len, reverse=True))


def register_config(config: BaseModel) -> None:
    """Every secret of a configuration: each ``SecretStr`` field at any depth, and the password of any
    URL (a database URL such as ``postgresql://user:pw@host/db``)."""
    register(*secrets_in(config))


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``****``."""
    for secret in _ordered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def secrets_in(value: object) -> Iterator[str]:
    # Imported here, not at the top: the command line's parser (and so `--help`) imports this module
    # through the log set-up, and needs none of pydantic.
    from pydantic import BaseModel, SecretStr

    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from secrets_in(getattr(value, name))
    elif isinstance(value, Mapping):
        yield from _each(value.values())
    elif isinstance(value, list | tuple | set | frozenset):
        yield from _each(value)
    elif isinstance(value, str) and "://" in value and "@" in value:
        yield from _url_password(value)


def _each(values: Iterable[object]) -> Iterator[str]:
    for item in values:
        yield from secrets_in(item)


def _url_password(url: str) -> Iterator[str]:
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        return
    if password:
        yield password  # as written in the URL (percent-encoded) ...
        yield urllib.parse.unquote(password)  # ... and as a driver may quote it back
