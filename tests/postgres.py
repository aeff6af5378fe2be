"""Which PostgreSQL the tests use: ``POP_CONNECTOR_TEST_POSTGRES_URL``, a libpq URL of its ``postgres``
database as a superuser (default ``postgresql://postgres@127.0.0.1:5432/postgres``, trust authentication).

``scripts/test`` sets it when it runs a throwaway cluster of its own; every test that creates a database
(``tests/conftest.py``, ``tests/distributed_setup.py``) reads it from here.
"""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import URL

URL_VARIABLE = "POP_CONNECTOR_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_dsn(url: str) -> str:
    """The libpq connection string of ``url``'s database, with a timeout: a server that does not answer
    must fail the test, not hang it."""
    return make_conninfo(url, connect_timeout=5)


def sqlalchemy_url_base(url: str) -> str:
    """The SQLAlchemy URL of the same server and user, without a database: append a database's name."""
    parts = conninfo_to_dict(url)
    port = parts.get("port")
    base = URL.create(
        "postgresql+psycopg",
        username=str(parts.get("user") or "postgres"),
        password=str(parts["password"]) if parts.get("password") else None,
        host=str(parts.get("host") or "127.0.0.1"),
        port=int(str(port)) if port else None,
    )
    return base.render_as_string(hide_password=False) + "/"


TEST_POSTGRES_URL = os.environ.get(URL_VARIABLE) or DEFAULT_URL
POSTGRES_ADMIN_DSN = admin_dsn(TEST_POSTGRES_URL)
POSTGRES_URL_BASE = sqlalchemy_url_base(TEST_POSTGRES_URL)
