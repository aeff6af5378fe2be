"""The idle probe's rules (connector/policies/idle.py): when a poll may be a probe, and when the probe may
call it idle; checked against the planner (connector/poll/plan.py), which must have nothing to do whenever
the rules say "idle"."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.config import Account, RetentionPolicy
from connector.ledger.records import KnownMessage, KnownMessages, LedgerView, MessageState
from connector.policies.idle import (
    PROBE_MAX_LOGIN_DELAY,
    capabilities_refusal,
    kept_uidls,
    ledger_refusal,
    listing_is_idle,
    probe_refusal,
)
from connector.policies.listing import Forgetting
from connector.policies.retention import deletable_until
from connector.poll.plan import PollPlan, plan_poll
from connector.pop3 import Capabilities, MessageList

NOW = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)


def account(**fields: Any) -> Account:
    base = {"name": "alice", "host": "pop.example", "username": "alice", "password": "pw-idle-1"}
    return Account.model_validate({**base, "destination": "d", "retention": "keep", **fields})


def view(uidls: list[str] | None = None, **fields: Any) -> LedgerView:
    """An account that keeps ``uidls`` (delivered a day ago) and has nothing else to decide."""
    kept = ["a", "b", "c"] if uidls is None else uidls
    values: dict[str, Any] = {
        "account_id": 7,
        "suspended": False,
        "noted": False,
        "consecutive_failures": 0,
        "last_delivered": 0,
        "baseline_taken": False,
        "delivered": len(kept),
        "others": 0,
        "missing": 0,
        "undated": 0,
        "oldest_delivery": NOW - timedelta(days=1) if kept else None,
        "joined": "\n".join(kept) or None,
        "lease": None,
        "lease_free": True,
    }
    return LedgerView(**{**values, **fields})


def listing(*uidls: str) -> MessageList:
    return MessageList(list(range(1, len(uidls) + 1)), list(uidls))


# --- probe_refusal -----------------------------------------------------------------------------------------


def test_user_and_pass_over_implicit_tls_or_plaintext_may_be_probed() -> None:
    assert probe_refusal(account(), wire_traced=False) is None
    assert probe_refusal(account(tls="none"), wire_traced=False) is None


@pytest.mark.parametrize(
    ("fields", "traced", "reason"),
    [
        ({"auth": "apop"}, False, "USER/PASS only"),
        ({"tls": "starttls"}, False, "starttls"),
        ({"protocol_log": True}, False, "protocol_log"),
        ({}, True, "wire trace"),
    ],
    ids=["apop", "starttls", "protocol-log", "wire-trace"],
)
def test_what_the_probe_does_not_speak_is_polled_in_full(
    fields: dict[str, Any], traced: bool, reason: str
) -> None:
    refused = probe_refusal(account(**fields), wire_traced=traced)
    assert refused is not None and reason in refused


def test_oauth2_is_polled_in_full() -> None:
    settings = {"token_url": "https://id.example/t", "client_id": "c", "client_secret": "s-idle-1"}
    oauth = account(auth="oauth2", password=None, oauth=settings)
    refused = probe_refusal(oauth, wire_traced=False)
    assert refused is not None and "oauth2" in refused


# --- ledger_refusal ----------------------------------------------------------------------------------------


def test_an_account_that_keeps_its_mail_and_has_nothing_else_is_left_to_the_listing() -> None:
    assert ledger_refusal(account(), view(), NOW) is None
    assert ledger_refusal(account(), view([]), NOW) is None  # nothing delivered yet, nothing else either
    assert ledger_refusal(account(start="new"), view(baseline_taken=True), NOW) is None


@pytest.mark.parametrize(
    ("fields", "seen", "reason"),
    [
        ({}, {"suspended": True}, "suspended"),
        ({}, {"lease_free": False}, "lease"),
        ({}, {"consecutive_failures": 1}, "the last poll failed"),
        ({}, {"last_delivered": 2}, "the last poll delivered"),
        ({}, {"noted": True}, "note"),
        ({"start": "new"}, {}, "baseline"),
        ({}, {"others": 1}, "one by one"),
        ({}, {"missing": 1}, "one by one"),
        ({}, {"undated": 1}, "one by one"),
        ({"retention": "delete"}, {}, "retention deletes"),
        ({"retention": {"mode": "days", "days": 1}}, {}, "retention deletes"),  # delivered a day ago: due
    ],
    ids=[
        "suspended",
        "lease",
        "failed",
        "delivered",
        "noted",
        "baseline",
        "others",
        "missing",
        "undated",
        "delete",
        "days",
    ],
)
def test_each_reason_the_ledger_needs_the_full_poll(
    fields: dict[str, Any], seen: dict[str, Any], reason: str
) -> None:
    refused = ledger_refusal(account(**fields), view(**seen), NOW)
    assert refused is not None and reason in refused


def test_an_account_not_in_the_ledger_is_polled_in_full() -> None:
    refused = ledger_refusal(account(), None, NOW)
    assert refused is not None and "not in the ledger" in refused


def test_retention_in_days_is_left_to_the_listing_until_the_oldest_delivery_is_due() -> None:
    days = account(retention={"mode": "days", "days": 2})
    assert ledger_refusal(days, view(), NOW) is None  # a day old: kept for another day
    due = view(oldest_delivery=NOW - timedelta(days=2))  # exactly due (should_delete: >= days)
    assert ledger_refusal(days, due, NOW) is not None
    assert ledger_refusal(account(retention="delete"), view([]), NOW) is None  # nothing delivered to delete


# --- listing_is_idle and the rest --------------------------------------------------------------------------


def test_the_kept_uidls_listed_once_each_in_any_order_are_idle() -> None:
    kept = view()
    assert listing_is_idle(listing("c", "a", "b"), 0, kept_uidls(kept), kept)
    assert listing_is_idle(listing(), 0, kept_uidls(view([])), view([]))


@pytest.mark.parametrize(
    ("listed", "unlisted"),
    [
        (("a", "b", "c", "d"), 0),  # a new message
        (("a", "b"), 0),  # one gone
        (("a", "b", "b"), 0),  # as many lines, one twice and one gone
        (("a", "b", "c", "c"), 0),  # one twice
        (("a", "b", "c"), 1),  # and a malformed line
        (("a", "b", "d"), 0),  # as many, one other
    ],
    ids=["new", "gone", "twice-and-gone", "twice", "malformed", "other"],
)
def test_anything_but_the_kept_uidls_is_not_idle(listed: tuple[str, ...], unlisted: int) -> None:
    kept = view()
    assert not listing_is_idle(listing(*listed), unlisted, kept_uidls(kept), kept)


def test_a_uidl_the_ledger_knows_in_its_header_hash_form_is_not_idle() -> None:
    """The full poll identifies such a message by UIDL and header hash (TOP n 0): the probe cannot."""
    hashed = view(["a", "b/hdr:" + "0" * 64])
    assert not listing_is_idle(listing("a", "b/hdr:" + "0" * 64), 0, kept_uidls(hashed), hashed)


def test_a_kept_uidl_with_a_line_break_is_never_idle() -> None:
    """Never written by this program (RFC 1939 UIDLs have none), but joined by line breaks it would split in
    two: the count tells."""
    broken = view(delivered=1, joined="a\nb", oldest_delivery=NOW)
    assert kept_uidls(broken) == {"a", "b"}
    assert not listing_is_idle(listing("a", "b"), 0, kept_uidls(broken), broken)


def test_capa_expire_shorter_than_the_retention_needs_the_full_poll() -> None:
    expire = Capabilities({"EXPIRE": ("1",)})
    refused = capabilities_refusal(expire, account())
    assert refused is not None and "CAPA EXPIRE" in refused
    assert capabilities_refusal(expire, account(retention="delete")) is None
    assert capabilities_refusal(Capabilities(), account()) is None


def test_a_login_delay_over_a_minute_needs_the_full_poll() -> None:
    """The probe's login would make a new message wait that long for the full poll's."""
    assert capabilities_refusal(Capabilities({"LOGIN-DELAY": ("10",)}), account()) is None  # Courier's
    assert (
        capabilities_refusal(Capabilities({"LOGIN-DELAY": (str(PROBE_MAX_LOGIN_DELAY),)}), account()) is None
    )
    refused = capabilities_refusal(Capabilities({"LOGIN-DELAY": ("900",)}), account(retention="delete"))
    assert refused is not None and "LOGIN-DELAY 900" in refused


# --- the property: idle means an empty plan ----------------------------------------------------------------

STATES = list(MessageState)
# A small alphabet, so that listings and ledgers share UIDLs often; with hashed and twin-keyed forms.
UIDLS = ["a", "b", "c", "d", "e", ".f", "g/hdr:" + "1" * 64, "hdr:" + "2" * 64, "h #2"]
RETENTIONS = [
    *[RetentionPolicy(mode="keep")] * 3,
    RetentionPolicy(mode="delete"),
    RetentionPolicy(mode="days", days=1),
    RetentionPolicy(mode="days", days=30),
]
_EMPTY = PollPlan()


# Delivery ages around the retentions' thresholds (1 and 30 days), where an off-by-one would show.
AGES = [0, 1, 2, 29, 30, 31, 60]


@st.composite
def rows(draw: st.DrawFn) -> dict[str, KnownMessage]:
    """A ledger: some UIDLs of the alphabet, delivered, dated and listed last time (the kind the rules accept,
    so that the planner is asked often), but for one or two odd rows: in another state, with no delivery
    time, or missing from the last listing. Near the line between idle and not, where a rule is tested."""
    uidls = draw(st.lists(st.sampled_from(UIDLS), unique=True, max_size=6))
    odd = (
        set(draw(st.sampled_from([[], [], [], *([uidl] for uidl in uidls), uidls[-2:]]))) if uidls else set()
    )
    ledger = {}
    for uidl in uidls:
        kind = draw(st.sampled_from(["state", "undated", "missing"])) if uidl in odd else "clean"
        state = draw(st.sampled_from(STATES)) if kind == "state" else MessageState.DELIVERED
        delivered = None if kind == "undated" else NOW - timedelta(days=draw(st.sampled_from(AGES)))
        missing = draw(st.integers(1, 4)) if kind == "missing" else 0
        since = NOW - timedelta(hours=draw(st.integers(0, 72))) if missing else None
        ledger[uidl] = KnownMessage(
            uidl, state, draw(st.integers(0, 3)), delivered, "<m@x>", 100, "0" * 64, draw(st.booleans()), 100,
            None, missing, since,
        )  # fmt: skip
    return ledger


def known_to_plan(ledger: Mapping[str, KnownMessage], retention: RetentionPolicy) -> KnownMessages:
    """What ``Ledger.known_to_plan`` reads: in full the rows not delivered, missing from the last listing or
    that the retention may delete now (a delivery time not recorded counts as due); the others by UIDL."""
    until = deletable_until(retention, NOW)

    def in_full(row: KnownMessage) -> bool:
        if row.state is not MessageState.DELIVERED or row.missing_since is not None:
            return True
        return until is not None and (row.delivered_at is None or row.delivered_at <= until)

    full = {uidl: row for uidl, row in ledger.items() if in_full(row)}
    joined = "\n".join(ledger) or None
    return KnownMessages(full, set(ledger) - set(full), joined=joined)


def ledger_view(ledger: Mapping[str, KnownMessage], flags: Mapping[str, Any]) -> LedgerView:
    """What ``IdlePolls.read`` reads for the same rows."""
    delivered = [row for row in ledger.values() if row.state is MessageState.DELIVERED]
    dates = [row.delivered_at for row in delivered if row.delivered_at is not None]
    return view(
        delivered=len(delivered),
        others=len(ledger) - len(delivered),
        missing=sum(1 for row in ledger.values() if row.missing_since is not None),
        undated=len(delivered) - len(dates),
        oldest_delivery=min(dates, default=None),
        joined="\n".join(ledger) or None,
        **flags,
    )


@st.composite
def listings(draw: st.DrawFn, ledger: Mapping[str, KnownMessage]) -> list[str]:
    """The server's UIDLs: the ledger's in any order, then perhaps one left out, one listed twice, one new
    (of the alphabet or not), a few times over."""
    uidls = list(draw(st.permutations(list(ledger))))
    changes = draw(st.sampled_from([0, 0, 0, 1, 2]))
    for change in draw(
        st.lists(st.sampled_from(["drop", "twice", "new"]), min_size=changes, max_size=changes)
    ):
        if change == "new":
            uidls.insert(draw(st.integers(0, len(uidls))), draw(st.sampled_from([*UIDLS, "new-1"])))
        elif uidls:
            at = draw(st.integers(0, len(uidls) - 1))
            if change == "drop":
                del uidls[at]
            else:
                uidls.insert(draw(st.integers(0, len(uidls))), uidls[at])
    return uidls


# At least 300 examples (more with HYPOTHESIS_PROFILE=deep): the cases that tell a wrong rule are rare ones.
@settings(max_examples=max(300, settings().max_examples), deadline=None)
@given(
    ledger=rows(),
    retention=st.sampled_from(RETENTIONS),
    start=st.sampled_from(["all", "new"]),
    # Mostly none of the account's flags (with a baseline taken, start = "new" is left to the ledger).
    flags=st.sampled_from(
        [
            *[{"baseline_taken": True}] * 6,
            {},
            {"noted": True},
            {"consecutive_failures": 1},
            {"suspended": True},
        ]
    ),
    unlisted=st.sampled_from([0] * 9 + [1]),
    forgetting=st.builds(Forgetting, st.integers(1, 4), st.integers(0, 48).map(lambda h: timedelta(hours=h))),
    data=st.data(),
)
def test_when_the_rules_say_idle_the_plan_is_empty(
    ledger: dict[str, KnownMessage],
    retention: RetentionPolicy,
    start: str,
    flags: dict[str, Any],
    unlisted: int,
    forgetting: Forgetting,
    data: st.DataObject,
) -> None:
    uidls = data.draw(listings(ledger))
    server = listing(*uidls)
    seen = ledger_view(ledger, flags)
    rules = account(retention=retention.model_dump(), start=start)
    idle = ledger_refusal(rules, seen, NOW) is None and listing_is_idle(
        server, unlisted, kept_uidls(seen), seen
    )
    if not idle:
        return
    plan = plan_poll(server, known_to_plan(ledger, retention), retention, NOW, forgetting=forgetting)
    assert plan == _EMPTY, (plan, uidls, ledger)


def test_a_typical_idle_poll_plans_nothing() -> None:
    """The kind of case the property above is about (it checks that the generated ones reach it)."""
    ledger = {uidl: KnownMessage(uidl, MessageState.DELIVERED, 1, NOW, None, 1, None) for uidl in "abc"}
    seen = ledger_view(ledger, {})
    keep = RetentionPolicy(mode="keep")
    assert ledger_refusal(account(), seen, NOW) is None
    assert listing_is_idle(listing("b", "c", "a"), 0, kept_uidls(seen), seen)
    assert plan_poll(listing("b", "c", "a"), known_to_plan(ledger, keep), keep, NOW) == PollPlan()
