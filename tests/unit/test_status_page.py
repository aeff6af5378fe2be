"""The status page with history (connector/ops/status_page.py, charts.py, web.py): the table's sorting,
filtering and paging, the account page, the charts, why the next poll is when it is, and hostile values
staying text. On a synthetic ledger of a thousand accounts (tests/synthetic_ledger.py) in SQLite."""

from __future__ import annotations

import json
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from connector.cli.report import natural_key
from connector.config import Config, parse_config
from connector.ledger.database import open_database
from connector.ledger.records import JournalEntry, QuarantinedMessage
from connector.ledger.store import Ledger
from connector.ops.charts import bar_chart, day_series, sparkline
from connector.ops.health import HealthMonitor
from connector.ops.metrics import PollMetrics
from connector.ops.status_page import (
    AccountDetail,
    View,
    render_account_page,
    render_status_page,
    select_page,
)
from connector.ops.web import Operations, OpsServer, history_since, next_poll_reason
from tests.synthetic_ledger import (
    HOSTILE_ERROR,
    HOSTILE_MESSAGE_ID,
    HOSTILE_NAME,
    LOGIN_DELAY_ERROR,
    Synthetic,
    account_names,
    config_toml,
    expected_state,
    fill,
)

NOW = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)
TOKEN = "unit-token-5be1"


# --- a parsed page -------------------------------------------------------------------------------------


class Parsed(HTMLParser):
    """The elements and attributes of a page, to check that nothing in it is markup it did not write."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.links: list[str] = []
        self.forms: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)
        self.links += [value or "" for name, value in attrs if name == "href"]
        self.forms += [value or "" for name, value in attrs if name == "action"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Parsed:
    parsed = Parsed()
    parsed.feed(page)
    parsed.close()
    return parsed


ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "div", "span", "a", "b",
    "br", "table", "thead", "tbody", "tr", "th", "td", "form", "label", "select", "option", "input",
    "button", "nav", "dl", "dt", "dd", "code", "svg", "rect", "g", "text",
}  # fmt: skip


def assert_inert(page: str) -> Parsed:
    parsed = parse(page)
    assert parsed.tags <= ALLOWED_TAGS, parsed.tags - ALLOWED_TAGS
    assert not [name for name in parsed.attributes if name.startswith("on")]
    assert "<script" not in page and "<img" not in page
    for link in parsed.links + parsed.forms:  # only this listener's own paths
        assert link.startswith("/"), link
    return parsed


# --- the table: view, sorting, filtering, paging ---------------------------------------------------------


def test_view_from_the_query_string_ignores_what_it_does_not_know() -> None:
    assert View.from_query({}) == View()
    view = View.from_query(
        {
            "sort": ["delivered"],
            "state": ["backing off"],
            "q": [" user1 "],
            "page": ["3"],
            "per_page": ["100"],
        }
    )
    assert view == View("delivered", True, "backing off", "user1", 3, 100)  # delivered: largest first
    assert View.from_query({"sort": ["delivered"], "order": ["asc"]}).descending is False
    hostile = View.from_query(
        {"sort": ["<x>"], "order": ["up"], "state": ["<script>"], "page": ["-1"], "per_page": ["7"]}
    )
    assert hostile == View()
    assert View.from_query({"page": ["99999999999999999999"]}).page == 1
    assert len(View.from_query({"q": ["x" * 1000]}).search) == 200


def test_view_params_round_trip_and_header_clicks_toggle_the_direction() -> None:
    view = View("last_poll", True, "ok", "box", 2, 25)
    assert View.from_query(parse_qs("&".join(f"{k}={v}" for k, v in view.params()))) == view
    assert View().params() == []
    assert view.sorted_by("last_poll") == View("last_poll", False, "ok", "box", 1, 25)
    assert view.sorted_by("name") == View("name", False, "ok", "box", 1, 25)
    assert View().sorted_by("name").descending is True


def record(name: str, state: str = "ok", **fields: Any) -> dict[str, Any]:
    return {"account": name, "configured": True, "state": state, "last_result": "ok", **fields}


def test_select_page_filters_sorts_and_pages() -> None:
    records = [record(f"user{n}", "ok" if n % 3 else "backing off") for n in range(1, 101)]
    records[4]["polling"] = True
    selection = select_page(records, View(per_page=25, page=2))
    assert [r["account"] for r in selection.rows][:3] == ["user26", "user27", "user28"]
    assert (selection.pages, selection.matching, selection.total, selection.first) == (4, 100, 100, 26)
    assert selection.by_state["ok"] == 67 and selection.by_state["backing off"] == 33
    assert selection.polling == 1

    failing = select_page(records, View(state="backing off", per_page=25, page=9))
    assert failing.view.page == 2 and failing.matching == 33 and len(failing.rows) == 8  # clamped to the last
    assert all(r["state"] == "backing off" for r in failing.rows)
    assert failing.by_state["ok"] == 67  # the summary still counts every account

    found = select_page(records, View(search="USER1"))
    assert [r["account"] for r in found.rows][:4] == ["user1", "user10", "user11", "user12"]
    assert found.matching == 12  # user1, user10-19, user100

    nothing = select_page(records, View(state="removed"))
    assert (nothing.rows, nothing.pages, nothing.first) == ([], 1, 0)


def test_sorting_by_state_last_poll_next_poll_and_delivered() -> None:
    records = [
        record("b", "ok", last_poll="2026-03-10T10:00:00+00:00", next_poll="2026-03-10T11:00:00+00:00",
               journal={"messages": 5}),
        record("a", "auth failing", last_poll="2026-03-10T12:00:00+00:00", journal={"messages": 50}),
        record("c", "waiting", journal={"messages": 0}),  # never polled: no last poll
        record("d", "suspended", last_poll="2026-03-09T12:00:00+00:00", next_poll="2026-03-10T09:00:00+00:00",
               journal={"messages": 7}),
    ]  # fmt: skip

    def names(view: View) -> list[str]:
        return [r["account"] for r in select_page(records, view).rows]

    assert names(View(sort="state")) == ["a", "d", "c", "b"]  # the worst first
    assert names(View(sort="state", descending=True)) == ["b", "c", "d", "a"]
    assert names(View(sort="last_poll", descending=True)) == ["a", "b", "d", "c"]  # never polled: last
    assert names(View(sort="last_poll")) == ["d", "b", "a", "c"]
    # A suspended account's stored next poll is not one: it sorts with those that have none.
    assert names(View(sort="next_poll")) == ["b", "a", "c", "d"]
    assert names(View(sort="delivered", descending=True)) == ["a", "d", "b", "c"]
    assert names(View(descending=True)) == ["d", "c", "b", "a"]


# --- rendering -------------------------------------------------------------------------------------------


def test_the_table_keeps_hostile_values_inert_and_links_carry_the_token() -> None:
    hostile = record(
        HOSTILE_NAME,
        "backing off",
        last_error=HOSTILE_ERROR,
        destination='"><script>alert(3)</script>',
        messages={"pending": 0, "failed": 2},
        journal={"messages": 1234, "bytes": 5_000_000, "last_delivery": "2026-03-10T13:00:00+00:00"},
    )
    page = render_status_page(
        [hostile, record("user2")],
        ["database <down>"],
        refresh_seconds=7,
        now=NOW,
        view=View(search="<", per_page=25),
        history={HOSTILE_NAME: {"2026-03-10": 3}},
        token=TOKEN,
    )
    parsed = assert_inert(page)
    assert "&lt;script&gt;alert(&#x27;error&#x27;)" in page and "database &lt;down&gt;" in page
    assert '<meta http-equiv="refresh" content="7">' in page
    account_links = [link for link in parsed.links if link.startswith("/account/")]
    assert account_links == [f"/account/{quote(HOSTILE_NAME, safe='')}?token={TOKEN}"]
    # Every link keeps the token and the view (filter, page size); the form has them as hidden fields.
    for link in parsed.links:
        query = parse_qs(urlsplit(link).query)
        if link.startswith("/?"):
            assert query["token"] == [TOKEN] and query["q"] == ["<"] and query["per_page"] == ["25"]
    assert 'name="token" value="unit-token-5be1"' in page
    assert "1,234" in page and "5.0 MB" in page and "failed 2" in page and "pending 0" not in page
    assert 'aria-label="messages delivered per day, last 30 days: 3 in all, at most 3 a day"' in page


def test_without_a_query_token_no_link_has_one() -> None:
    page = render_status_page([record("user1")], [], refresh_seconds=15, now=NOW)
    parsed = assert_inert(page)
    assert "token" not in page
    assert "/account/user1" in parsed.links


def test_an_empty_ledger_and_a_database_failure_render() -> None:
    page = render_status_page([], ["database unreachable: OperationalError"], refresh_seconds=15, now=NOW)
    assert_inert(page)
    assert "No account matches." in page and "0 accounts" in page


def detail(**fields: Any) -> AccountDetail:
    entry = JournalEntry(
        uidl="<b>uidl</b>",
        message_id=HOSTILE_MESSAGE_ID,
        size=4321,
        sha256="0" * 64,
        ref="imap:INBOX:<7>",
        poll_started_at=NOW,
        recipient="<bob>@example.org",
        recovered=True,
    )
    older = JournalEntry("U-old", "<old@x>", 10, "1" * 64, "imap:INBOX:1", NOW)
    quarantined = QuarantinedMessage(
        id=17, account=HOSTILE_NAME, uidl="Q<1>", attempts=3, last_error=HOSTILE_ERROR, size=None,
        pop_size=99_000_000, message_id=HOSTILE_MESSAGE_ID, updated_at=NOW,
    )  # fmt: skip
    base = record(
        HOSTILE_NAME,
        "backing off",
        last_result="error",
        last_error=LOGIN_DELAY_ERROR + " <i>",
        last_poll="2026-03-10T13:00:00+00:00",
        next_poll="2026-03-10T13:15:00+00:00",
        consecutive_failures=2,
        condition="BACKING OFF after 2 failed polls in a row; next poll 2026-03-10T13:15:00+00:00",
        next_poll_reason="LOGIN-DELAY: <the server>",
        identity="<by header hash>",
        journal={"messages": 2, "bytes": 4331, "failed_polls": 2},
    )
    base.update(fields)
    return AccountDetail(
        record=base,
        deliveries=[(older, NOW - timedelta(days=1)), (entry, NOW)],
        quarantined=[quarantined],
        per_day={"2026-03-09": 1, "2026-03-10": 1},
    )


def test_the_account_page_shows_history_errors_and_quarantine_as_text() -> None:
    page = render_account_page(detail(), ["a <problem>"], refresh_seconds=15, now=NOW, token=TOKEN)
    parsed = assert_inert(page)
    text = "".join(parsed.text)
    shown = [
        HOSTILE_NAME,
        HOSTILE_MESSAGE_ID,
        HOSTILE_ERROR,
        "<b>uidl</b>",
        "imap:INBOX:<7>",
        "for <bob>@example.org",
    ]
    shown += ["LOGIN-DELAY: <the server>", "<by header hash>", "a <problem>", "Q<1>", "99000000"]
    for value in shown:
        assert value in text, value
    assert text.index("<b>uidl</b>") < text.index("U-old")  # newest first
    assert "2026-03-10 13:15:00" in text and "BACKING OFF after 2 failed polls" in text
    assert "Consecutive failed polls2" in text.replace("\n", "")
    assert parsed.links == [f"/?token={TOKEN}"]
    assert 'aria-label="messages delivered per day, last 30 days: 2 in all, at most 1 a day"' in page


def test_a_condition_that_is_the_next_poll_s_reason_is_said_once() -> None:
    condition = "AUTHENTICATION FAILING (4 failed polls in a row): retried slowly"
    page = render_account_page(
        detail(condition=condition, next_poll_reason=condition), [], refresh_seconds=15, now=NOW
    )
    assert page.count("AUTHENTICATION FAILING") == 1 and 'id="condition"' not in page


def test_a_removed_account_has_no_next_poll_and_no_condition() -> None:
    page = render_account_page(detail(configured=False, state="removed"), [], refresh_seconds=15, now=NOW)
    assert 'id="condition"' not in page and "<b>Next poll:</b> none" in page


# --- charts ----------------------------------------------------------------------------------------------


def test_day_series_covers_thirty_days_up_to_today_with_zeros() -> None:
    series = day_series({"2026-03-10": 4, "2026-02-09": 2, "2026-02-08": 99}, date(2026, 3, 10))
    assert len(series) == 30 and series[0].day == date(2026, 2, 9) and series[-1].day == date(2026, 3, 10)
    assert [day.messages for day in series if day.messages] == [2, 4]  # 02-08 is outside the window


def test_bars_are_proportional_and_empty_days_have_none() -> None:
    series = day_series({"2026-03-10": 100, "2026-03-09": 50, "2026-03-01": 1}, date(2026, 3, 10))
    small = sparkline(series)
    assert small.count('fill="#3b73b9"') == 3 and 'height="18"' in small and 'height="9"' in small
    assert 'height="1" fill="#3b73b9"><title>2026-03-01: 1 message</title>' in small  # never too small to see
    large = bar_chart(series)
    assert large.count('class="day"') == 30 and large.count('fill="#3b73b9"') == 3
    assert ">100</text>" in large and ">03-10</text>" in large and ">03-03</text>" in large
    assert 'fill="#3b73b9"' not in sparkline(day_series({}, date(2026, 3, 10)))


# --- why the next poll is when it is ---------------------------------------------------------------------


def one_account(**fields: Any) -> Config:
    data = {
        "service": {"database": "sqlite:///:memory:"},
        "destinations": [{"name": "d", "type": "imap", "host": "h", "username": "u", "password": "p"}],
        "accounts": [
            {"name": "a", "host": "h", "username": "u", "password": "p", "destination": "d",
             "poll_interval": "5m", "poll_jitter": 0.1, **fields}
        ],
    }  # fmt: skip
    return parse_config(data, Path("/virtual/config.toml"))


@pytest.mark.parametrize(
    ("fields", "enabled", "reason"),
    [
        ({"configured": False}, True, "no longer in the configuration"),
        ({}, False, "disabled in the configuration (enabled = false)"),
        ({"condition": "SUSPENDED since x: y", "suspended": True, "last_error": LOGIN_DELAY_ERROR}, True,
         "SUSPENDED since x"),
        ({"condition": "AUTHENTICATION FAILING (3 failed polls in a row)"}, True, "AUTHENTICATION FAILING"),
        ({"condition": "BACKING OFF after 1 failed polls", "last_error": LOGIN_DELAY_ERROR}, True,
         "LOGIN-DELAY: the server refused a login this soon after the previous one. BACKING OFF after 1"),
        ({"condition": "BACKING OFF after 2 failed polls"}, True, "BACKING OFF after 2"),
        ({"last_result": "never polled"}, True, "never polled yet"),
        ({"last_poll": "2026-03-10T13:00:00+00:00", "next_poll": "2026-03-10T13:05:30+00:00"}, True,
         "polled every 5m (poll_interval)"),
        ({"last_poll": "2026-03-10T13:00:00+00:00", "next_poll": "2026-03-10T13:15:00+00:00"}, True,
         "later than poll_interval (5m): the server's LOGIN-DELAY asks for 15m between logins"),
    ],
)  # fmt: skip
def test_next_poll_reason(fields: dict[str, Any], enabled: bool, reason: str) -> None:
    account = one_account(enabled=enabled).accounts[0]
    assert next_poll_reason({**record("a"), **fields}, account).startswith(reason)


# --- on a synthetic ledger of a thousand accounts --------------------------------------------------------


@dataclass
class Thousand:
    config: Config
    ops: Operations
    synthetic: Synthetic
    now: datetime


@pytest.fixture(scope="module")
def thousand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Thousand]:
    url = f"sqlite:///{tmp_path_factory.mktemp('status') / 'ledger.sqlite3'}"
    engine = open_database(url)
    now = datetime.now(UTC)
    synthetic = fill(engine, account_names(1000), now)
    text = config_toml(synthetic.names, url, {"status_token": TOKEN})
    config = parse_config(tomllib.loads(text), Path("/virtual/config.toml"))
    yield Thousand(
        config, Operations(lambda: config, Ledger(engine), PollMetrics(), HealthMonitor()), synthetic, now
    )
    engine.dispose()


def test_status_records_carry_the_journal_totals_and_keep_their_old_fields(thousand: Thousand) -> None:
    records = thousand.ops.status()
    assert len(records) == 1001
    by_name = {r["account"]: r for r in records}
    for name in (*thousand.synthetic.names[:50], HOSTILE_NAME):
        assert by_name[name]["state"] == expected_state(name), name
        assert by_name[name]["journal"]["messages"] == thousand.synthetic.delivered.get(name, 0), name
    ok = by_name["user5"]
    old_fields = {"account", "configured", "last_poll", "last_success", "last_result", "last_error",
                  "consecutive_failures", "next_poll", "last_poll_counts", "messages", "last_worker",
                  "suspended", "condition", "identity", "uidl_change", "listing", "state", "polling",
                  "destination"}  # fmt: skip
    assert old_fields <= set(ok)
    assert set(ok["journal"]) == {"messages", "bytes", "recovered", "first_delivery", "last_delivery",
                                  "quarantined", "failed_polls"}  # fmt: skip
    assert ok["next_poll_reason"] == "polled every 1h (poll_interval)" and ok["on_server"] == 0
    assert by_name["user4"]["journal"] == {
        "messages": 0, "bytes": 0, "recovered": 0, "first_delivery": None, "last_delivery": None,
        "quarantined": 0, "failed_polls": 0,
    }  # fmt: skip
    json.dumps(records)  # /status.json


def test_history_of_a_page_of_accounts_in_one_query(thousand: Thousand) -> None:
    records = thousand.ops.status()
    shown = [r["account"] for r in select_page(records, View(sort="delivered", descending=True)).rows]
    history = thousand.ops.history(shown, thousand.now.date())
    since = history_since(thousand.now.date()).date().isoformat()
    for name in shown:
        expected = {day: n for day, n in thousand.synthetic.per_day.get(name, {}).items() if day >= since}
        assert history.get(name, {}) == expected, name
    totals = [r["journal"]["messages"] for r in records]
    page = [r["journal"]["messages"] for r in records if r["account"] in shown]
    assert sorted(page, reverse=True) == sorted(totals, reverse=True)[:50]


def test_the_thousand_accounts_page(thousand: Thousand) -> None:
    records = thousand.ops.status()
    view = View.from_query({"state": ["backing off"], "sort": ["name"], "order": ["desc"], "page": ["2"]})
    selection = select_page(records, view)
    shown = [r["account"] for r in selection.rows]
    page = render_status_page(
        records, [], refresh_seconds=15, now=thousand.now, view=view,
        history=thousand.ops.history(shown, thousand.now.date()), token=TOKEN,
    )  # fmt: skip
    parsed = assert_inert(page)
    backing_off = sorted(
        (n for n in thousand.synthetic.names if expected_state(n) == "backing off"), key=natural_key
    )
    assert shown == list(reversed(backing_off))[50:100]
    assert selection.pages == 2 and "page 2 of 2 (accounts 51&ndash;" in page
    assert 'rel="prev"' in page and 'rel="next"' not in page  # the last page
    summary = "".join(
        parse(page[page.index('id="summary"') : page.index("</p>", page.index('id="summary"'))]).text
    )
    assert (
        "1001 accounts:" in summary
        and f"{len(backing_off)} backing off" in summary
        and "1 removed" in summary
    )
    assert len(shown) == len(backing_off) - 50 > 0
    assert page.count("<tr data-account=") == len(shown) == page.count('<svg class="spark"')
    assert all(f"token={TOKEN}" in link for link in parsed.links)


def test_the_account_page_of_the_ledger(thousand: Thousand) -> None:
    today = thousand.now.date()
    assert thousand.ops.account("nobody", today) is None
    hostile = thousand.ops.account(HOSTILE_NAME, today)
    assert hostile is not None
    assert len(hostile.deliveries) == min(50, sum(thousand.synthetic.per_day[HOSTILE_NAME].values()))
    assert [q.uidl for q in hostile.quarantined] == ["Q-1001"]
    assert hostile.per_day == {
        day: n for day, n in thousand.synthetic.per_day[HOSTILE_NAME].items()
        if day >= history_since(today).date().isoformat()
    }  # fmt: skip
    page = render_account_page(hostile, [], refresh_seconds=15, now=thousand.now, token=TOKEN)
    assert_inert(page)
    assert "no longer in the configuration" in page


# --- the listener --------------------------------------------------------------------------------------


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_every_new_path_wants_the_token_and_unknown_accounts_are_not_found(thousand: Thousand) -> None:
    server = OpsServer(("127.0.0.1", 0), thousand.ops)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.address[1]}"
        hostile = "/account/" + quote(HOSTILE_NAME, safe="")
        for path in ("/?sort=state&state=ok", "/account/user5", hostile, "/account/nobody", "/status.json"):
            assert get(base + path)[0] == 401, path
            assert get(f"{base}{path}{'&' if '?' in path else '?'}token=wrong-token")[0] == 401, path

        code, page = get(f"{base}/?sort=delivered&state=ok&per_page=25&token={TOKEN}")
        assert code == 200 and page.count("<tr data-account=") == 25
        assert all(f"token={TOKEN}" in link for link in parse(page).links)

        code, page = get(f"{base}{hostile}?token={TOKEN}")
        assert code == 200 and "&lt;img src=x onerror=alert(1)&gt;" in page
        assert_inert(page)
        code, body = get(f"{base}/account/%3Cscript%3Enobody?token={TOKEN}")
        assert code == 404 and "script" not in body
        assert get(f"{base}/account/?token={TOKEN}")[0] == 404

        # Bearer (a script, not a browser): the links need no token, and carry none.
        code, page = get(f"{base}/account/user7", token=TOKEN)
        assert code == 200 and "token" not in page
        assert "LOGIN-DELAY: the server refused a login this soon" in page

        code, body = get(f"{base}/status.json", token=TOKEN)
        assert code == 200 and len(json.loads(body)) == 1001
    finally:
        server.stop()
