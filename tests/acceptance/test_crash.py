"""SIGKILL at each step of a delivery, then a rerun: every message arrives exactly once, none is lost."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance


@pytest.mark.parametrize(
    ("point", "delivered_before_crash"),
    [
        ("before-pending", 2),
        ("before-append", 2),
        ("before-delivered-record", 3),  # the 3rd message reached the destination, its record did not
        ("before-quit", 5),
    ],
)
@pytest.mark.parametrize("retention", ["delete", "keep"])
def test_killed_then_rerun_delivers_exactly_once(
    dovecot: Dovecot,
    mail_users: MailUsers,
    write_cfg: Callable[..., Path],
    run_cli: RunCli,
    point: str,
    delivered_before_crash: int,
    retention: str,
) -> None:
    messages = [simple(n) for n in range(5)]
    messages[2] = simple(2, message_id=False)  # recovery must also work for an ID the connector added
    dovecot.seed(mail_users.source.name, messages)
    config = str(write_cfg(account={"retention": retention}))
    nth = "1" if point == "before-quit" else "3"
    crashed = run_cli(point, nth, "--", "--config", config, "sync", module="tests.acceptance.crash_driver")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # The server deletes nothing before QUIT, so nothing can be lost.
    assert dovecot.maildir_count(mail_users.source.name) == 5
    assert len(dovecot.imap_messages(mail_users.destination.name)) == delivered_before_crash

    rerun = run_cli("--config", config, "sync")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    bodies = dovecot.imap_messages(mail_users.destination.name)
    assert len(bodies) == 5
    assert sorted(bodies) == sorted(set(bodies))  # no duplicates
    for original in messages:
        assert sum(original in body for body in bodies) == 1
    expected_left = 0 if retention == "delete" else 5
    assert dovecot.maildir_count(mail_users.source.name) == expected_left
    if point == "before-delivered-record":
        assert "recovered=1" in rerun.stdout

    third = run_cli("--config", config, "sync")
    assert third.returncode == 0 and "delivered=0 recovered=0" in third.stdout


@pytest.mark.parametrize("point", ["before-multiappend", "after-multiappend"])
@pytest.mark.parametrize("retention", ["delete", "keep"])
def test_killed_around_a_batch_then_rerun_delivers_exactly_once(
    dovecot: Dovecot,
    mail_users: MailUsers,
    write_cfg: Callable[..., Path],
    run_cli: RunCli,
    point: str,
    retention: str,
) -> None:
    messages = [simple(n) for n in range(8)]
    messages[4] = simple(4, message_id=False)
    dovecot.seed(mail_users.source.name, messages)
    config = str(write_cfg(account={"retention": retention}))
    crashed = run_cli(point, "1", "--", "--config", config, "sync", module="tests.acceptance.crash_driver")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert dovecot.maildir_count(mail_users.source.name) == 8
    # All eight in the first batch (the session was opened while they were fetched), which the kill left
    # unsent or stored but unrecorded.
    stored_before = len(dovecot.imap_messages(mail_users.destination.name))
    assert stored_before == (0 if point == "before-multiappend" else 8)

    rerun = run_cli("--config", config, "sync")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    bodies = dovecot.imap_messages(mail_users.destination.name)
    assert len(bodies) == 8
    for original in messages:
        assert sum(original in body for body in bodies) == 1
    assert dovecot.maildir_count(mail_users.source.name) == (0 if retention == "delete" else 8)
    recovered = 8 if point == "after-multiappend" else 0
    assert f"recovered={recovered}" in rerun.stdout, rerun.stdout
