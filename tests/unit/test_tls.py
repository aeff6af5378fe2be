"""TLS contexts are built once per setting (issue 16: building one cost an idle poll ~15 ms of CPU)."""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

import pytest

from connector import connections
from connector.config import Account
from connector.tls import shared_ssl_context
from tests.servers.dovecot import make_test_ca


def test_one_context_per_setting_shared_by_every_connection() -> None:
    first = shared_ssl_context()
    assert shared_ssl_context() is first
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    unverified = shared_ssl_context(verify=False)
    assert unverified is not first and unverified.verify_mode == ssl.CERT_NONE
    assert shared_ssl_context(verify=False) is unverified


def test_a_ca_file_is_read_again_once_it_changes(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary (as the integration tests do)")
    ca_file, _cert, _key = make_test_ca(tmp_path)
    context = shared_ssl_context(ca_file=ca_file)
    assert shared_ssl_context(ca_file=ca_file) is context
    stat = ca_file.stat()
    os.utime(ca_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert shared_ssl_context(ca_file=ca_file) is not context


def test_the_source_connection_uses_the_shared_context(monkeypatch: pytest.MonkeyPatch) -> None:
    contexts: list[ssl.SSLContext | None] = []

    def connect(*_args: object, ssl_context: ssl.SSLContext | None, **_kwargs: object) -> None:
        contexts.append(ssl_context)

    monkeypatch.setattr(connections, "connect_pop3", connect)
    account = Account.model_validate(
        {"name": "a", "host": "pop.example", "username": "u", "password": "p", "destination": "d"}
    )
    connections._connect_source(account)
    connections._connect_source(account)
    assert contexts[0] is not None and contexts[0] is contexts[1]
