"""Catch-all delivery through the CLI: SIGKILL between the recipients of a message, then a rerun (each
mailbox gets each message exactly once, and the POP3 copy is deleted only after all of them have it); the
master password never appears in a protocol log."""

from __future__ import annotations

import base64
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli, catch_all_config
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance


def _for_three(n: int) -> bytes:
    to = b"To: alice@example.org, bob@example.org, x@sales.example.org\r\n"
    return simple(n).replace(b"To: alice@example.net\r\n", to)


@pytest.mark.parametrize(
    ("point", "nth", "copies_before_rerun"),
    [
        ("before-append", 3, 2),  # alice and bob have message 0, carol not yet
        ("before-recipient-record", 2, 2),  # bob's copy arrived, its record did not
        ("before-recipient-record", 4, 4),  # message 0 complete, message 1 only at alice
    ],
)
def test_killed_between_recipients_then_rerun_delivers_only_the_missing(
    dovecot: Dovecot,
    mail_users: MailUsers,
    write_cfg: Callable[..., Path],
    run_cli: RunCli,
    point: str,
    nth: int,
    copies_before_rerun: int,
) -> None:
    people = [dovecot.new_user(name) for name in ("alice", "bob", "carol")]
    messages = [_for_three(0), _for_three(1)]
    dovecot.seed(mail_users.source.name, messages)
    addresses = ("alice@example.org", "bob@example.org", "*@sales.example.org")
    config = catch_all_config(write_cfg, dovecot, {a: p.name for a, p in zip(addresses, people, strict=True)})
    args = ("--config", str(config), "sync")
    crashed = run_cli(point, str(nth), "--", *args, module="tests.acceptance.crash_driver")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert dovecot.maildir_count(mail_users.source.name) == 2  # nothing deleted before QUIT
    assert sum(len(dovecot.imap_messages(p.name)) for p in people) == copies_before_rerun

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for person in people:
        bodies = dovecot.imap_messages(person.name)
        assert len(bodies) == 2, person.name
        for original in messages:
            assert sum(original in body for body in bodies) == 1, person.name
    assert dovecot.maildir_count(mail_users.source.name) == 0
    if point == "before-recipient-record":
        assert "recovered=1" in rerun.stdout
    third = run_cli(*args)
    assert third.returncode == 0 and "delivered=0 recovered=0" in third.stdout
    for person in people:
        dovecot.remove_user(person.name)


def test_master_password_never_in_the_output_or_protocol_log(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli, tmp_path: Path
) -> None:
    alice = dovecot.new_user("alice")
    dovecot.seed(mail_users.source.name, [_for_three(0)])
    logs = tmp_path / "protocol-logs"
    config = catch_all_config(
        write_cfg,
        dovecot,
        {"alice@example.org": alice.name},
        account={"protocol_log": True},
        service={"protocol_log_dir": str(logs)},
    )
    sync = run_cli("--config", str(config), "--log-level", "DEBUG", "sync")
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert len(dovecot.imap_messages(alice.name)) == 1
    text = sync.stdout + sync.stderr + "".join(path.read_text() for path in logs.iterdir())
    assert "AUTHENTICATE" in text
    secret = dovecot.master.password
    plain = base64.b64encode(f"{alice.name}\0{dovecot.master.name}\0{secret}".encode()).decode()
    assert secret not in text and plain not in text
    dovecot.remove_user(alice.name)
