"""Several messages per MULTIAPPEND (connector/poll/batched.py), end to end against the real Dovecot.

Dovecot offers MULTIAPPEND and LITERAL+, so the engine batches what the fetching thread has ready. The
destination sessions are wrapped (``Connections.open_destination``, the one factory tests replace) to see
the batches and to break the connection at chosen moments; the servers stay real.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from connector.config import Account, Destination
from connector.connections import Connections, open_destination
from connector.destinations.base import DestinationSession
from connector.errors import DestinationConnectError
from connector.ledger.records import MessageState
from connector.message import FetchedMessage
from tests.integration.conftest import SyncFactory
from tests.ledger_statements import counted
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.integration


@dataclass
class Recorder:
    """Wraps each destination session: records the size of each delivery call, can break after one."""

    batches: list[int] = field(default_factory=list)
    break_after_batch: bool = False

    def open(self, destination: Destination, account: Account) -> DestinationSession:
        return _Recording(open_destination(destination, account), self)


class _Recording:
    def __init__(self, session: DestinationSession, recorder: Recorder) -> None:
        self._session = session
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def deliver(self, message: FetchedMessage) -> str:
        self._recorder.batches.append(1)
        if len(self._recorder.batches) == 1:
            time.sleep(0.3)  # the fetching thread fills its queue meanwhile: the next delivery is a batch
        return self._session.deliver(message)

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        self._recorder.batches.append(len(messages))
        refs = self._session.deliver_many(messages)
        if self._recorder.break_after_batch:
            # Stored, but the reply never arrived: what a crash or a cut connection leaves behind.
            raise DestinationConnectError("connection lost after the MULTIAPPEND was sent")
        return refs


def _engine_with(make_sync: SyncFactory, recorder: Recorder, **kwargs: Any) -> tuple[Account, Any]:
    config, engine = make_sync(**kwargs)
    engine.connections = replace(Connections(), open_destination=recorder.open)
    return config.accounts[0], engine


def test_small_messages_go_in_batches_in_order_once(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    messages = [simple(n) for n in range(40)]
    dovecot.seed(mail_users.source.name, messages)
    recorder = Recorder()
    account, engine = _engine_with(make_sync, recorder)
    result = engine.poll(account)
    assert (result.status, result.delivered, result.deleted, result.failed) == ("ok", 40, 40, 0)
    assert [m.body for m in dovecot.imap_fetch(mail_users.destination.name)] == messages
    assert sum(recorder.batches) == 40 and max(recorder.batches) > 1, recorder.batches
    ledger = engine.ledger
    rows = ledger.known_messages(ledger.account_id(account.name))
    assert {row.state for row in rows.values()} == {MessageState.DELETED}


def test_a_batch_is_recorded_pending_in_one_transaction(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    """The messages of one MULTIAPPEND are stored together or not at all, so they share one ``pending``
    commit: one fsync per batch, not one per message (issue 16's 100,000-kept poll paid 30 ms each)."""
    messages = [simple(n) for n in range(40)]
    dovecot.seed(mail_users.source.name, messages)
    recorder = Recorder()
    account, engine = _engine_with(make_sync, recorder, account={"retention": "keep"})
    with counted(engine.ledger.engine) as seen:
        result = engine.poll(account)
    assert (result.status, result.delivered) == ("ok", 40)
    pending = [
        sum(statement.startswith("INSERT INTO messages") for statement in transaction)
        for transaction in seen.writes()
    ]
    assert [n for n in pending if n] == recorder.batches, (pending, recorder.batches)
    assert max(recorder.batches) > 1


def test_a_refused_batch_goes_one_by_one_and_names_the_message_at_fault(
    dovecot: Dovecot, make_sync: SyncFactory, mail_users: MailUsers
) -> None:
    limited = dovecot.new_user("limited", userdb_fields={"quota_max_mail_size": "10K"})
    messages = [simple(n) for n in range(6)] + [simple(6, size=30 * 1024)] + [simple(n) for n in range(7, 12)]
    dovecot.seed(mail_users.source.name, messages)
    recorder = Recorder()
    account, engine = _engine_with(
        make_sync,
        recorder,
        destination={"username": limited.name, "password": limited.password},
        account={"retention": "keep"},
    )
    try:
        result = engine.poll(account)
        assert (result.delivered, result.failed) == (11, 1), result.problems
        assert any("LIMIT" in problem for problem in result.problems)
        assert [m.body for m in dovecot.imap_fetch(limited.name)] == messages[:6] + messages[7:]
    finally:
        dovecot.remove_user(limited.name)


def test_a_batch_cut_off_after_it_was_stored_is_recovered_not_duplicated(
    dovecot: Dovecot, mail_users: MailUsers, make_sync: SyncFactory
) -> None:
    messages = [simple(n) for n in range(30)]
    dovecot.seed(mail_users.source.name, messages)
    recorder = Recorder(break_after_batch=True)
    account, engine = _engine_with(make_sync, recorder)
    first = engine.poll(account)
    assert first.status == "error" and first.delivered < 30
    cut = recorder.batches[-1]
    assert cut > 1
    # Everything up to the cut batch was delivered; the cut batch is stored but only pending.
    stored = dovecot.imap_fetch(mail_users.destination.name)
    assert [m.body for m in stored] == messages[: first.delivered + cut]
    assert dovecot.maildir_count(mail_users.source.name) == 30 - first.delivered

    recorder.break_after_batch = False
    second = engine.poll(account)
    assert (second.status, second.recovered, second.delivered + second.recovered + first.delivered) == (
        "ok",
        cut,
        30,
    )
    assert [m.body for m in dovecot.imap_fetch(mail_users.destination.name)] == messages
    assert dovecot.maildir_count(mail_users.source.name) == 0
