"""The status page's HTML (served by connector/ops/web.py): the accounts table and one page per account.

The table stays usable with a thousand accounts: it is sorted, filtered and paged on the server from
query parameters (``sort``, ``order``, ``state``, ``q``, ``page``, ``per_page``), so it works without
JavaScript (the page has none: its Content-Security-Policy allows no script). Every link carries the
access token when the page was opened with one in its address (``?token=...``), because a browser has no
other way to send it. Every value shown is escaped; charts are inline SVG (connector/ops/charts.py).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any
from urllib.parse import quote, urlencode

from connector import __version__
from connector.cli.report import natural_key
from connector.ledger.records import JournalEntry, QuarantinedMessage
from connector.ops.charts import bar_chart, day_series, sparkline

# States from the worst to the best: sorting by state puts the accounts that need a person first.
STATES = ("auth failing", "backing off", "suspended", "waiting", "ok", "removed")
SORTS = ("name", "state", "last_poll", "next_poll", "delivered")
# The direction a column sorts in when its header is first clicked: the latest polls and the largest
# totals are what one looks for.
_FIRST_DESCENDING = {"last_poll", "delivered"}
PAGE_SIZES = (25, 50, 100, 200, 500)
DEFAULT_PAGE_SIZE = 50
_SEARCH_MAX = 200
RECENT_DELIVERIES = 50


@dataclass(frozen=True)
class View:
    """What the table shows: from the query string, and back into the links."""

    sort: str = "name"
    descending: bool = False
    state: str | None = None
    search: str = ""
    page: int = 1
    per_page: int = DEFAULT_PAGE_SIZE

    @classmethod
    def from_query(cls, query: Mapping[str, Sequence[str]]) -> View:
        """A value that is not one of the allowed ones is ignored (the default is shown), never echoed."""

        def first(name: str) -> str:
            values = query.get(name) or [""]
            return values[0].strip()

        sort = first("sort") if first("sort") in SORTS else "name"
        order = first("order")
        descending = order == "desc" if order in ("asc", "desc") else sort in _FIRST_DESCENDING
        state = first("state") if first("state") in STATES else None
        per_page = _integer(first("per_page"))
        return cls(
            sort=sort,
            descending=descending,
            state=state,
            search=first("q")[:_SEARCH_MAX],
            page=max(1, _integer(first("page")) or 1),
            per_page=per_page if per_page in PAGE_SIZES else DEFAULT_PAGE_SIZE,
        )

    def params(self) -> list[tuple[str, str]]:
        """The query parameters of this view, those with their default value left out."""
        pairs: list[tuple[str, str]] = []
        if self.sort != "name" or self.descending:
            pairs += [("sort", self.sort), ("order", "desc" if self.descending else "asc")]
        if self.state is not None:
            pairs.append(("state", self.state))
        if self.search:
            pairs.append(("q", self.search))
        if self.per_page != DEFAULT_PAGE_SIZE:
            pairs.append(("per_page", str(self.per_page)))
        if self.page != 1:
            pairs.append(("page", str(self.page)))
        return pairs

    def sorted_by(self, sort: str) -> View:
        """Clicking a column's header: the other direction if the table is sorted by it, else its first
        direction; back to the first page."""
        descending = not self.descending if sort == self.sort else sort in _FIRST_DESCENDING
        return replace(self, sort=sort, descending=descending, page=1)


def _integer(text: str) -> int:
    return int(text) if text.isdigit() and len(text) < 10 else 0


def _delivered(record: Mapping[str, Any]) -> int:
    return int((record.get("journal") or {}).get("messages", 0))


def _last_poll(record: Mapping[str, Any]) -> str | None:
    text = record.get("last_poll")
    return text if isinstance(text, str) and text != "-" else None  # ISO times in UTC sort as text


def next_poll(record: Mapping[str, Any]) -> str | None:
    """The next poll's time, None for an account that is not polled (suspended, disabled, removed) whatever
    time the ledger still holds."""
    if record["state"] in ("suspended", "removed"):
        return None
    text = record.get("next_poll")
    return text if isinstance(text, str) and text != "-" else None


_SORT_KEYS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "state": lambda record: STATES.index(record["state"]) if record["state"] in STATES else len(STATES),
    "last_poll": _last_poll,
    "next_poll": next_poll,
    "delivered": _delivered,
}


@dataclass(frozen=True)
class Selection:
    """One page of the table, and what the summary line counts (over every account, not just the page)."""

    view: View
    rows: list[dict[str, Any]]
    matching: int
    total: int
    pages: int
    by_state: dict[str, int]
    polling: int
    delivered: int = 0
    delivered_bytes: int = 0

    @property
    def first(self) -> int:
        """The number of the page's first row among the matching ones (1-based; 0 when none)."""
        return (self.view.page - 1) * self.view.per_page + 1 if self.rows else 0


def select_page(records: Sequence[dict[str, Any]], view: View) -> Selection:
    by_state = {state: 0 for state in STATES}
    for record in records:
        by_state[record["state"]] = by_state.get(record["state"], 0) + 1
    search = view.search.casefold()
    matching = [
        record
        for record in records
        if (view.state is None or record["state"] == view.state) and search in record["account"].casefold()
    ]
    # By name first: the sorts below are stable, so equal keys keep the natural order of names.
    matching.sort(
        key=lambda record: natural_key(record["account"]), reverse=view.sort == "name" and view.descending
    )
    if view.sort != "name":
        key = _SORT_KEYS[view.sort]
        # Accounts without the value (never polled) come last in either direction.
        present = [record for record in matching if key(record) is not None]
        missing = [record for record in matching if key(record) is None]
        present.sort(key=key, reverse=view.descending)
        matching = present + missing
    pages = max(1, -(-len(matching) // view.per_page))
    view = replace(view, page=min(view.page, pages))
    start = (view.page - 1) * view.per_page
    return Selection(
        view=view,
        rows=matching[start : start + view.per_page],
        matching=len(matching),
        total=len(records),
        pages=pages,
        by_state=by_state,
        polling=sum(1 for record in records if record.get("polling")),
        delivered=sum(_delivered(record) for record in records),
        delivered_bytes=sum(int((record.get("journal") or {}).get("bytes", 0)) for record in records),
    )


# --- formatting ----------------------------------------------------------------------------------------

e = html.escape


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _time(iso: str | None) -> str:
    """``2026-01-02T03:04:05+00:00`` as ``2026-01-02 03:04:05`` (the page says times are UTC)."""
    if not iso:
        return "-"
    return iso.replace("T", " ").removesuffix("+00:00")


def _when(value: datetime | None) -> str:
    return _time(value.isoformat(timespec="seconds")) if value is not None else "-"


def href(path: str, params: Sequence[tuple[str, str]], token: str | None) -> str:
    """A link of the page, escaped for an attribute, with the token when the page was given one."""
    pairs = [*params, *([("token", token)] if token else [])]
    return e(path + ("?" + urlencode(pairs) if pairs else ""))


def account_path(name: str) -> str:
    return "/account/" + quote(name, safe="")


def _state_badge(state: str) -> str:
    return f'<span class="state {e(state.replace(" ", "-"))}">{e(state)}</span>'


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; white-space: nowrap; } th a { color: inherit; }
td.num, th.num { text-align: right; } .bytes, .muted { color: #666; font-size: 90%; }
.state { font-weight: bold; white-space: nowrap; } .polling { color: #555; font-size: 90%; }
.ok { color: #1a7f37; } .waiting { color: #555; } .suspended, .removed { color: #777; }
.backing-off { color: #b35900; } .auth-failing { color: #c62828; }
.error { color: #c62828; font-family: monospace; white-space: pre-wrap; }
td .error { display: block; max-width: 26em; max-height: 3.6em; overflow: hidden; overflow-wrap: anywhere; }
.banner { background: #fde7e7; border: 1px solid #c62828; padding: 0.6em; margin-bottom: 1em; }
.summary a { text-decoration: none; } .summary .current { text-decoration: underline; }
form#filter { margin: 0.8em 0; } form#filter label { margin-right: 1em; }
nav.pages { margin: 0.6em 0; } nav.pages a, nav.pages span { margin-right: 0.8em; }
.condition { background: #fff4e5; border: 1px solid #b35900; padding: 0.6em; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.facts dt { color: #555; } dl.facts dd { margin: 0; }
code, .mono { font-family: monospace; word-break: break-all; } .time { white-space: nowrap; }
svg.chart { margin: 0.5em 0; }
"""


def _document(title: str, body: str, *, refresh_seconds: int, now: datetime) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh_seconds}">
<title>{e(title)}</title><style>{_STYLE}</style></head>
<body>{body}
<p class="muted">Version {e(__version__)}; page generated {now.isoformat(timespec="seconds")}, refreshes
every {refresh_seconds} s. Times are UTC.</p>
</body></html>
"""


def _banner(problems: Sequence[str]) -> str:
    return "".join(f'<div class="banner">{e(p)}</div>' for p in problems)


# --- the accounts table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    title: str
    sort: str | None = None
    numeric: bool = False


_COLUMNS = (
    _Column("Account", "name"),
    _Column("State", "state"),
    _Column("Destination"),
    _Column("Last poll", "last_poll"),
    _Column("Next poll", "next_poll"),
    _Column("Delivered", "delivered", numeric=True),
    _Column("Last delivery"),
    _Column("Last 30 days"),
    _Column("Ledger"),
    _Column("Last error"),
)


def _header(view: View, token: str | None) -> str:
    cells = []
    for column in _COLUMNS:
        classes = ' class="num"' if column.numeric else ""
        if column.sort is None:
            cells.append(f"<th{classes}>{e(column.title)}</th>")
            continue
        current = column.sort == view.sort
        arrow = (" ▼" if view.descending else " ▲") if current else ""
        aria = f' aria-sort="{"descending" if view.descending else "ascending"}"' if current else ""
        link = href("/", view.sorted_by(column.sort).params(), token)
        title = f'<a href="{link}">{e(column.title)}{arrow}</a>'
        cells.append(f'<th{classes}{aria} data-sort="{e(column.sort)}">{title}</th>')
    return "".join(cells)


def _row(record: Mapping[str, Any], history: Mapping[str, int], today: date, token: str | None) -> str:
    polling = ' <span class="polling">(polling now)</span>' if record.get("polling") else ""
    messages = record.get("messages") or {}
    journal = record.get("journal") or {}
    error = record.get("last_error") or ""
    link = href(account_path(record["account"]), [], token)
    cells = [
        f'<a class="account" href="{link}">{e(record["account"])}</a>',
        _state_badge(record["state"]) + polling,
        e(record.get("destination", "-")),
        f'<span class="time">{e(_time(record.get("last_poll")))}</span>',
        f'<span class="time">{e(_time(next_poll(record)))}</span>',
        f"{int(journal.get('messages', 0)):,}<br>"
        f'<span class="bytes">{e(human_bytes(int(journal.get("bytes", 0))))}</span>',
        f'<span class="time">{e(_time(journal.get("last_delivery")))}</span>',
        sparkline(day_series(history, today)),
        # The states that have messages: a column of "pending 0, delivered 0, ..." says nothing.
        e(", ".join(f"{k} {v}" for k, v in messages.items() if v) or "-"),
        f'<span class="error" title="{e(error)}">{e(error)}</span>',
    ]
    tds = "".join(
        f'<td class="num">{cell}</td>' if column.numeric else f"<td>{cell}</td>"
        for column, cell in zip(_COLUMNS, cells, strict=True)
    )
    return f'<tr data-account="{e(record["account"])}" data-state="{e(record["state"])}">{tds}</tr>'


def _summary(selection: Selection, token: str | None) -> str:
    view = selection.view
    everyone = replace(view, state=None, page=1)
    links = [
        f'<a class="state-filter{" current" if view.state is None else ""}" '
        f'href="{href("/", everyone.params(), token)}">{selection.total} accounts</a>:'
    ]
    for state in STATES:
        count = selection.by_state.get(state, 0)
        if not count:
            continue
        target = href("/", replace(view, state=state, page=1).params(), token)
        current = " current" if view.state == state else ""
        links.append(
            f'<a class="state-filter {e(state.replace(" ", "-"))}{current}" data-state="{e(state)}" '
            f'href="{target}">{count} {e(state)}</a>'
        )
    polling = f"; {selection.polling} polling now" if selection.polling else ""
    delivered = (
        f"Delivered in all: {selection.delivered:,} messages, {e(human_bytes(selection.delivered_bytes))}."
    )
    states = " · ".join(links[1:])
    return f'<p class="summary" id="summary">{links[0]} {states}{polling}. {delivered}</p>'


def _filter_form(selection: Selection, token: str | None) -> str:
    view = selection.view
    options = [f'<option value=""{"" if view.state else " selected"}>all ({selection.total})</option>']
    for state in STATES:
        selected = " selected" if view.state == state else ""
        count = selection.by_state.get(state, 0)
        options.append(f'<option value="{e(state)}"{selected}>{e(state)} ({count})</option>')
    sizes = "".join(
        f'<option value="{size}"{" selected" if size == view.per_page else ""}>{size}</option>'
        for size in PAGE_SIZES
    )
    hidden = [("sort", view.sort), ("order", "desc" if view.descending else "asc")]
    if token:
        hidden.append(("token", token))
    hidden_inputs = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in hidden)
    return (
        '<form id="filter" method="get" action="/">'
        f'<label>State <select name="state">{"".join(options)}</select></label>'
        f'<label>Account contains <input type="search" name="q" value="{e(view.search)}" '
        f'maxlength="{_SEARCH_MAX}"></label>'
        f'<label>Per page <select name="per_page">{sizes}</select></label>'
        f'{hidden_inputs}<button type="submit">Show</button></form>'
    )


def _pager(selection: Selection, token: str | None) -> str:
    view = selection.view

    def to(page: int, text: str, rel: str) -> str:
        if page == view.page or not 1 <= page <= selection.pages:
            return f'<span class="disabled">{text}</span>'
        return f'<a rel="{rel}" href="{href("/", replace(view, page=page).params(), token)}">{text}</a>'

    last_row = selection.first + len(selection.rows) - 1 if selection.rows else 0
    where = (
        f"page {view.page} of {selection.pages} (accounts {selection.first}&ndash;{last_row} of "
        f"{selection.matching})"
    )
    return (
        '<nav class="pages">'
        + to(1, "&laquo; first", "first")
        + to(view.page - 1, "&lsaquo; previous", "prev")
        + f'<span class="where">{where}</span>'
        + to(view.page + 1, "next &rsaquo;", "next")
        + to(selection.pages, "last &raquo;", "last")
        + "</nav>"
    )


def render_status_page(
    records: list[dict[str, Any]],
    problems: list[str],
    *,
    refresh_seconds: int,
    now: datetime,
    view: View | None = None,
    history: Mapping[str, Mapping[str, int]] | None = None,
    token: str | None = None,
) -> str:
    """The accounts table. ``records`` are every account's (``Operations.status``); ``history`` the
    messages per day of (at least) the page's accounts, as ``Journal.per_day_of``."""
    selection = select_page(records, view or View())
    history = history or {}
    today = now.date()
    rows = "\n".join(
        _row(record, history.get(record["account"], {}), today, token) for record in selection.rows
    )
    if not rows:
        rows = f'<tr><td colspan="{len(_COLUMNS)}" class="muted">No account matches.</td></tr>'
    pager = _pager(selection, token)
    body = f"""<h1>POP Connector status</h1>
{_banner(problems)}
{_summary(selection, token)}
{_filter_form(selection, token)}
{pager}
<table id="accounts"><thead><tr>{_header(selection.view, token)}</tr></thead><tbody>
{rows}
</tbody></table>
{pager}"""
    return _document("POP Connector status", body, refresh_seconds=refresh_seconds, now=now)


# --- one account ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountDetail:
    """What the account page shows: the account's status record (as in ``Operations.status``), its
    latest journaled deliveries (oldest first, as ``Journal.deliveries``), its quarantine, and its
    messages per day."""

    record: dict[str, Any]
    deliveries: list[tuple[JournalEntry, datetime]] = field(default_factory=list)
    quarantined: list[QuarantinedMessage] = field(default_factory=list)
    per_day: dict[str, int] = field(default_factory=dict)


def _facts(items: Sequence[tuple[str, str]], element_id: str) -> str:
    rows = "".join(f"<dt>{e(term)}</dt><dd>{value}</dd>" for term, value in items)
    return f'<dl class="facts" id="{element_id}">{rows}</dl>'


def _deliveries_table(deliveries: Sequence[tuple[JournalEntry, datetime]]) -> str:
    if not deliveries:
        return '<p class="muted">No delivery in the journal.</p>'
    rows = []
    for entry, at in sorted(deliveries, key=lambda delivery: delivery[1], reverse=True):  # newest first
        notes = []
        if entry.recipient:
            notes.append(f"for {e(entry.recipient)}")
        if entry.recovered:
            notes.append("recovered (found delivered by an interrupted attempt)")
        rows.append(
            "<tr>"
            f"<td>{e(_when(at))}</td>"
            f'<td class="mono">{e(entry.uidl)}</td>'
            f'<td class="mono">{e(entry.message_id or "-")}</td>'
            f'<td class="num">{entry.size}</td>'
            f'<td class="mono">{e(entry.ref)}</td>'
            f"<td>{'; '.join(notes)}</td>"
            "</tr>"
        )
    return (
        '<table id="deliveries"><thead><tr><th>Time</th><th>UIDL</th><th>Message-ID</th>'
        '<th class="num">Size</th><th>Destination reference</th><th></th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )


def _size_of(message: QuarantinedMessage) -> str:
    """The size fetched, else the size the server listed (a message too large to download has only that)."""
    size = message.size if message.size is not None else message.pop_size
    return str(size) if size is not None else "-"


def _quarantine_table(messages: Sequence[QuarantinedMessage]) -> str:
    if not messages:
        return '<p class="muted" id="quarantine-empty">No quarantined message.</p>'
    rows = "".join(
        "<tr>"
        f'<td class="num">{message.id}</td>'
        f'<td class="mono">{e(message.uidl)}</td>'
        f'<td class="mono">{e(message.message_id or "-")}</td>'
        f'<td class="num">{_size_of(message)}</td>'
        f'<td class="num">{message.attempts}</td>'
        f"<td>{e(_when(message.updated_at))}</td>"
        f'<td><span class="error">{e(message.last_error or "")}</span></td>'
        "</tr>"
        for message in messages
    )
    return (
        f"<p>{len(messages)} message{'s' if len(messages) != 1 else ''} left on the POP3 server. "
        "<code>pop-connector quarantine retry ID</code> delivers one again at the next poll (the "
        "destination is checked first).</p>"
        '<table id="quarantine"><thead><tr><th class="num">ID</th><th>UIDL</th><th>Message-ID</th>'
        '<th class="num">Size</th><th class="num">Attempts</th><th>Since</th><th>Reason</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def render_account_page(
    detail: AccountDetail,
    problems: list[str],
    *,
    refresh_seconds: int,
    now: datetime,
    token: str | None = None,
) -> str:
    record = detail.record
    name = record["account"]
    journal = record.get("journal") or {}
    polling = ' <span class="polling">(polling now)</span>' if record.get("polling") else ""
    condition = record.get("condition")
    last_poll_counts = record.get("last_poll_counts") or {}
    messages = record.get("messages") or {}
    failed_now = record.get("last_result") in ("error", "auth_error")
    last_error = record.get("last_error")
    error_when = f" (last poll, {e(_time(record.get('last_poll')))})" if failed_now else ""
    errors = [
        ("Last result", e(record.get("last_result", "-"))),
        ("Consecutive failed polls", e(str(record.get("consecutive_failures", 0)))),
        ("Last success", e(_time(record.get("last_success")))),
        (
            "Last error",
            f'<span class="error" id="last-error">{e(last_error)}</span>{error_when}'
            if last_error
            else "none",
        ),
        ("Failed polls in all", e(str(journal.get("failed_polls", 0)))),
    ]
    for key, title in (
        ("identity", "Identity"),
        ("uidl_change", "UIDL change"),
        ("listing", "Short listing"),
    ):
        if record.get(key):
            errors.append((title, e(str(record[key]))))
    totals = [
        ("Messages", f"{int(journal.get('messages', 0)):,}"),
        ("Bytes", f"{int(journal.get('bytes', 0)):,} ({e(human_bytes(int(journal.get('bytes', 0))))})"),
        ("Recovered", e(str(journal.get("recovered", 0)))),
        ("First delivery", e(_time(journal.get("first_delivery")))),
        ("Last delivery", e(_time(journal.get("last_delivery")))),
        ("Quarantined in all", e(str(journal.get("quarantined", 0)))),
    ]
    poll = [
        ("Destination", e(record.get("destination", "-"))),
        ("Last poll", e(_time(record.get("last_poll")))),
        ("Last poll counts", e(", ".join(f"{k} {v}" for k, v in last_poll_counts.items()) or "-")),
        (
            "On the server at the last listing",
            e(str(record.get("on_server", "-") if record.get("on_server") is not None else "-")),
        ),
        ("Ledger", e(", ".join(f"{k} {v}" for k, v in messages.items()) or "-")),
        ("Last polled by worker", e(record.get("last_worker") or "-")),
    ]
    # A removed account's last failure is history, not a condition: it is not polled any more. A condition
    # that is already the next poll's reason is not said twice.
    reason = record.get("next_poll_reason") or ""
    shown_condition = (
        condition if condition and record.get("configured") and condition not in reason else None
    )
    condition_html = (
        f'<p class="condition" id="condition">{e(shown_condition)}</p>' if shown_condition else ""
    )
    body = f"""<p><a id="back" href="{href("/", [], token)}">← all accounts</a></p>
<h1>Account <span id="account-name">{e(name)}</span> {_state_badge(record["state"])}{polling}</h1>
{_banner(problems)}
<p id="next-poll"><b>Next poll:</b> {e(_time(next_poll(record)) if next_poll(record) else "none")} &mdash;
<span id="next-poll-reason">{e(record.get("next_poll_reason") or "")}</span></p>
{condition_html}
{_facts(poll, "poll")}
<h2>Delivered</h2>
{_facts(totals, "totals")}
<h3>Messages per day, last 30 days</h3>
{bar_chart(day_series(detail.per_day, now.date()))}
<h2>Errors</h2>
{_facts(errors, "errors")}
<h2>Quarantine</h2>
{_quarantine_table(detail.quarantined)}
<h2>Recent deliveries</h2>
<p class="muted">The latest {RECENT_DELIVERIES} in the delivery journal, newest first.</p>
{_deliveries_table(detail.deliveries)}"""
    return _document(f"POP Connector: {name}", body, refresh_seconds=refresh_seconds, now=now)
