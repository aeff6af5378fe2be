"""The idle probe's connections (connector/poll/probe.py): a host's other addresses, and LOGIN-DELAY.

- A host whose first address refuses (an IPv6 address with nothing listening, say) is reached at the next
  one, as ``socket.create_connection`` does for the full poll: the probe must not hand every poll of such
  an account to the full poll.
- A server that offers UTF8 may take UTF-8 credentials only after it: the probe sends it, as the full poll
  does, or its login would fail at every poll while the full poll's succeeds.
- A server that announces LOGIN-DELAY may refuse a login sooner than that after the last one (RFC 2449):
  when the probe logs in, finds new mail and hands the account over, the full poll waits that long.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from connector.config import Account
from connector.policies.idle import PROBE_MAX_LOGIN_DELAY
from connector.poll.engine import SyncEngine
from connector.poll.probe import IdleProbe, in_batches
from connector.poll.result import PollResult
from connector.poll.rounds import poll_round
from tests.integration.conftest import FullPolls, SyncFactory, made_idle, scripted
from tests.messages import simple
from tests.servers.scripted_pop3 import (
    CourierLikePop3Server,
    Pop3Session,
    ScriptedPop3Server,
    StoredMessage,
)

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class _Silent:
    """A server that accepts one connection and says nothing until ``release`` is set (10 s at most)."""

    account: Account
    accepted: threading.Event
    release: threading.Event
    # Whether ``release`` came before the 10 s were up: the probe told the other account's outcome first.
    released_in_time: list[bool]


@contextlib.contextmanager
def _silent_server(engine: SyncEngine, idle: Account) -> Iterator[_Silent]:
    """An account like ``idle`` on a silent server, in the ledger with nothing known (a candidate for the
    probe); the server's thread is joined when the block ends."""
    with socket.create_server(("127.0.0.1", 0)) as mute:
        port, name = mute.getsockname()[1], f"{idle.name}-mute"
        account = idle.model_copy(update={"name": name, "port": port, "timeout": timedelta(seconds=30)})
        silent = _Silent(account, threading.Event(), threading.Event(), [])

        def never_greet() -> None:
            connection, _address = mute.accept()
            silent.accepted.set()
            with connection:
                silent.released_in_time.append(silent.release.wait(10))

        server = threading.Thread(target=never_greet)
        server.start()
        engine.ledger.account_id(name)
        try:
            yield silent
        finally:
            silent.release.set()
            server.join()


def test_the_next_address_is_tried_when_the_first_refuses(
    make_sync: SyncFactory, pop3: ScriptedPop3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, engine = make_sync(account=scripted(pop3), defaults={"retention": "keep"})
    account = config.accounts[0]
    made_idle(engine, account)
    refused = _closed_port()
    real = socket.getaddrinfo

    def two_addresses(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        # As "localhost" resolving to ::1 and 127.0.0.1 with the server on the second one only.
        first = real(host, refused, *args, **kwargs)[0]
        return [first, *real(host, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    full = FullPolls(engine)
    [result] = poll_round(engine, [account], workers=2, full_poll=full)
    assert result.ok and result.idle
    assert not full.count  # probed at the second address, not handed over

    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: real(host, refused, *a, **k))
    [result] = poll_round(engine, [account], workers=2, full_poll=full)
    assert full.count[account.name] == 1  # no address answered: the full poll tried (and reports)


def test_the_full_poll_waits_for_login_delay_after_the_probe_logged_in(
    make_sync: SyncFactory, mail_users: Any
) -> None:
    messages = [StoredMessage("uid-0", simple(0))]
    with ScriptedPop3Server(messages, capabilities=["LOGIN-DELAY 1"]) as server:
        logins: list[float] = []

        def record_login(session: Pop3Session, argument: str) -> None:
            logins.append(time.monotonic())
            session.default("PASS", argument)

        server.on("PASS", record_login)
        config, engine = make_sync(account=scripted(server), defaults={"retention": "keep"})
        account = config.accounts[0]
        made_idle(engine, account)
        server.messages.append(StoredMessage("uid-1", simple(1)))
        logins.clear()
        full = FullPolls(engine)
        [result] = poll_round(engine, [account], workers=2, full_poll=full)
    assert result.delivered == 1 and full.count[account.name] == 1
    probe_login, full_login = logins
    assert full_login - probe_login >= 1.0  # not sooner than the server's LOGIN-DELAY allows


def test_a_login_delay_over_a_minute_is_left_to_the_full_poll_without_a_probe_login(
    make_sync: SyncFactory,
) -> None:
    """A server that announces LOGIN-DELAY 900 would refuse the full poll's login for 15 minutes after the
    probe's: the probe reads CAPA, does not log in, and the full poll delivers the new message at once."""
    messages = [StoredMessage("uid-0", simple(0))]
    delay = PROBE_MAX_LOGIN_DELAY + 1  # before the change, this test waited that long, then failed
    with ScriptedPop3Server(messages, capabilities=[f"LOGIN-DELAY {delay}"]) as server:
        logins: list[float] = []
        capas: list[float] = []

        def record(verb: str, times: list[float]) -> Callable[[Pop3Session, str], None]:
            def handler(session: Pop3Session, argument: str) -> None:
                times.append(time.monotonic())
                session.default(verb, argument)

            return handler

        server.on("PASS", record("PASS", logins))
        server.on("CAPA", record("CAPA", capas))
        config, engine = make_sync(account=scripted(server), defaults={"retention": "keep"})
        account = config.accounts[0]
        made_idle(engine, account)
        server.messages.append(StoredMessage("uid-1", simple(1)))
        logins.clear()
        capas.clear()
        full = FullPolls(engine)
        started = time.monotonic()
        [result] = poll_round(engine, [account], workers=2, full_poll=full)
    assert result.delivered == 1 and full.count[account.name] == 1, result.error
    assert len(capas) == 2 and len(logins) == 1  # the probe's CAPA, then the full poll's session
    assert logins[0] - started < delay


class _Utf8Logins(CourierLikePop3Server):
    """Takes a password with non-ASCII characters only after UTF8, as a server whose password database is
    UTF-8 and which reads credentials as Latin-1 until told otherwise could (RFC 6856 section 3)."""

    def do_PASS(self, session: Pop3Session, argument: str) -> None:
        if not session.utf8 and not argument.isascii():
            session.err("[AUTH] invalid login")
            return
        super().do_PASS(session, argument)


def test_the_probe_sends_utf8_before_logging_in_as_the_full_poll_does(make_sync: SyncFactory) -> None:
    messages = [StoredMessage("uid-0", simple(0))]
    with _Utf8Logins(messages, password="pässwörd") as server:
        config, engine = make_sync(account=scripted(server), defaults={"retention": "keep"})
        account = config.accounts[0]
        made_idle(engine, account)
        full = FullPolls(engine)
        [result] = poll_round(engine, [account], workers=2, full_poll=full)
    assert result.ok and result.idle
    assert not full.count  # the probe's own login succeeded: no hand-over, no failed login counted


def test_a_server_that_never_answers_holds_back_no_other_account(
    make_sync: SyncFactory, pop3: ScriptedPop3Server
) -> None:
    """The probe tells each account's outcome as soon as it is known: an idle account is recorded while
    another account's server has not even greeted (before, a batch waited for its slowest session)."""
    config, engine = make_sync(account=scripted(pop3), defaults={"retention": "keep"})
    idle = config.accounts[0]
    made_idle(engine, idle)
    told: list[tuple[str, bool]] = []
    with _silent_server(engine, idle) as silent:

        def done(account: Account, result: PollResult | None, wait: float) -> None:
            told.append((account.name, result is not None and result.idle))
            if account.name == idle.name:
                silent.release.set()

        IdleProbe(engine, at_once=2).serve(in_batches([silent.account, idle]), done)
    # The idle account was recorded while the other server was still silent.
    assert silent.released_in_time == [True]
    assert told == [(idle.name, True), (silent.account.name, False)]  # and the silent one handed over


def test_the_probe_keeps_at_most_at_once_sessions_open(
    make_sync: SyncFactory, pop3: ScriptedPop3Server
) -> None:
    """README: the probe's sessions are at most ``max_workers`` at once (on top of the full polls)."""
    config, engine = make_sync(account=scripted(pop3), defaults={"retention": "keep"})
    first = config.accounts[0]
    accounts = [first.model_copy(update={"name": f"{first.name}-{n}"}) for n in range(6)]
    for account in accounts:
        engine.ledger.account_id(account.name)  # in the ledger, nothing known: candidates for the probe
    lock = threading.Lock()
    open_now, most = 0, 0

    def slow_capa(session: Pop3Session, argument: str) -> None:
        nonlocal open_now, most
        with lock:
            open_now += 1
            most = max(most, open_now)
        time.sleep(0.2)  # long enough for every session the probe would open to reach its CAPA
        with lock:
            open_now -= 1
        session.default("CAPA", argument)

    pop3.on("CAPA", slow_capa)
    told: list[str] = []
    probe = IdleProbe(engine, at_once=2)
    probe.serve(in_batches(accounts), lambda account, result, wait: told.append(account.name))
    assert sorted(told) == sorted(account.name for account in accounts)  # each account's outcome once
    assert most == 2  # two at once, never more


def test_a_host_name_slow_to_look_up_holds_back_no_other_account(
    make_sync: SyncFactory, pop3: ScriptedPop3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's loop never waits for a name lookup (getaddrinfo has no timeout: a domain whose
    nameservers are down holds it for their retries): the accounts of other hosts go on meanwhile, and the
    slow host's account is probed once its lookup ends."""
    config, engine = make_sync(account=scripted(pop3), defaults={"retention": "keep"})
    idle = config.accounts[0]
    slow = idle.model_copy(update={"name": f"{idle.name}-slow", "host": "slow-dns.example"})
    made_idle(engine, idle)
    real = socket.getaddrinfo
    blocking = threading.Event()
    idle_told = threading.Event()
    waited: list[bool] = []

    def lookup(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host == "slow-dns.example":
            if blocking.is_set():
                # Unanswered until the other account's outcome is known (or 10 s, when it never comes first).
                waited.append(idle_told.wait(10))
            host = "127.0.0.1"
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    made_idle(engine, slow)
    told: list[tuple[str, bool]] = []

    def done(account: Account, result: PollResult | None, wait: float) -> None:
        told.append((account.name, result is not None and result.idle))
        if account.name == idle.name:
            idle_told.set()

    blocking.set()
    IdleProbe(engine, at_once=2).serve(in_batches([slow, idle]), done)
    assert waited == [True]  # the other account was probed while the slow lookup ran
    assert told == [(idle.name, True), (slow.name, True)]  # and the slow host's account probed after it


def test_a_failed_lookup_hands_its_accounts_over_and_is_tried_again_next_time(
    make_sync: SyncFactory, pop3: ScriptedPop3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, engine = make_sync(account=scripted(pop3), defaults={"retention": "keep"})
    account = config.accounts[0]
    made_idle(engine, account)
    real = socket.getaddrinfo
    lookups: list[str] = []

    def failing(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    told: list[PollResult | None] = []
    probe = IdleProbe(engine, at_once=2)
    probe.serve(in_batches([account]), lambda _account, result, wait: told.append(result))
    assert told == [None]  # handed over: the full poll looks the name up itself and reports the failure
    monkeypatch.setattr(socket, "getaddrinfo", real)
    probe.serve(in_batches([account]), lambda _account, result, wait: told.append(result))
    assert len(lookups) == 1 and told[1] is not None and told[1].idle  # the failure was not remembered


def test_accounts_handed_to_the_probe_while_a_server_is_silent_are_taken_at_once(
    make_sync: SyncFactory, pop3: ScriptedPop3Server
) -> None:
    """In ``run`` the scheduler hands accounts over one by one as they fall due. A session waiting on a
    silent server (up to its timeout) must not keep the probe from taking the ones handed over since."""
    config, engine = make_sync(account=scripted(pop3), defaults={"retention": "keep"})
    idle = config.accounts[0]
    made_idle(engine, idle)
    with _silent_server(engine, idle) as silent:
        queued = [[silent.account], [idle]]
        asked_since_accepted = 0

        def take(most: int, timeout: float) -> list[Account] | None:
            nonlocal asked_since_accepted
            if not queued:
                return None
            if queued[0] == [idle]:
                # The idle account falls due once the silent server's session is open and the probe has
                # asked again a few times since: then it waits for the greeting, not for the connection.
                asked_since_accepted += silent.accepted.is_set()
                if asked_since_accepted < 3:
                    return []
            return queued.pop(0)

        def done(account: Account, result: PollResult | None, wait: float) -> None:
            if account.name == idle.name and result is not None and result.idle:
                silent.release.set()

        IdleProbe(engine, at_once=2).serve(take, done)
    # Taken and recorded while the silent server's session was still open.
    assert silent.released_in_time == [True]
