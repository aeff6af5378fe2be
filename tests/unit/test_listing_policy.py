"""Issue 11.1 and 11.4: reused UIDLs, short or empty listings (policies.listing and the plan)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from connector.config import RetentionPolicy
from connector.ledger.records import KnownMessage, KnownMessages, MessageState
from connector.policies.listing import (
    FORGOTTEN_ROWS_KEPT,
    Forgetting,
    forgotten,
    listed_last_time,
    retired,
    same_message,
    sudden_loss,
    to_delete_from_ledger,
)
from connector.poll.plan import Delivery, PollPlan, plan_poll, with_identities_checked
from connector.pop3 import MessageInfo

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
KEEP = RetentionPolicy(mode="keep")
RULE = Forgetting(polls=3, after=timedelta(hours=24))


def row(
    uidl: str,
    state: MessageState = MessageState.DELIVERED,
    *,
    polls: int = 0,
    hours: float | None = None,
    pop_size: int | None = 100,
    header_hash: str | None = "h" * 64,
) -> KnownMessage:
    since = None if hours is None else NOW - timedelta(hours=hours)
    return KnownMessage(
        uidl, state, 1, NOW - timedelta(days=9), "<m@x>", 100, "0" * 64, False, pop_size, header_hash,
        polls, since,
    )  # fmt: skip


def listing(*uidls: str) -> list[MessageInfo]:
    return [MessageInfo(number, uidl, 100) for number, uidl in enumerate(uidls, start=1)]


# --- the pure rules -------------------------------------------------------------------------------------


def test_forgotten_only_after_both_polls_and_time() -> None:
    assert not forgotten(row("a"), NOW, RULE)
    assert not forgotten(row("a", polls=2, hours=48), NOW, RULE)
    assert not forgotten(row("a", polls=5, hours=23), NOW, RULE)
    assert forgotten(row("a", polls=3, hours=24), NOW, RULE)


def test_deleted_rows_go_at_once_forgotten_ones_much_later() -> None:
    assert to_delete_from_ledger(row("d", MessageState.DELETED), NOW, RULE)
    assert not to_delete_from_ledger(row("a", polls=3, hours=25), NOW, RULE)
    kept_long = FORGOTTEN_ROWS_KEPT.total_seconds() / 3600
    assert to_delete_from_ledger(row("a", polls=3, hours=kept_long), NOW, RULE)


def test_retired_rows_decide_nothing_but_seen_ones_stay_seen() -> None:
    assert retired(row("d", MessageState.DELETED), NOW, RULE)
    assert retired(row("a", polls=3, hours=25), NOW, RULE)
    assert not retired(row("a", polls=2, hours=25), NOW, RULE)
    assert not retired(row("s", MessageState.SEEN, polls=3, hours=25), NOW, RULE)


def test_sudden_loss_rule() -> None:
    assert sudden_loss(expected=1, lost=1, listed=0)  # empty listing where mail was kept
    assert sudden_loss(expected=5, lost=4, listed=1)  # 1 of 5
    assert sudden_loss(expected=4, lost=3, listed=1)
    assert not sudden_loss(expected=4, lost=2, listed=2)  # half is not most
    assert not sudden_loss(expected=3, lost=2, listed=1)  # too few to tell
    assert not sudden_loss(expected=5, lost=0, listed=0)


def test_same_message_compares_header_hash_else_size() -> None:
    old = row("1")
    assert same_message(MessageInfo(1, "1", 100), old, "h" * 64)
    assert not same_message(MessageInfo(1, "1", 100), old, "x" * 64)  # same size, other headers
    # The header hash decides: a host that reports sizes its own way still has the same message.
    assert same_message(MessageInfo(1, "1", 101), old, "h" * 64)
    # TOP refused, or a row from before header hashes: the size is all there is to compare.
    assert same_message(MessageInfo(1, "1", 100), old, None)
    assert not same_message(MessageInfo(1, "1", 101), old, None)
    assert same_message(MessageInfo(1, "1", 100), row("1", header_hash=None), "x" * 64)
    # A row that recorded nothing to compare is never proof.
    assert not same_message(MessageInfo(1, "1", 100), row("1", pop_size=None, header_hash=None), None)


# --- the plan -------------------------------------------------------------------------------------------


def test_missing_rows_are_counted_not_forgotten() -> None:
    known = KnownMessages({"p": row("p", MessageState.PENDING)}, kept=frozenset({"k1", "k2", "k3", "k4"}))
    plan = plan_poll(listing("k1", "k2", "k3"), known, KEEP, NOW, forgetting=RULE)
    assert plan.gone == [] and plan.missing == ["p", "k4"] and plan.sudden_loss is None


def test_an_empty_listing_is_a_sudden_loss_and_forgets_nothing() -> None:
    rows = {"old": row("old", polls=9, hours=24 * 60), "d": row("d", MessageState.DELETED)}
    known = KnownMessages(rows, kept=frozenset({"k1", "k2"}))
    plan = plan_poll([], known, KEEP, NOW, forgetting=RULE)
    assert plan.sudden_loss is not None and "2 of the 2" in plan.sudden_loss
    # Only what the server confirmed removing goes; "old" would have, on a listing to be believed.
    assert plan.gone == ["d"] and plan.missing == ["k1", "k2"] and plan.deliver == []
    believed = plan_poll(listing("k1", "k2"), known, KEEP, NOW, forgetting=RULE)
    assert believed.gone == ["old", "d"] and believed.sudden_loss is None


def test_a_listing_showing_one_of_five_is_a_sudden_loss() -> None:
    known = KnownMessages(kept=frozenset({"1", "2", "3", "4", "5"}))
    plan = plan_poll(listing("3"), known, KEEP, NOW, forgetting=RULE)
    assert plan.sudden_loss is not None and plan.missing == ["1", "2", "4", "5"] and plan.deliver == []


def test_rows_already_missing_do_not_make_a_loss_sudden() -> None:
    rows = {u: row(u, polls=1, hours=1) for u in ("1", "2", "3", "4")}
    plan = plan_poll(listing("5"), KnownMessages(rows, kept=frozenset({"5"})), KEEP, NOW, forgetting=RULE)
    assert plan.sudden_loss is None and plan.missing == ["1", "2", "3", "4"]


def test_a_missing_message_listed_again_is_known_again() -> None:
    rows = {"k": row("k", polls=2, hours=30)}
    plan = plan_poll(listing("k"), KnownMessages(rows), KEEP, NOW, forgetting=RULE)
    assert plan.deliver == [] and plan.listed_again == ["k"] and plan.gone == [] and plan.missing == []


def test_a_forgotten_message_that_comes_back_is_looked_up_before_delivery() -> None:
    rows = {"k": row("k", polls=3, hours=30), "s": row("s", MessageState.SEEN, polls=3, hours=30)}
    plan = plan_poll(listing("k", "s"), KnownMessages(rows), KEEP, NOW, forgetting=RULE)
    assert [(d.info.uidl, d.recover, d.replaces_row) for d in plan.deliver] == [("k", True, True)]
    assert plan.gone == [] and plan.listed_again == ["s"] and plan.seen == 1


def test_forgotten_rows_are_not_counted_again() -> None:
    rows = {"k": row("k", polls=3, hours=30)}
    assert plan_poll([], KnownMessages(rows), KEEP, NOW, forgetting=RULE).missing == []


def test_a_retired_row_goes_with_its_delivery_or_at_once_when_over_the_size_limit() -> None:
    from connector.policies.limits import Limits

    rows = {u: row(u, MessageState.DELETED) for u in ("1", "2", "3")}
    big = [MessageInfo(1, "1", 100), MessageInfo(2, "2", 100), MessageInfo(3, "3", 5000)]
    limits = Limits(max_message_size=1000, max_messages_per_poll=1)
    plan = plan_poll(big, KnownMessages(rows), KEEP, NOW, limits, RULE)
    # "2" is left for a later poll with its row, still looked up first then.
    assert [(d.info.uidl, d.replaces_row) for d in plan.deliver] == [("1", True)] and plan.deferred == 1
    assert plan.oversize == [big[2]] and plan.gone == ["3"]


def test_due_deletions_are_planned_for_the_identity_check() -> None:
    rows = {"1": row("1"), "2": row("2")}
    plan = plan_poll(listing("1", "2"), KnownMessages(rows), RetentionPolicy(mode="days", days=7), NOW)
    assert [info.uidl for info in plan.delete] == ["1", "2"]


def test_with_identities_checked_delivers_the_other_message_instead_of_deleting_it() -> None:
    first, second, new = MessageInfo(1, "1", 100), MessageInfo(2, "2", 300), MessageInfo(3, "n", 5)
    plan = PollPlan(deliver=[Delivery(new, False, 0)], delete=[first, second], listed_again=["2"])
    checked = with_identities_checked(plan, [second])
    assert checked.delete == [first] and checked.gone == [] and checked.listed_again == []
    assert [(d.info, d.recover, d.replaces_row) for d in checked.deliver] == [
        (second, True, True),
        (new, False, False),
    ]
    assert with_identities_checked(plan, []) is plan


def test_rows_missing_before_do_not_look_like_a_migration() -> None:
    from connector.policies.uidl import suspect_migration

    rows = {u: row(u, polls=2, hours=30) for u in ("a", "b", "c", "d")}
    known = KnownMessages(rows, kept=frozenset({"e"}))
    assert listed_last_time(known) == KnownMessages({}, frozenset({"e"}))
    appeared = listing("e", "n1", "n2", "n3", "n4")
    assert suspect_migration(appeared, known) != []  # counted as vanished at once, they would
    assert suspect_migration(appeared, listed_last_time(known)) == []
    plain = KnownMessages({"a": row("a")})
    assert listed_last_time(plain) is plain


def test_another_message_over_the_size_limit_is_quarantined_not_fetched() -> None:
    from connector.policies.limits import Limits

    big = MessageInfo(1, "1", 5000)
    checked = with_identities_checked(PollPlan(delete=[big]), [big], Limits(max_message_size=1000))
    assert checked.deliver == [] and checked.delete == [] and checked.oversize == [big]
    assert checked.gone == ["1"]


def test_dry_run_names_missing_messages_and_a_sudden_loss() -> None:
    from connector.cli.report import dry_run_lines
    from connector.poll.result import PollResult

    plan = plan_poll([], KnownMessages(kept=frozenset({"k1", "k2"})), KEEP, NOW, forgetting=RULE)
    lines = dry_run_lines(PollResult(account="a", plan=plan))
    assert "  2 known but missing from this listing (counted, not forgotten yet)" in lines
    assert any(line.startswith("  problem: the server listed 0 message(s)") for line in lines)


def test_rows_this_connector_was_deleting_do_not_make_an_empty_listing_a_loss() -> None:
    """Killed after QUIT confirmed the DELEs but before they were recorded: every delivered row is still
    ``delivered``, due for deletion (not ``kept``), and the server lists nothing. That is our own DELE, not
    a locked maildrop: no sudden loss is reported, the rows are only counted missing (forgotten later)."""
    due = {u: row(u) for u in ("1", "2", "3", "4", "5")}
    plan = plan_poll([], KnownMessages(due), RetentionPolicy(mode="delete"), NOW, forgetting=RULE)
    assert plan.sudden_loss is None and plan.gone == [] and plan.missing == ["1", "2", "3", "4", "5"]
    # Mail it kept, or not yet delivered, still makes the same empty listing a sudden loss.
    pending = {u: row(u, MessageState.PENDING) for u in ("6", "7", "8", "9")}
    plan = plan_poll(
        [], KnownMessages({**due, **pending}), RetentionPolicy(mode="delete"), NOW, forgetting=RULE
    )
    assert plan.sudden_loss is not None and "4 of the 4" in plan.sudden_loss
