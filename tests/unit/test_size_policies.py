"""How far the POP3 server's sizes are trusted (issue 11, cases 2 and 8): a RETR far shorter than LIST, the
hard size ceiling, the spool's free space. The pure rules, the checks around a fetch, the configuration
and the metric."""

from __future__ import annotations

import errno
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connector.config import DEFAULT_MESSAGE_SIZE_CEILING, RetentionPolicy, load_config
from connector.errors import SourceShortReplyError, SpoolError
from connector.ledger.records import KnownMessages
from connector.message import MessageSpool
from connector.ops.metrics import PollMetrics
from connector.policies.limits import Limits
from connector.policies.sizes import (
    SHORT_RETR_MIN_GAP,
    SPOOL_MARGIN,
    SPOOL_SPACE_CHECK_FROM,
    implausibly_short,
    spool_room_needed,
    spool_shortfall,
)
from connector.poll.events import Finished
from connector.poll.fetch import check_retr_size, check_spool_space, fetch, max_retr_bytes
from connector.poll.plan import Delivery, PollPlan, plan_poll, within_ceiling
from connector.poll.result import PollResult
from connector.pop3 import MessageInfo, connect_pop3
from tests.messages import simple
from tests.servers.scripted_pop3 import ScriptedPop3Server, StoredMessage
from tests.unit.test_config import BASE, error_of, write

MIB = 1024 * 1024
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


# --- a RETR far shorter than LIST ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("list_size", "retr_size", "short"),
    [
        (20_000, 60, True),  # the reproduction: a few header lines for a 20 KB message
        (20_480, 0, True),  # an empty body
        (100_000, 49_000, True),  # under half and far apart
        (20_000, 9_999, True),
        (20_000, 10_001, False),  # just over half: an estimated LIST size (Exchange) may be that far off
        (20_000, 11_000, False),
        (5_000, 113, False),  # under half, but a small message: within what estimates and rounding give
        (SHORT_RETR_MIN_GAP + 100, 100, False),  # a gap of exactly the minimum is not enough
        (SHORT_RETR_MIN_GAP + 100, 99, True),
        (20_000, 20_042, False),  # GNU Mailutils adds an X-UIDL: header that LIST did not count
        (19_750, 20_000, False),  # an mbox server counts LF line endings, the wire has CRLF
        (20_480, 20_000, False),  # HP OpenMail rounded LIST sizes to 1024
        (5_000, 0, True),  # nothing at all, for a message LIST says has content
        (1, 0, True),
        (0, 0, False),
        (0, 500, False),  # no size known (a UIDL-only listing)
    ],
)
def test_short_retr_rule_fires_only_on_gross_shortfalls(list_size: int, retr_size: int, short: bool) -> None:
    assert implausibly_short(list_size, retr_size) is short


def test_short_retr_is_a_message_error_naming_both_sizes() -> None:
    info = MessageInfo(3, "uid-3", 20_000)
    check_retr_size(info, 19_000)  # within reason: nothing raised
    with pytest.raises(SourceShortReplyError) as caught:
        check_retr_size(info, 60)
    assert (caught.value.list_size, caught.value.retr_size, caught.value.uidl) == (20_000, 60, "uid-3")
    assert "RETR returned 60 bytes but LIST gives 20000 bytes" in caught.value.message
    assert "message 'uid-3'" in str(caught.value)


# --- the hard size ceiling ------------------------------------------------------------------------------


def test_over_the_ceiling_is_skipped_whatever_the_oversize_action() -> None:
    limits = Limits(max_message_size=1000, oversize="headers_only", ceiling=5000)
    assert limits.oversize_action(1000) is None
    assert limits.oversize_action(5000) == "headers_only"
    assert limits.oversize_action(5001) == "skip"
    assert "over message_size_ceiling (5000)" in limits.skip_reason(5001)
    assert "over max_message_size (1000)" in limits.skip_reason(2000)
    assert Limits().oversize_action(10**17) == "skip"  # the default ceiling applies without any limit set


def test_an_absurd_list_size_is_planned_as_oversize() -> None:
    listing = [
        MessageInfo(1, "a", 100),
        MessageInfo(2, "absurd", 999_999_999_999_999_999),  # 18 digits, the most a LIST line may give
        MessageInfo(3, "c", 5),
    ]
    plan = plan_poll(listing, KnownMessages(), RetentionPolicy(), NOW, Limits())
    assert [d.info.uidl for d in plan.deliver] == ["a", "c"]
    assert [i.uidl for i in plan.oversize] == ["absurd"]


def test_within_ceiling_moves_deliveries_sized_after_planning() -> None:
    a, big = MessageInfo(1, "a", 100), MessageInfo(2, "big", 6000)
    plan = PollPlan(
        deliver=[Delivery(a, False, 0), Delivery(big, True, 1)], oversize=[MessageInfo(9, "o", 1)]
    )
    moved = within_ceiling(plan, Limits(ceiling=5000))
    assert [d.info for d in moved.deliver] == [a] and moved.oversize == [MessageInfo(9, "o", 1), big]
    assert within_ceiling(plan, Limits()) is plan


def test_retr_bound_is_capped_by_the_ceiling() -> None:
    info = MessageInfo(1, "a", 10_000)
    assert max_retr_bytes(info) == 20_000 + 16 * MIB
    assert max_retr_bytes(info, 64 * 1024) == 64 * 1024
    assert max_retr_bytes(MessageInfo(1, "a", 10**17), DEFAULT_MESSAGE_SIZE_CEILING) == 200 * MIB


def test_ceiling_configuration(tmp_path: Path) -> None:
    (account,) = load_config(write(tmp_path, BASE)).accounts
    assert account.message_size_ceiling == DEFAULT_MESSAGE_SIZE_CEILING == 200 * MIB
    text = BASE.replace("[[destinations]]", '[defaults]\nmessage_size_ceiling = "1G"\n\n[[destinations]]')
    (account,) = load_config(write(tmp_path, text)).accounts
    assert account.message_size_ceiling == 1024 * MIB
    (account,) = load_config(write(tmp_path, text + 'message_size_ceiling = "50MB"\n')).accounts
    assert account.message_size_ceiling == 50 * MIB


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('message_size_ceiling = "lots"\n', "accounts[0].message_size_ceiling: 'lots' is not a size"),
        ("message_size_ceiling = 0\n", "accounts[0].message_size_ceiling: a size must be positive"),
        (
            'max_message_size = "300MB"\n',
            "accounts[0]: max_message_size (314572800 bytes) is above message_size_ceiling (209715200 bytes)",
        ),
    ],
)
def test_bad_ceiling_is_a_precise_config_error(tmp_path: Path, extra: str, expected: str) -> None:
    assert expected in error_of(tmp_path, BASE + extra)


def test_a_limit_above_the_default_ceiling_is_refused_in_defaults(tmp_path: Path) -> None:
    text = BASE.replace("[[destinations]]", '[defaults]\nmax_message_size = "1G"\n\n[[destinations]]')
    assert "defaults: max_message_size (1073741824 bytes) is above message_size_ceiling" in error_of(
        tmp_path, text
    )


# --- the spool's free space -----------------------------------------------------------------------------


def test_spool_room_is_needed_only_for_messages_that_go_to_disk() -> None:
    assert spool_room_needed(SPOOL_SPACE_CHECK_FROM) is None
    assert spool_room_needed(SPOOL_SPACE_CHECK_FROM + 1) == SPOOL_SPACE_CHECK_FROM + 1 + SPOOL_MARGIN
    assert spool_shortfall(100, 0) is None
    assert spool_shortfall(10 * MIB, 10 * MIB + SPOOL_MARGIN) is None
    assert spool_shortfall(10 * MIB, 10 * MIB + SPOOL_MARGIN - 1) == 10 * MIB + SPOOL_MARGIN


def _free(free: int) -> object:
    return lambda path: shutil.disk_usage(path)._replace(free=free)


def test_spool_space_check_reads_the_spool_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[str] = []
    monkeypatch.setattr("connector.poll.fetch.spool_directory", lambda: str(tmp_path))

    def usage(path: str) -> object:
        seen.append(path)
        return shutil.disk_usage(path)

    monkeypatch.setattr("connector.poll.fetch.disk_usage", usage)
    check_spool_space(MessageInfo(1, "small", 1000))
    assert seen == []  # stays in memory: no system call
    check_spool_space(MessageInfo(1, "big", 2 * MIB))
    assert seen == [str(tmp_path)]
    monkeypatch.setattr("connector.poll.fetch.disk_usage", _free(10 * MIB))
    with pytest.raises(SpoolError) as caught:
        check_spool_space(MessageInfo(1, "big", 2 * MIB))
    text = caught.value.message
    assert f"spool directory {tmp_path} has {10 * MIB} bytes free" in text and "message 'big'" in text


def test_unreadable_spool_space_is_a_spool_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: str) -> object:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("connector.poll.fetch.disk_usage", broken)
    with pytest.raises(
        SpoolError, match=r"cannot read the free space of the spool directory .*Permission denied"
    ):
        check_spool_space(MessageInfo(1, "big", 2 * MIB))


class _FullDisk(MessageSpool):
    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_spool_that_cannot_be_written_is_a_spool_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (account,) = load_config(write(tmp_path, BASE)).accounts
    monkeypatch.setattr("connector.poll.fetch.spool_for", lambda account, info: _FullDisk(info.uidl, "<x@y>"))
    server = ScriptedPop3Server([StoredMessage("uid-1", simple(1))])
    with server, connect_pop3(server.host, server.port, tls="none", ssl_context=None, timeout=5) as pop:
        pop.login("alice", "secret")
        info = MessageInfo(1, "uid-1", server.messages[0].size)
        with pytest.raises(SpoolError, match=r"cannot write message 'uid-1' to the spool.*No space left"):
            fetch(pop, account, info)


# --- the metric -----------------------------------------------------------------------------------------


def test_short_retrs_are_counted_over_the_service() -> None:
    metrics = PollMetrics()
    metrics.notify(Finished("alice", PollResult("alice", failed=1, short_retrs=1), 0.0, planned=1))
    metrics.notify(
        Finished("alice", PollResult("alice", failed=2, quarantined=1, short_retrs=2), 0.0, planned=2)
    )
    metrics.notify(Finished("bob", PollResult("bob", failed=1, short_retrs=1), 0.0, planned=1))
    text = metrics.render().decode()
    assert "\npop_connector_short_retrs_total 4.0\n" in text
