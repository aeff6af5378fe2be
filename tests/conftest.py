"""Fixtures shared by every test suite: a real Dovecot, a fresh PostgreSQL database, an SQLite URL.

Missing servers make the tests fail, never skip: a green run must mean the integration tests ran.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings
from psycopg import sql

from connector import redaction
from tests.postgres import POSTGRES_ADMIN_DSN, POSTGRES_URL_BASE, TEST_POSTGRES_URL, URL_VARIABLE
from tests.servers.dovecot import Dovecot, MailUsers, fresh_users, running_for_tests
from tests.servers.ews import EwsServer
from tests.servers.pymap import Pymap, running_pymap

# HYPOTHESIS_PROFILE=deep runs every property with 10,000 examples instead of 100 (docs/reliability.md).
settings.register_profile("deep", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One Dovecot for the whole run; tests keep apart by using their own users (``mail_users``)."""
    with running_for_tests() as server:
        yield server


@pytest.fixture
def pymap() -> Iterator[Pymap]:
    """A fresh pymap (an IMAP server that does not store what it is given) for one test."""
    with running_pymap() as server:
        yield server


@pytest.fixture
def mail_users(dovecot: Dovecot) -> Iterator[MailUsers]:
    """A fresh POP3 source user and IMAP destination user, removed (with their mail) afterwards."""
    with fresh_users(dovecot) as users:
        yield users


def _admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {TEST_POSTGRES_URL} (${URL_VARIABLE}; a superuser with trust "
            "authentication expected): run the tests with scripts/test, which starts a throwaway cluster "
            f"when none answers. Driver said: {exc}",
            pytrace=False,
        )


@contextmanager
def fresh_postgres_database(prefix: str = "pop_connector_test") -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database, dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_URL_BASE + name
    finally:
        drop_postgres_database(POSTGRES_URL_BASE + name)


def drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with _admin_connection() as conn:
        # FORCE: a connection pool a test forgot to dispose must not keep the database alive.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a database created for this run and dropped at its end."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


@pytest.fixture
def ews() -> Iterator[EwsServer]:
    """A fresh EWS test server (HTTPS, its own throwaway CA in ``ews.ca_file``) for one test."""
    with EwsServer() as server:
        yield server
    # exchangelib keeps one connection pool per endpoint and login for the life of the process.
    from exchangelib.protocol import close_connections

    from connector.destinations.ews_connection import CONFIGURATIONS

    CONFIGURATIONS.clear()
    close_connections()


@pytest.fixture(autouse=True)
def _redaction_registry() -> Iterator[None]:
    """Each test redacts the secrets it registers itself, as a fresh process would: a password of one test
    must not be cut out of the expected text of another."""
    known, ordered = set(redaction._known), redaction._ordered
    by_head, short_by_head = dict(redaction._by_head), dict(redaction._short_by_head)
    starred = redaction._starred
    yield
    redaction._known.clear()
    redaction._known.update(known)
    redaction._ordered = ordered
    redaction._by_head.clear()
    redaction._by_head.update(by_head)
    redaction._short_by_head.clear()
    redaction._short_by_head.update(short_by_head)
    redaction._starred = starred
