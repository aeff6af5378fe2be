"""Fixtures shared by every test suite: a real Dovecot, a fresh PostgreSQL database, an SQLite URL.

Missing servers make the tests fail, never skip: a green run must mean the integration tests ran.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings
from psycopg import sql

from tests.servers.dovecot import Dovecot, DovecotError, MailUsers

# HYPOTHESIS_PROFILE=deep runs every property with 10,000 examples instead of 100 (docs/reliability.md).
settings.register_profile("deep", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

POSTGRES_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
POSTGRES_URL_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/"


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One Dovecot for the whole run; tests keep apart by using their own users (``mail_users``)."""
    try:
        server = Dovecot()
    except DovecotError as exc:
        pytest.fail(f"cannot run the Dovecot test server: {exc}", pytrace=False)
    try:
        server.start()
    except DovecotError as exc:
        server.stop()
        pytest.fail(f"cannot run the Dovecot test server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mail_users(dovecot: Dovecot) -> Iterator[MailUsers]:
    """A fresh POP3 source user and IMAP destination user, removed (with their mail) afterwards."""
    users = MailUsers(source=dovecot.new_user("src"), destination=dovecot.new_user("dst"))
    try:
        yield users
    finally:
        dovecot.remove_user(users.source.name)
        dovecot.remove_user(users.destination.name)


def _admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            "PostgreSQL is not reachable at 127.0.0.1:5432 as user postgres (trust auth expected); start it "
            "with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`. "
            f"Driver said: {exc}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a database created for this run and dropped at its end."""
    name = f"pop_connector_test_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_URL_BASE + name
    finally:
        with _admin_connection() as conn:
            # FORCE: a connection pool a test forgot to dispose must not keep the database alive.
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
