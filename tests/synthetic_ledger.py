"""A ledger with many accounts in every state and a month of journaled deliveries, for the status page's
tests (tests/unit/test_status_page.py, tests/acceptance/test_status_page.py).

Written with bulk inserts straight into the tables (a thousand accounts and their month take a second or
two), not by polling. Every account was polled in the last 50 minutes and its next poll is an hour after
that (``poll_interval = "1h"``), so a `run` started on it polls nothing for ten minutes and the page stays
as written. Some values are hostile (an account name, an error, a Message-ID that are
markup): the page must show them as text. The configuration only takes plain account names, so the
hostile one is an account the ledger still has and the configuration no longer names (as an older
version's ledger may).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert

from connector.ledger.models import AccountRow, AccountTotalsRow, DeliveryRow, MessageRow

HOSTILE_NAME = "<img src=x onerror=alert(1)>/&'\"retired"
HOSTILE_ERROR = "POP3 server said: <script>alert('error')</script> & gave up"
HOSTILE_MESSAGE_ID = '<"><script>alert(2)</script>@attacker.example>'
LOGIN_DELAY_ERROR = "pop.example.org:995: -ERR [LOGIN-DELAY] wait 15 minutes between logins"
REMOVED = HOSTILE_NAME  # in the ledger, not in the configuration


def account_names(count: int) -> list[str]:
    """``user1`` ... (not zero-padded: the page sorts them naturally)."""
    return [f"user{n}" for n in range(1, count + 1)]


def expected_state(name: str) -> str:
    """The state the page shows for an account of ``fill``."""
    if name == REMOVED:
        return "removed"
    n = int(name.removeprefix("user"))
    if n == 7:
        return "backing off"  # LOGIN-DELAY
    for modulus, remainder, state in _STATES:
        if n % modulus == remainder:
            return state
    return "ok"


_STATES = ((50, 2, "auth failing"), (40, 3, "suspended"), (25, 4, "waiting"), (20, 1, "backing off"))


@dataclass
class Synthetic:
    """What ``fill`` wrote, for the tests to compare with."""

    names: list[str]
    delivered: dict[str, int] = field(default_factory=dict)
    per_day: dict[str, dict[str, int]] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)


def fill(engine: Engine, names: Sequence[str], now: datetime, *, seed: int = 15) -> Synthetic:
    """Accounts ``names`` (plus ``REMOVED``) with their states, totals, a month of deliveries and some
    quarantined messages."""
    rng = random.Random(seed)
    everyone = [*names, REMOVED]
    accounts = [_account_row(n, name, now, rng) for n, name in enumerate(everyone, start=1)]
    synthetic = Synthetic(list(names))
    deliveries: list[dict[str, Any]] = []
    totals: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for account_id, name in enumerate(everyone, start=1):
        if expected_state(name) == "waiting":
            continue
        archived = rng.randrange(0, 3000)
        quarantined = account_id % 97 == 0 or name in (HOSTILE_NAME, "user7")
        totals.append(
            {
                "account_id": account_id, "messages": archived, "bytes": archived * 40_000, "recovered": 0,
                "first_delivery_at": now - timedelta(days=200), "last_delivery_at": now - timedelta(days=31),
                "quarantined": int(quarantined), "failed_polls": rng.randrange(10, 15),
            }
        )  # fmt: skip
        count = 0
        for days_ago in reversed(range(30)):  # in the order they were delivered, as the ids are
            for k in range(rng.randrange(0, 4) if rng.random() < 0.8 else 0):
                # Early in its UTC day (never later than now): each falls on the day it is counted for.
                midnight = (now - timedelta(days=days_ago)).replace(hour=0, minute=0, second=0, microsecond=0)
                at = min(midnight + timedelta(minutes=k * 7 + 1), now)
                day = at.date().isoformat()
                synthetic.per_day.setdefault(name, {})[day] = synthetic.per_day.get(name, {}).get(day, 0) + 1
                message_id = (
                    HOSTILE_MESSAGE_ID if name == HOSTILE_NAME else f"<{days_ago}.{k}@{account_id}.example>"
                )
                deliveries.append(
                    {
                        "account_id": account_id, "uidl": f"UID-{days_ago}-{k}", "message_id": message_id,
                        "size": rng.randrange(2_000, 200_000), "sha256": "0" * 64,
                        "destination_ref": f"imap:INBOX:{account_id}:{days_ago * 10 + k}", "recipient": None,
                        "delivered_at": at, "poll_started_at": at - timedelta(seconds=5), "recovered": False,
                    }
                )  # fmt: skip
                count += 1
        synthetic.delivered[name] = archived + count
        if quarantined:
            error = HOSTILE_ERROR if name == HOSTILE_NAME else "destination refused: message too large"
            messages.append(
                {
                    "account_id": account_id, "uidl": f"Q-{account_id}", "state": "failed", "pop_size": 5000,
                    "size": 5100, "message_id": HOSTILE_MESSAGE_ID if name == HOSTILE_NAME else None,
                    "attempts": 3, "last_error": error, "first_seen_at": now - timedelta(days=2),
                    "updated_at": now - timedelta(hours=3),
                }
            )  # fmt: skip
            synthetic.quarantined[name] = 1
    with engine.begin() as connection:
        connection.execute(insert(AccountRow), accounts)
        connection.execute(insert(AccountTotalsRow), totals)
        if deliveries:
            connection.execute(insert(DeliveryRow), deliveries)
        if messages:
            connection.execute(insert(MessageRow), messages)
    return synthetic


def _account_row(account_id: int, name: str, now: datetime, rng: random.Random) -> dict[str, Any]:
    state = expected_state(name)
    # Polled in the last hour, next in the coming one (poll_interval = 1h): nothing is due while a test runs.
    finished = now - timedelta(minutes=rng.randrange(1, 50), seconds=rng.randrange(0, 60))
    row: dict[str, Any] = {
        "id": account_id, "name": name, "created_at": now - timedelta(days=200),
        "last_poll_started_at": finished - timedelta(seconds=3), "last_poll_finished_at": finished,
        "last_success_at": finished, "last_result": "ok", "last_error": None, "consecutive_failures": 0,
        "next_poll_at": finished + timedelta(hours=1),
        "last_delivered": rng.randrange(0, 20), "last_failed": 0, "last_deleted": 0, "last_listed": 0,
        # Every row has every key: an executemany takes its columns from the first row.
        "suspended_at": None, "suspended_reason": None,
    }  # fmt: skip
    if state == "waiting":
        row.update(
            last_poll_started_at=None, last_poll_finished_at=None, last_success_at=None, last_result=None
        )
    elif state == "backing off":
        error = LOGIN_DELAY_ERROR if name == "user7" else "pop.example.org:995: connection timed out"
        row.update(last_result="error", last_error=error, consecutive_failures=3,
                   last_success_at=finished - timedelta(days=1))  # fmt: skip
    elif state == "auth failing":
        row.update(last_result="auth_error", last_error="pop.example.org:995: -ERR [AUTH] invalid login",
                   consecutive_failures=4, last_success_at=None)  # fmt: skip
    elif state == "removed":
        row.update(last_result="error", last_error=HOSTILE_ERROR, consecutive_failures=1)
    elif state == "suspended":
        row.update(last_result="error", last_error="connection refused", consecutive_failures=10,
                   suspended_at=finished, suspended_reason="10 consecutive failed polls")  # fmt: skip
    return row


def config_toml(names: Sequence[str], database: str, service: dict[str, Any]) -> str:
    """A configuration of these accounts on servers that are never reached (nothing is polled)."""
    value = json.dumps  # a JSON string is a TOML basic string
    lines = ["[service]", f"database = {value(database)}"]
    lines += [f"{key} = {value(item)}" for key, item in service.items()]
    lines += ["", "[defaults]", 'poll_interval = "1h"', "poll_jitter = 0"]
    lines += ["", "[[destinations]]", 'name = "exchange-imap"', 'type = "imap"', 'host = "127.0.0.1"',
              "port = 9", 'username = "import"', 'password = "not-used-9a"']  # fmt: skip
    server = ['host = "127.0.0.1"', "port = 9", 'tls = "none"', 'username = "u"', 'password = "not-used-9a"']
    for name in names:
        lines += ["", "[[accounts]]", f"name = {value(name)}", *server, 'destination = "exchange-imap"']
    return "\n".join(lines) + "\n"
