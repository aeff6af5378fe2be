"""Identical copies under one identity (issue 11.6): ``policies.uidl.key_twins`` matches ledger rows to
listed copies by count. Each case is a situation a crash, a partial deletion or another client can leave."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from connector.config import RetentionPolicy
from connector.ledger.records import KnownMessage, KnownMessages, MessageState
from connector.policies.uidl import TWIN_SEPARATOR, is_hashed, key_twins, twin_key
from connector.poll.plan import plan_poll
from connector.pop3 import MessageInfo

NOW = datetime(2026, 12, 6, tzinfo=UTC)
IDENT = "x/hdr:" + "a" * 64
D, P, X, F, S = (
    MessageState.DELIVERED,
    MessageState.PENDING,
    MessageState.DELETED,
    MessageState.FAILED,
    MessageState.SEEN,
)


def copies(count: int, identity: str = IDENT, size: int = 100) -> list[MessageInfo]:
    return [MessageInfo(n, identity, size) for n in range(1, count + 1)]


def ledger(*rows: tuple[str, MessageState], kept: tuple[str, ...] = ()) -> KnownMessages:
    return KnownMessages(
        {key: KnownMessage(key, state, 0, NOW, None, None, None) for key, state in rows}, frozenset(kept)
    )


def keys(listing: list[MessageInfo]) -> list[str]:
    return [info.uidl for info in listing]


def k(copy: int) -> str:
    return twin_key(IDENT, copy)


def test_keys_can_never_be_a_uidl() -> None:
    assert k(1) == IDENT and k(3) == IDENT + " #3" and " " in TWIN_SEPARATOR
    assert is_hashed(IDENT) and is_hashed("hdr:abc") and not is_hashed("x") and is_hashed(k(2))


def test_new_copies_get_a_key_each() -> None:
    twins = key_twins(copies(3), KnownMessages())
    assert keys(twins.listing) == [k(1), k(2), k(3)]
    assert (twins.copies, twins.unresolved, twins.doubtful) == (2, 0, frozenset())


def test_unique_messages_are_left_as_they_are() -> None:
    listing = [MessageInfo(1, "a", 10), MessageInfo(2, IDENT, 10)]
    assert key_twins(listing, ledger((IDENT, D))).listing == listing


@pytest.mark.parametrize(
    ("listed", "rows", "expected", "new"),
    [
        # Both delivered and kept: nothing to do.
        (2, [(k(1), D), (k(2), D)], [k(1), k(2)], 0),
        # Copy 1 delivered, DELEted, crash before QUIT: the server still has both; one is new.
        (2, [(k(1), D)], [k(1), k(2)], 1),
        # Copy 1 delivered and removed (QUIT confirmed): the one left is new, never the deleted row's key.
        (1, [(k(1), X)], [k(2)], 1),
        # Both delivered, DELE both, QUIT removed one and was not confirmed: the one left is delivered.
        (1, [(k(1), D), (k(2), D)], [k(1)], 0),
        # Both confirmed deleted, yet one is listed again: a new copy (popa3d: same content, same UIDL).
        (1, [(k(1), X), (k(2), X)], [k(3)], 1),
        # Delivered rows are matched first, so that no copy is delivered again.
        (1, [(k(1), P), (k(2), D)], [k(2)], 0),
        (2, [(k(1), F), (k(2), S), (k(3), D)], [k(3), k(1)], 0),
    ],
)
def test_rows_are_matched_by_count(
    listed: int, rows: list[tuple[str, MessageState]], expected: list[str], new: int
) -> None:
    known = ledger(*rows)
    twins = key_twins(copies(listed), known)
    assert keys(twins.listing) == expected
    plan = plan_poll(twins.listing, known, RetentionPolicy(mode="keep"), NOW)
    assert plan.new_count == new and plan.duplicates == []


def test_kept_rows_count_as_delivered() -> None:
    twins = key_twins(copies(3), ledger(kept=(k(1), k(2))))
    assert keys(twins.listing) == [k(1), k(2), k(3)]


def test_the_plain_uidl_of_the_first_copy_joins() -> None:
    """Delivered under its plain UIDL "x" before an identical copy made "x" a duplicate."""
    twins = key_twins(copies(2), ledger(kept=("x",)))
    assert keys(twins.listing) == ["x", k(1)]
    # Whose header hash says it was another message, it does not.
    other = KnownMessages({"x": KnownMessage("x", D, 0, NOW, None, None, None, header_hash="b" * 64)})
    assert keys(key_twins(copies(2), other).listing) == [k(1), k(2)]


OTHER = "x/hdr:" + "c" * 64
# "x" listed for two different messages: the one delivered as "x" (IDENT) and a new one (OTHER).
DIFFERENT = [MessageInfo(1, IDENT, 100), MessageInfo(2, OTHER, 120)]


def plain_row(state: MessageState = D, digest: str | None = "a" * 64) -> KnownMessage:
    return KnownMessage("x", state, 0, NOW, None, None, None, pop_size=100, header_hash=digest)


def test_the_plain_row_joins_the_different_message_its_header_hash_names() -> None:
    """Found by the idle probe's tests: "x" delivered, then a new message listed as "x" too. The row is
    that copy's, whichever order they are listed in; the other is new and delivered once."""
    for listing in (DIFFERENT, DIFFERENT[::-1]):
        known = KnownMessages({"x": plain_row()})
        twins = key_twins(listing, known)
        assert {info.number: info.uidl for info in twins.listing} == {1: "x", 2: OTHER}
        assert twins.ambiguous == 0
        plan = plan_poll(twins.listing, known, RetentionPolicy(mode="keep"), NOW)
        assert [d.info.uidl for d in plan.deliver] == [OTHER] and plan.duplicates == []
    # Kept, the row comes in full through ``recorded`` (the ledger gives kept rows by UIDL only).
    kept = ledger(kept=("x",))
    twins = key_twins(DIFFERENT, kept, {"x": plain_row()})
    assert keys(twins.listing) == ["x", OTHER]
    assert [
        d.info.uidl for d in plan_poll(twins.listing, kept, RetentionPolicy(mode="keep"), NOW).deliver
    ] == [OTHER]
    # The row's message gone and both listed ones new: both delivered, the row left to go missing.
    gone = KnownMessages({"x": plain_row(digest="d" * 64)})
    assert keys(key_twins(DIFFERENT, gone).listing) == keys(DIFFERENT)


def test_a_plain_row_without_header_hash_leaves_different_messages_on_the_server() -> None:
    """A row written before header hashes were recorded cannot tell which of the messages listed under its
    UIDL it is about: all are left on the server under the plain UIDL (a duplicate to the plan, reported),
    so that none is delivered twice and the row, listed, is never forgotten."""
    for known, recorded in (
        (KnownMessages({"x": plain_row(digest=None)}), None),
        (ledger(kept=("x",)), {"x": plain_row(digest=None)}),
        (ledger(kept=("x",)), None),  # a kept row not read in full: its header hash is unknown
        (KnownMessages({"x": plain_row(P, digest=None)}), None),
    ):
        twins = key_twins(DIFFERENT, known, recorded)
        assert keys(twins.listing) == ["x", "x"] and twins.ambiguous == 2
        plan = plan_poll(twins.listing, known, RetentionPolicy(mode="delete"), NOW)
        assert (plan.deliver, plan.delete, plan.duplicates, plan.missing) == ([], [], ["x"], [])
    # Identical copies (one identity) are the row's message and a copy of it, as before.
    assert keys(key_twins(copies(2), KnownMessages({"x": plain_row(digest=None)})).listing) == ["x", k(1)]
    # A row the server confirmed deleted is about none of them: both are new.
    deleted = KnownMessages({"x": plain_row(X, digest=None)})
    assert keys(key_twins(DIFFERENT, deleted).listing) == keys(DIFFERENT)


def test_copies_of_different_sizes_are_left_alone() -> None:
    listing = [MessageInfo(1, IDENT, 100), MessageInfo(2, IDENT, 101)]
    twins = key_twins(listing, KnownMessages())
    assert twins.listing == listing and twins.unresolved == 2 and twins.copies == 0
    assert plan_poll(twins.listing, KnownMessages(), RetentionPolicy(), NOW).duplicates == [IDENT]


def test_pending_copies_are_doubtful_when_a_sibling_may_be_in_the_destination() -> None:
    assert key_twins(copies(2), ledger((k(1), D), (k(2), P))).doubtful == {k(2)}
    assert key_twins(copies(2), ledger((k(1), P), (k(2), P))).doubtful == {k(1), k(2)}
    # A further copy's siblings may be forgotten already: still doubtful.
    assert key_twins(copies(1), ledger((k(2), P))).doubtful == {k(2)}
    # The first copy alone, pending: an ordinary recovery.
    assert key_twins(copies(1), ledger((k(1), P))).doubtful == frozenset()


def test_no_uidl_server_twins() -> None:
    identity = "hdr:" + "d" * 64
    twins = key_twins(copies(2, identity), ledger((identity, X)))
    assert keys(twins.listing) == [twin_key(identity, 2), twin_key(identity, 3)]
