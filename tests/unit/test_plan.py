"""The poll plan: what is new, what is recovered, what is deleted and what is forgotten."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from connector.config import RetentionPolicy
from connector.ledger.records import KnownMessage, KnownMessages, MessageState
from connector.policies.limits import Limits, headers_only_message, needs_baseline
from connector.poll.plan import plan_poll
from connector.pop3 import MessageInfo

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
DELETE = RetentionPolicy(mode="delete")


def known(
    uidl: str, state: MessageState, *, attempts: int = 1, delivered_days_ago: float | None = None
) -> KnownMessage:
    delivered_at = None if delivered_days_ago is None else NOW - timedelta(days=delivered_days_ago)
    return KnownMessage(uidl, state, attempts, delivered_at, "<id@x>", 10, "0" * 64)


def listing(*uidls: str) -> list[MessageInfo]:
    return [MessageInfo(number, uidl, 100 * number) for number, uidl in enumerate(uidls, start=1)]


def test_everything_new_on_first_poll_in_server_order() -> None:
    plan = plan_poll(listing("a", "b", "c"), KnownMessages(), DELETE, NOW)
    assert [d.info.uidl for d in plan.deliver] == ["a", "b", "c"]
    assert not any(d.recover for d in plan.deliver)
    assert plan.new_count == 3 and plan.delete == [] and plan.gone == []


def test_second_poll_delivers_nothing_for_delivered_and_kept() -> None:
    rows = {u: known(u, MessageState.DELIVERED, delivered_days_ago=0) for u in "ab"}
    plan = plan_poll(listing("a", "b"), KnownMessages(rows), RetentionPolicy(mode="keep"), NOW)
    assert plan.deliver == [] and plan.delete == []


def test_delivered_but_still_on_server_is_deleted_under_delete() -> None:
    rows = {"a": known("a", MessageState.DELIVERED, delivered_days_ago=0)}
    plan = plan_poll(listing("a", "b"), KnownMessages(rows), DELETE, NOW)
    assert [i.uidl for i in plan.delete] == ["a"]
    assert [d.info.uidl for d in plan.deliver] == ["b"]


def test_days_retention() -> None:
    rows = {
        "old": known("old", MessageState.DELIVERED, delivered_days_ago=20),
        "young": known("young", MessageState.DELIVERED, delivered_days_ago=2),
    }
    plan = plan_poll(listing("old", "young"), KnownMessages(rows), RetentionPolicy(mode="days", days=14), NOW)
    assert [i.uidl for i in plan.delete] == ["old"]


def test_pending_is_recovered_with_its_attempts() -> None:
    rows = {"a": known("a", MessageState.PENDING, attempts=3)}
    plan = plan_poll(listing("a"), KnownMessages(rows), DELETE, NOW)
    assert plan.deliver[0].recover and plan.deliver[0].attempts == 3
    assert plan.new_count == 0


def test_failed_stays_quarantined() -> None:
    rows = {"a": known("a", MessageState.FAILED, attempts=5)}
    plan = plan_poll(listing("a"), KnownMessages(rows), DELETE, NOW)
    assert plan.deliver == [] and plan.delete == [] and plan.quarantined == 1


def test_deleted_rows_are_pruned_and_never_decide_a_dele() -> None:
    rows = {u: known(u, MessageState.DELETED, delivered_days_ago=1) for u in ("x", "y")}
    plan = plan_poll(listing("x"), KnownMessages(rows), RetentionPolicy(mode="keep"), NOW)
    # "x" is listed again after QUIT removed it: another message under a UIDL used again (or a deletion
    # the server did not carry out): delivered, looked up in the destination first, never DELEted unseen.
    assert plan.gone == ["y"] and plan.delete == [] and plan.missing == []
    # Its row goes just before the message is recorded (a crash before that keeps the lookup).
    assert [(d.info.uidl, d.recover, d.attempts, d.replaces_row) for d in plan.deliver] == [
        ("x", True, 0, True)
    ]


def test_duplicate_uidls_are_left_alone() -> None:
    plan = plan_poll(listing("a", "dup", "b", "dup"), KnownMessages(), DELETE, NOW)
    assert [d.info.uidl for d in plan.deliver] == ["a", "b"]
    assert plan.duplicates == ["dup"]


def test_large_mailbox_is_a_set_difference() -> None:
    uidls = [f"u{i:06d}" for i in range(100_000)]
    rows = {u: known(u, MessageState.DELIVERED, delivered_days_ago=0) for u in uidls[:-10]}
    plan = plan_poll(listing(*uidls), KnownMessages(rows), RetentionPolicy(mode="keep"), NOW)
    assert [d.info.uidl for d in plan.deliver] == uidls[-10:]
    # The same, with the delivered messages named only (as the ledger hands them over for "keep").
    plan = plan_poll(
        listing(*uidls), KnownMessages(kept=frozenset(uidls[:-10])), RetentionPolicy(mode="keep"), NOW
    )
    assert [d.info.uidl for d in plan.deliver] == uidls[-10:] and plan.delete == [] and plan.gone == []


def test_known_messages_are_every_uidl_of_rows_and_kept() -> None:
    known_messages = KnownMessages({"p": known("p", MessageState.PENDING)}, kept=frozenset({"k"}))
    assert "p" in known_messages and "k" in known_messages and "x" not in known_messages
    assert len(known_messages) == 2 and sorted(known_messages) == ["k", "p"]
    assert not KnownMessages()


def test_kept_messages_are_neither_delivered_nor_deleted_but_recognised() -> None:
    rows = {"p": known("p", MessageState.PENDING, attempts=2), "gone": known("gone", MessageState.FAILED)}
    known_messages = KnownMessages(rows, kept=frozenset({"k1", "k2", "k-gone", "dup"}))
    plan = plan_poll(listing("k1", "p", "new", "dup", "k2", "dup"), known_messages, DELETE, NOW)
    assert [(d.info.uidl, d.recover) for d in plan.deliver] == [("p", True), ("new", False)]
    assert plan.delete == [] and plan.duplicates == ["dup"]
    # Missing rows are counted, not forgotten at once (issue 11.4).
    assert plan.gone == [] and plan.missing == ["gone", "k-gone"] and plan.sudden_loss is None


# --- limits and selection (issue 4) -------------------------------------------------------------------


def test_oversize_skip_is_quarantined_without_delivery() -> None:
    limits = Limits(max_message_size=250)
    plan = plan_poll(listing("a", "b", "c"), KnownMessages(), DELETE, NOW, limits)  # sizes 100, 200, 300
    assert [d.info.uidl for d in plan.deliver] == ["a", "b"]
    assert [i.uidl for i in plan.oversize] == ["c"]


def test_oversize_headers_only_is_delivered_as_headers_and_never_deleted() -> None:
    limits = Limits(max_message_size=250, oversize="headers_only")
    plan = plan_poll(listing("a", "b", "c"), KnownMessages(), DELETE, NOW, limits)
    assert [(d.info.uidl, d.headers_only) for d in plan.deliver] == [("a", False), ("b", False), ("c", True)]
    delivered = KnownMessage("c", MessageState.DELIVERED, 1, NOW, "<c@x>", 10, "0" * 64, headers_only=True)
    assert plan_poll(listing("c"), KnownMessages({"c": delivered}), DELETE, NOW, limits).delete == []


def test_max_messages_per_poll_takes_the_oldest() -> None:
    plan = plan_poll(
        listing("a", "b", "c", "d"), KnownMessages(), DELETE, NOW, Limits(max_messages_per_poll=3)
    )
    assert [d.info.uidl for d in plan.deliver] == ["a", "b", "c"] and plan.deferred == 1


def test_seen_rows_are_neither_delivered_nor_deleted() -> None:
    rows = {"a": known("a", MessageState.SEEN, attempts=0)}
    plan = plan_poll(listing("a", "b"), KnownMessages(rows), DELETE, NOW)
    assert [d.info.uidl for d in plan.deliver] == ["b"] and plan.delete == [] and plan.seen == 1


def test_baseline_only_for_a_new_account_starting_new() -> None:
    assert needs_baseline("new", False, {})
    assert not needs_baseline("new", True, {})
    assert not needs_baseline("new", False, {"a": object()})
    assert not needs_baseline("all", False, {})


def test_headers_only_message_keeps_headers_and_replaces_the_body() -> None:
    top = (
        b"Subject: big one\r\nContent-Type: multipart/mixed;\r\n boundary=xyz\r\n"
        b"Message-ID: <big@x>\r\nMIME-Version: 1.0\r\n\r\n"
    )
    built = headers_only_message(top, 50_000_000, 26_214_400)
    head, _, body = built.partition(b"\r\n\r\n")
    assert b"Subject: big one" in head and b"Message-ID: <big@x>" in head
    assert b"boundary" not in head and head.count(b"MIME-Version") == 1
    assert b"Content-Type: text/plain" in head and b"50000000 bytes" in body
    assert built == headers_only_message(top, 50_000_000, 26_214_400)  # deterministic for recovery


def test_headers_only_message_takes_only_the_header_section() -> None:
    # A server that sends body lines after an empty header section despite TOP n 0: none is a header.
    built = headers_only_message(b"\r\nbody: not a header\r\n\r\nlater body\r\n", 50_000_000, 26_214_400)
    assert b"body: not a header" not in built and b"later body" not in built
    # Without a blank line (the TOP reply was all header section), every line is kept.
    built = headers_only_message(b"Subject: s\r\nFrom: a@x\r\n", 50_000_000, 26_214_400)
    assert built.startswith(b"Subject: s\r\nFrom: a@x\r\nMIME-Version: 1.0\r\n")


def test_messages_among_kept_ones_are_decided_in_server_order_however_many() -> None:
    # Issue 16: the messages to decide are found by a set difference with the kept ones, then located in
    # the listing (few: from its end; many: in one pass); either way in server order, duplicates left out.
    keep = RetentionPolicy(mode="keep")
    for new in (3, 1500):
        uidls = [f"k{n}" if n % 3 else f"n{n}" for n in range(3 * new)] + ["dup", "dup"]
        kept = frozenset(uidl for uidl in uidls if uidl.startswith("k"))
        plan = plan_poll(listing(*uidls), KnownMessages({}, kept), keep, NOW)
        assert [d.info.uidl for d in plan.deliver] == [uidl for uidl in uidls if uidl.startswith("n")]
        assert plan.duplicates == ["dup"] and plan.missing == []
        assert [d.info.number for d in plan.deliver] == [n + 1 for n in range(0, 3 * new, 3)]
