"""The Dovecot fixture itself: what is seeded can be read over POP3 (plain, STLS, implicit TLS) and IMAP."""

from __future__ import annotations

import poplib
import ssl
import time

import pytest
from imapclient import IMAPClient

from tests.servers.dovecot import Dovecot, DovecotError, MailUsers

pytestmark = pytest.mark.integration

MESSAGES = [
    (
        f"From: sender{i}@example.com\r\nTo: alice@example.com\r\nSubject: message {i}\r\n"
        f"Message-ID: <fixture-{i}@example.com>\r\n\r\nBody {i}\r\nsecond line\r\n"
    ).encode()
    for i in range(3)
]


def _retr_all(client: poplib.POP3, user: str, password: str) -> list[bytes]:
    client.user(user)
    client.pass_(password)
    count, _size = client.stat()
    bodies = [b"\r\n".join(client.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
    client.quit()
    return bodies


def _context(dovecot: Dovecot) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.ca_file))


def test_seeded_messages_over_pop3_plain(dovecot: Dovecot, mail_users: MailUsers) -> None:
    user = mail_users.source
    dovecot.seed(user.name, MESSAGES)
    client = poplib.POP3(dovecot.host, dovecot.ports.pop3, timeout=10)
    assert _retr_all(client, user.name, user.password) == MESSAGES
    assert dovecot.maildir_count(user.name) == 3


def test_seeded_messages_over_pop3_stls(dovecot: Dovecot, mail_users: MailUsers) -> None:
    user = mail_users.source
    dovecot.seed(user.name, MESSAGES)
    client = poplib.POP3(dovecot.host, dovecot.ports.pop3, timeout=10)
    client.stls(context=_context(dovecot))
    assert _retr_all(client, user.name, user.password) == MESSAGES


def test_seeded_messages_over_pop3s(dovecot: Dovecot, mail_users: MailUsers) -> None:
    user = mail_users.source
    dovecot.seed(user.name, MESSAGES)
    client = poplib.POP3_SSL(dovecot.host, dovecot.ports.pop3s, context=_context(dovecot), timeout=10)
    assert _retr_all(client, user.name, user.password) == MESSAGES


def test_pop3s_rejects_an_unknown_ca(dovecot: Dovecot) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(dovecot.host, dovecot.ports.pop3s, context=ssl.create_default_context(), timeout=10)


def test_seeded_messages_over_imap(dovecot: Dovecot, mail_users: MailUsers) -> None:
    user = mail_users.source
    dovecot.seed(user.name, MESSAGES)
    assert dovecot.imap_messages(user.name) == MESSAGES
    assert [message.flags for message in dovecot.imap_fetch(user.name)] == [(), (), ()]
    assert dovecot.folders(user.name) == ["INBOX"]


def test_imaps_with_the_fixture_ca(dovecot: Dovecot, mail_users: MailUsers) -> None:
    user = mail_users.source
    dovecot.seed(user.name, MESSAGES[:1])
    with IMAPClient(dovecot.host, dovecot.ports.imaps, ssl_context=_context(dovecot), timeout=10) as client:
        client.login(user.name, user.password)
        assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 1


def test_users_added_while_running_can_log_in_at_once(dovecot: Dovecot) -> None:
    users = [dovecot.new_user("late") for _ in range(3)]
    try:
        for user in users:
            assert dovecot.folders(user.name) == ["INBOX"]
    finally:
        for user in users:
            dovecot.remove_user(user.name)


def test_quota_user_and_doveadm(dovecot: Dovecot) -> None:
    user = dovecot.new_user("quota", quota="20K")
    try:
        output = dovecot.doveadm("quota", "get", "-u", user.name).stdout.decode()
        assert "STORAGE" in output and "20" in output
    finally:
        dovecot.remove_user(user.name)


def _storage_limit_kib(dovecot: Dovecot, user: str) -> int:
    with dovecot.imap(user) as client:
        _roots, quotas = client.get_quota_root("INBOX")
    [quota] = [quota for quota in quotas if quota.resource == "STORAGE"]
    return int(quota.limit)


def test_a_replaced_user_is_seen_even_when_the_file_changed_within_the_same_second(
    dovecot: Dovecot,
) -> None:
    # Dovecot re-reads a passwd-file only when its mtime (whole seconds) or its size changed. Quota "1K"
    # replaced by "1M" is the same size, so a replacement in the second the file was read went unseen.
    time.sleep(1 - time.time() % 1)  # start at the beginning of a second: all of it happens within it
    user = dovecot.new_user("requota", quota="1K")
    try:
        assert _storage_limit_kib(dovecot, user.name) == 1  # Dovecot has read (and remembers) the file
        dovecot.add_user(user.name, user.password, quota="1M")
        assert _storage_limit_kib(dovecot, user.name) == 1024
    finally:
        dovecot.remove_user(user.name)


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda _name: None)
    monkeypatch.setattr("os.access", lambda _path, _mode: False)
    with pytest.raises(DovecotError, match="dovecot binary was not found"):
        Dovecot()
