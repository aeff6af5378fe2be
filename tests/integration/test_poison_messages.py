"""A message that makes the destination drop the connection, and one recipient of a catch-all account
that cannot take mail (issue 12.6): neither holds back the rest of the mail, and a message that keeps
dropping the connection while the destination takes other mail is counted and quarantined.

The destination is the real Dovecot, behind the fault proxy where a connection must drop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from connector.ledger.records import MessageState
from tests.integration.conftest import SyncFactory
from tests.integration.test_multidrop import addressed, master
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUser, MailUsers
from tests.servers.fault_proxy import Fault, FaultProxy

POISON = b"X-Poison: the proxy hangs up on this line"


def subjects(messages: list[bytes]) -> list[str]:
    return sorted(
        line.split(b":", 1)[1].strip().decode()
        for message in messages
        for line in message.replace(b"\r\n", b"\n").split(b"\n")
        if line.startswith(b"Subject:")
    )


@pytest.fixture
def imap_proxy(dovecot: Dovecot) -> Iterator[FaultProxy]:
    with FaultProxy(dovecot.host, dovecot.ports.imap) as proxy:
        yield proxy


@pytest.mark.parametrize("multiappend", [False, True])
def test_a_message_that_drops_the_connection_is_quarantined_and_the_rest_delivered(
    dovecot: Dovecot,
    mail_users: MailUsers,
    make_sync: SyncFactory,
    imap_proxy: FaultProxy,
    multiappend: bool,
) -> None:
    # Every connection that carries the poison line is cut in the middle of its APPEND, so nothing of it
    # is stored; every other message goes through untouched.
    imap_proxy.inject(Fault("reset", "up", trigger=POISON, times=1_000))
    poison = simple(2).replace(b"Subject:", POISON + b"\r\nSubject:")
    dovecot.seed(mail_users.source.name, [simple(1), poison, simple(3)])
    _, engine = make_sync(
        account={"retry": {"max_attempts": 3}},
        destination={"port": imap_proxy.port, "multiappend": multiappend},
    )
    account = engine.config.accounts[0]
    account_id = engine.ledger.account_id(account.name)
    assert account_id is not None

    def poison_row() -> Any:
        [row] = [
            row
            for row in engine.ledger.known_messages(account_id).values()
            if row.message_id == "<msg2@example.net>"
        ]
        return row

    polls = []
    for n in range(4, 10):
        result = engine.poll(account)
        polls.append(result)
        assert result.status != "suspended"
        if poison_row().state is MessageState.FAILED:
            break
        dovecot.seed(mail_users.source.name, [simple(n)])  # other mail keeps coming, and goes through
    else:
        pytest.fail(f"the poison message was never quarantined: {polls}")

    # Three polls in which it was in flight when the connection dropped while other messages went in
    # (one more with MULTIAPPEND, whose first batch drop cannot be pinned on one message).
    assert len(polls) <= (3 if not multiappend else 4), polls
    assert polls[-1].quarantined == 1
    [quarantined] = engine.ledger.quarantine.messages(account.name)
    assert quarantined.attempts == 3
    assert "dropped the connection while this message was being delivered" in (quarantined.last_error or "")
    delivered = subjects(dovecot.imap_messages(mail_users.destination.name))
    expected = subjects([simple(n) for n in [1, 3, *range(4, 3 + len(polls))]])
    assert delivered == expected  # every other message, each once
    assert subjects(dovecot.maildir_messages(mail_users.source.name)) == ["test message 2"]

    after = engine.poll(account)  # the quarantined message is left alone: nothing is blocked any more
    assert after.ok and after.delivered == 0 and after.failed == 0, after
    assert dovecot.maildir_count(mail_users.source.name) == 1


@pytest.fixture
def people(dovecot: Dovecot) -> Iterator[dict[str, MailUser]]:
    users = {
        "alice": dovecot.new_user("alice"),
        "bob": dovecot.new_user("bob"),
        # A mailbox the first message does not fit in: Dovecot answers NO [OVERQUOTA].
        "full": dovecot.new_user("full", quota="1K"),
    }
    yield users
    for user in users.values():
        dovecot.remove_user(user.name)


def routing(people: dict[str, MailUser]) -> dict[str, Any]:
    return {
        "rules": [{"match": f"{name}@example.org", "mailbox": user.name} for name, user in people.items()]
    }


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("trouble", ["over quota", "dropping"])
def test_one_recipient_that_cannot_take_mail_does_not_hold_back_the_others(
    dovecot: Dovecot,
    mail_users: MailUsers,
    make_sync: SyncFactory,
    people: dict[str, MailUser],
    imap_proxy: FaultProxy,
    trouble: str,
) -> None:
    full = people["full"]
    if trouble == "dropping":
        # No quota: instead its sessions drop in each APPEND. A new user, not the same one replaced:
        # Dovecot needs a second to see a replaced passwd-file, and add_user waits it out.
        dovecot.remove_user(full.name)
        full = people["full"] = dovecot.new_user("full")
        # The master login names the mailbox; 1,000 bytes later the client is inside the APPEND literal.
        imap_proxy.inject(Fault("reset", "up", trigger=f"{full.name}*".encode(), after=1_000, times=1_000))
    messages = [
        addressed(1, "To: alice@example.org, full@example.org").replace(b"Body", b"B" * 3000 + b"ody"),
        addressed(2, "To: bob@example.org"),
        addressed(3, "To: full@example.org").replace(b"Body", b"B" * 3000 + b"ody"),
        addressed(4, "To: alice@example.org, bob@example.org"),
    ]
    dovecot.seed(mail_users.source.name, messages)
    _, engine = make_sync(
        account={"routing": routing(people), "retry": {"max_attempts": 2}},
        destination=master(dovecot, master_login="separator", port=imap_proxy.port),
    )
    account = engine.config.accounts[0]

    for _ in range(3):  # however long the mailbox stays unusable: no attempt is burnt, nothing duplicated
        result = engine.poll(account)
        assert result.status == "ok", result
        assert any(full.name in problem for problem in result.problems), result.problems
        assert subjects(dovecot.imap_messages(people["alice"].name)) == ["test message 1", "test message 4"]
        assert subjects(dovecot.imap_messages(people["bob"].name)) == ["test message 2", "test message 4"]
        assert dovecot.imap_messages(full.name) == []
        # DELEted once every recipient has it; the others wait on the server for the full mailbox.
        assert subjects(dovecot.maildir_messages(mail_users.source.name)) == [
            "test message 1",
            "test message 3",
        ]
        assert engine.ledger.quarantine.messages(account.name) == []

    imap_proxy.heal()
    if trouble == "over quota":
        dovecot.add_user(full.name, full.password, quota="1M")  # the mailbox can take mail again
    healed = engine.poll(account)

    assert healed.ok and healed.delivered == 2, healed
    assert subjects(dovecot.imap_messages(full.name)) == ["test message 1", "test message 3"]
    assert len(dovecot.imap_messages(people["alice"].name)) == 2
    assert dovecot.maildir_count(mail_users.source.name) == 0
