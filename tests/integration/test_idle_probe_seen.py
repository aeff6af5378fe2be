"""The idle probe and a ``start = "new"`` baseline: messages recorded as seen stay on the server for good,
so a maildrop that keeps them is idle when it lists exactly them (and the delivered ones), and a message
that arrives later is delivered once, the seen ones never."""

from __future__ import annotations

import pytest

from connector.poll.rounds import poll_round
from tests.integration.conftest import FullPolls, SyncFactory
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration


def test_seen_messages_are_idle_and_new_ones_delivered_once(
    make_sync: SyncFactory, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    source, destination = mail_users.source.name, mail_users.destination.name
    dovecot.seed(source, [simple(0), simple(1)])
    config, engine = make_sync(defaults={"start": "new", "retention": "keep"})
    account = config.accounts[0]
    first = engine.poll(account)  # the baseline: both recorded as seen, none delivered
    assert first.ok and not first.delivered
    full = FullPolls(engine)
    [result] = poll_round(engine, [account], workers=2, full_poll=full)
    assert result.idle and not full.count  # probed: the listing is what the baseline saw

    dovecot.seed(source, [simple(2)])
    [result] = poll_round(engine, [account], workers=2, full_poll=full)
    assert full.count[account.name] == 1 and result.delivered == 1
    assert engine.poll(account).idle  # in full: the last poll delivered
    [result] = poll_round(engine, [account], workers=2, full_poll=full)
    assert result.idle and full.count[account.name] == 1  # probed again: seen and delivered ones kept
    assert dovecot.maildir_count(destination) == 1
    assert dovecot.maildir_count(source) == 3
