"""``pop-connector status`` (issue 16): each account's state, the summary line, natural order, filters."""

from __future__ import annotations

import random
from typing import Any

import pytest

from connector.cli.report import (
    STATES,
    account_state,
    in_states,
    matching_accounts,
    natural_key,
    status_report,
    summary_line,
)


def _record(name: str = "a1", **fields: Any) -> dict[str, Any]:
    """A ``status_records`` record of a polled account, ok unless ``fields`` say otherwise."""
    record: dict[str, Any] = {
        "account": name,
        "configured": True,
        "last_poll": "2026-03-01T12:00:00+00:00",
        "last_success": "2026-03-01T12:00:00+00:00",
        "last_result": "ok",
        "last_error": None,
        "consecutive_failures": 0,
        "next_poll": "2026-03-01T12:05:00+00:00",
        "messages": {"delivered": 3},
        "last_worker": None,
        "suspended": False,
    }
    record.update(fields)
    return record


@pytest.mark.parametrize(
    ("fields", "enabled", "state"),
    [
        ({}, True, "ok"),
        ({"last_result": "error", "consecutive_failures": 2}, True, "backing-off"),
        # Any failed poll counts (a lost lease, a stopped poll), as `status` says BACKING OFF for them.
        ({"last_result": "lease_lost", "consecutive_failures": 1}, True, "backing-off"),
        ({"last_result": "auth_error", "consecutive_failures": 5}, True, "failing"),
        ({"suspended": True, "last_result": "auth_error", "consecutive_failures": 10}, True, "suspended"),
        ({}, False, "suspended"),  # disabled in the configuration, as on the status page
        ({"polling": {"pid": 7, "host": "h", "since": "x"}}, True, "polling"),
        # A problem wins over "polling now": the account is still failing while it is retried.
        ({"polling": {"pid": 7}, "last_result": "error", "consecutive_failures": 1}, True, "backing-off"),
        ({"last_result": "never polled"}, True, "never-polled"),
        ({"configured": False, "last_result": "auth_error"}, True, "removed"),
    ],
)
def test_each_account_is_in_one_state(fields: dict[str, Any], enabled: bool, state: str) -> None:
    assert account_state(_record(**fields), enabled=enabled) == state


def test_an_account_without_a_ledger_row_is_never_polled() -> None:
    # status_records gives a configured account the ledger does not know only these two fields.
    assert (
        account_state({"account": "new", "configured": True, "last_result": "never polled"}) == "never-polled"
    )


def test_natural_order_compares_numbers_as_numbers() -> None:
    names = ["a10", "a2", "a1", "b1", "a", "A3", "a02", "shop-9-x", "shop-10-a", "shop-9"]
    random.Random(16).shuffle(names)
    assert sorted(names, key=natural_key) == [
        "a", "a1", "a02", "a2", "A3", "a10", "b1", "shop-9", "shop-9-x", "shop-10-a",
    ]  # fmt: skip


def _stated(name: str, state: str) -> dict[str, Any]:
    return {"account": name, "configured": True, "last_result": "ok", "state": state}


def test_accounts_by_glob_in_natural_order_and_by_state() -> None:
    records = [
        _stated("shop-10", "failing"),
        _stated("shop-2", "ok"),
        _stated("home-1", "failing"),
        _stated("shop-3", "suspended"),
    ]
    assert [r["account"] for r in matching_accounts(records, [])] == ["home-1", "shop-2", "shop-3", "shop-10"]
    shops = matching_accounts(records, ["shop-*"])
    assert [r["account"] for r in shops] == ["shop-2", "shop-3", "shop-10"]
    assert [r["account"] for r in matching_accounts(records, ["shop-?", "home-*"])] == [
        "home-1",
        "shop-2",
        "shop-3",
    ]
    assert matching_accounts(records, ["SHOP-*"]) == []  # account names are case-sensitive
    assert [r["account"] for r in in_states(shops, {"failing", "suspended"})] == ["shop-3", "shop-10"]
    assert in_states(shops, set()) == shops


def test_the_summary_line_names_every_state_and_removed_only_when_there_are_some() -> None:
    records = [_stated(f"a{n}", state) for n, state in enumerate(["ok", "ok", "failing", "polling"])]
    assert summary_line(records) == (
        "4 accounts: 2 ok, 0 backing off, 1 failing auth, 0 suspended, 1 polling now, 0 never polled"
    )
    gone = [_stated("old", "removed")]
    assert summary_line(gone) == (
        "1 account: 0 ok, 0 backing off, 0 failing auth, 0 suspended, 0 polling now, 0 never polled, "
        "1 no longer configured"
    )
    assert summary_line([]).startswith("0 accounts: 0 ok,")
    assert set(STATES) >= {"ok", "backing-off", "failing", "suspended"}  # what --state takes


def test_the_report_starts_with_the_summary_and_says_how_many_are_shown() -> None:
    records = [_record("a1", state="ok"), _record("a2", state="failing", last_result="auth_error")]
    full = status_report(records, records).splitlines()
    assert full[0].startswith("2 accounts: 1 ok,") and full[1] == "a1: ok"
    narrowed = status_report(records, records[1:]).splitlines()
    assert narrowed[:3] == [summary_line(records), "1 shown", "a2: auth_error"]
    assert status_report(records, []).splitlines() == [summary_line(records), "0 shown"]
