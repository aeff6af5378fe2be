"""The status page's history query (``Journal.per_day_of``) on SQLite and PostgreSQL: deliveries are
counted per UTC day whatever the database session's time zone, one grouped query for many accounts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, insert

from connector.ledger.database import open_database
from connector.ledger.models import DeliveryRow
from connector.ledger.store import Ledger
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.integration

# 01:30 UTC is still the day before in New York (the PostgreSQL session's zone below): a day taken in the
# session's zone instead of UTC would move these deliveries.
EARLY = datetime(2026, 3, 10, 1, 30, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = open_database(f"sqlite:///{tmp_path_factory.mktemp('history') / 'ledger.sqlite3'}")
        yield engine
        engine.dispose()
        return
    with fresh_postgres_database("pop_connector_history") as url:
        # A session zone far from UTC (libpq's options), as a server configured for local time has.
        engine = open_database(url + "?options=-c%20timezone%3DAmerica/New_York")
        yield engine
        engine.dispose()


def test_deliveries_per_utc_day_of_several_accounts(engine: Engine) -> None:
    ledger = Ledger(engine)
    alice, bob = ledger.account_id("alice"), ledger.account_id("bob")
    ledger.account_id("carol")  # never delivered: left out
    times = [
        (alice, EARLY),
        (alice, EARLY - timedelta(hours=1)),
        (alice, EARLY - timedelta(days=1)),
        (alice, EARLY - timedelta(days=40)),  # before ``since``
        (bob, EARLY.astimezone(ZoneInfo("Europe/Berlin"))),  # the same instant, another zone
    ]
    rows = [
        {"account_id": account, "uidl": f"U{n}", "message_id": None, "size": 10, "sha256": "0" * 64,
         "destination_ref": "imap:1", "recipient": None, "delivered_at": at, "poll_started_at": None,
         "recovered": False}
        for n, (account, at) in enumerate(times)
    ]  # fmt: skip
    with engine.begin() as connection:
        connection.execute(insert(DeliveryRow), rows)

    since = EARLY - timedelta(days=29)
    assert ledger.journal.per_day_of(["alice", "bob", "carol", "nobody"], since) == {
        "alice": {"2026-03-09": 1, "2026-03-10": 2},
        "bob": {"2026-03-10": 1},
    }
    assert ledger.journal.per_day("alice", since) == {"2026-03-09": 1, "2026-03-10": 2}
    assert ledger.journal.per_day_of([], since) == {}
