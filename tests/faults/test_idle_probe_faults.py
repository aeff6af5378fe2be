"""The idle probe (connector/poll/probe.py) against misbehaving POP3 servers (tests/servers/scripted_pop3.py).

The probe decides one thing only: "this poll has nothing to do". For each misbehaviour the account is
either handed over to the full poll (which ran: ``World.full`` counts its calls) or, where the behaviour is
legal and the listing is what the ledger keeps, recorded idle by the probe; never a wrong "idle". And
nothing is lost or delivered twice: the destination holds each message once, whatever the probe met.

No external server: a real socket to the scripted server, the real POP3 client for the full poll, a SQLite
ledger and an in-memory destination (tests/unit/poll/fakes.py). No duration is asserted; timeouts are short
so that the cases that wait for one end quickly.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import update

from connector.config import Account, Config, parse_config
from connector.connections import Connections
from connector.ledger.database import open_database
from connector.ledger.models import MessageRow
from connector.ledger.records import AccountStatus, MessageState
from connector.ledger.store import Ledger
from connector.policies.idle import PROBE_MAX_LOGIN_DELAY
from connector.poll.engine import SyncEngine
from connector.poll.result import PollResult
from connector.poll.rounds import poll_round
from connector.pop3 import DEFAULT_MAX_LISTING_BYTES
from tests.messages import simple
from tests.servers.scripted_pop3 import (
    CloseConnection,
    Pop3Session,
    ScriptedPop3Server,
    StoredMessage,
    tls_contexts,
)
from tests.unit.poll.fakes import FakeDestination
from tests.waiting import wait_until

ACCOUNT = "alice"
# Unlike any word of a log line: a test looks for it in every record.
PASSWORD = "pw-7Hq2xZ9kLm"
UIDLS = ["uid-0", "uid-1", "uid-2"]


@pytest.fixture(scope="module")
def ledger_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty ledger file, copied for each test (migrating costs more than a whole poll)."""
    path = tmp_path_factory.mktemp("ledger") / "template.db"
    open_database(f"sqlite:///{path}").dispose()
    return path


@dataclass
class World:
    """One account (``alice``, retention keep) on a scripted POP3 server, delivering into an in-memory
    destination, with a SQLite ledger. ``round()`` is one ``poll_round`` of it; ``full`` the accounts
    the full poll was called for, in order."""

    server: ScriptedPop3Server
    config: Config
    engine: SyncEngine
    destination: FakeDestination
    full: list[str] = field(default_factory=list)

    @property
    def account(self) -> Account:
        return self.config.accounts[0]

    def _full_poll(self, account: Account) -> PollResult:
        self.full.append(account.name)
        return self.engine.poll(account)

    def round(self) -> PollResult:
        [result] = poll_round(self.engine, [self.account], workers=2, full_poll=self._full_poll)
        return result

    def idle_round(self) -> PollResult:
        """A round the probe must record idle (the full poll not called)."""
        before = len(self.full)
        result = self.round()
        assert self.full[before:] == [], "handed over to the full poll, expected idle"
        assert (result.status, result.delivered, result.deleted) == ("ok", 0, 0)
        # The probe's QUIT is not awaited: seen by the server before a test counts the next commands.
        wait_until(lambda: self.server.recorded.commands[-1:] == ["QUIT"], "the probe's QUIT", timeout=5)
        return result

    def handed_over_round(self) -> PollResult:
        """A round the probe must hand over: the full poll ran once, and the result is its."""
        before = len(self.full)
        result = self.round()
        assert self.full[before:] == [ACCOUNT], "recorded idle by the probe, expected a handover"
        return result

    def status(self) -> AccountStatus:
        [status] = [s for s in self.engine.ledger.statuses() if s.name == ACCOUNT]
        return status

    def states(self) -> dict[str, MessageState]:
        account_id = self.engine.ledger.account_id(ACCOUNT, create=False)
        assert account_id is not None
        return {uidl: row.state for uidl, row in self.engine.ledger.known_messages(account_id).items()}

    def assert_each_delivered_once(self, uidls: list[str]) -> None:
        """Nothing lost, nothing twice: each of ``uidls`` in the destination once (and nothing else), each
        recorded delivered, and nothing deleted from the server."""
        assert sorted(self.destination.uidls) == sorted(uidls)
        assert {u: s for u, s in self.states().items() if u in uidls} == dict.fromkeys(
            uidls, MessageState.DELIVERED
        )
        assert self.server.recorded.deleted == []


@contextmanager
def _world(
    tmp_path: Path,
    template: Path,
    messages: list[StoredMessage],
    server_options: dict[str, Any] | None = None,
    second: ScriptedPop3Server | None = None,
    **account: Any,
) -> Iterator[World]:
    """``second``: a started server for a second account, "bob" (as alice, but for the server)."""
    path = tmp_path / "ledger.db"
    shutil.copyfile(template, path)
    server = ScriptedPop3Server(messages, username=ACCOUNT, password=PASSWORD, **(server_options or {}))
    with server:
        data = {
            "service": {"database": f"sqlite:///{path}"},
            "defaults": {"poll_jitter": 0},
            "destinations": [
                {
                    "name": "archive",
                    "type": "imap",
                    "host": "imap.fake.example",
                    "username": "archive",
                    "password": "pw-archive-31f",
                }
            ],
            "accounts": [
                {
                    "name": ACCOUNT,
                    "host": server.host,
                    "port": server.port,
                    "tls": "none",
                    "username": ACCOUNT,
                    "password": PASSWORD,
                    "destination": "archive",
                    "retention": "keep",
                    "timeout": "1s",
                    "poll_interval": "5m",
                    **account,
                }
            ],
        }
        if second is not None:
            accounts: list[dict[str, Any]] = data["accounts"]  # type: ignore[assignment]
            accounts.append({**accounts[0], "name": "bob", "port": second.port, "timeout": "1s"})
        config = parse_config(data, tmp_path / "config.toml")
        database = open_database(f"sqlite:///{path}", migrate=False)
        destination = FakeDestination("archive")
        # The real open_source (so the probe may run), an in-memory destination.
        connections = Connections(open_destination=lambda _destination, _account: destination.open())
        engine = SyncEngine(config, Ledger(database), connections)
        try:
            yield World(server, config, engine, destination)
        finally:
            database.dispose()


def _messages(uidls: list[str]) -> list[StoredMessage]:
    return [StoredMessage(uidl, simple(n)) for n, uidl in enumerate(uidls)]


@pytest.fixture
def world(tmp_path: Path, ledger_template: Path) -> Iterator[World]:
    """Three messages, delivered by a first round (the full poll: the account was not in the ledger); the
    second is a full poll too (the last one delivered) and finds nothing; the third is idle. A test makes
    the server misbehave after that."""
    with _world(tmp_path, ledger_template, _messages(UIDLS)) as world:
        world.handed_over_round()
        world.assert_each_delivered_once(UIDLS)
        world.handed_over_round()
        world.idle_round()
        yield world


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


# --- the greeting ----------------------------------------------------------------------------------------


def test_a_greeting_of_err_is_handed_over(world: World) -> None:
    world.server.greeting = b"-ERR not now\r\n"
    result = world.handed_over_round()
    assert result.status == "error" and "not now" in (result.error or "")
    world.assert_each_delivered_once(UIDLS)


def test_no_greeting_at_all_is_handed_over_after_the_timeout(world: World) -> None:
    """A server that accepts and says nothing: the probe gives up at the account's timeout (1 s) and the
    full poll, which times out too, reports it."""
    world.server.greeting = b""
    result = world.handed_over_round()
    assert result.status == "error" and "timed out" in (result.error or "")
    world.server.greeting = None
    world.handed_over_round()  # the failed poll counts: the next one is a full poll too
    world.idle_round()
    world.assert_each_delivered_once(UIDLS)


# --- CAPA ------------------------------------------------------------------------------------------------


def test_capa_refused_is_legal_and_still_idle(world: World) -> None:
    world.server.capa_supported = False
    finished = world.status().last_poll_finished_at
    result = world.idle_round()
    assert result.listed == 3
    # The probe went on after the -ERR to CAPA (its QUIT is not awaited: it may not have arrived yet).
    sent = world.server.recorded.commands
    assert sent[sent.index("CAPA", len(sent) - 5) :][:4] == [
        "CAPA",
        f"USER {ACCOUNT}",
        f"PASS {PASSWORD}",
        "UIDL",
    ]
    status = world.status()
    assert status.last_result == "ok" and status.last_poll_finished_at != finished


def test_capa_expire_against_retention_keep_is_handed_over_and_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.server.extra_capabilities = ["USER", "UIDL", "EXPIRE 1"]
    with caplog.at_level(logging.WARNING, logger="connector"):
        result = world.handed_over_round()
    assert result.status == "ok"
    assert "CAPA EXPIRE" in _logged(caplog)  # the full poll's warning, at every poll
    world.assert_each_delivered_once(UIDLS)


def test_a_login_delay_up_to_a_minute_is_probed(world: World) -> None:
    world.server.extra_capabilities = ["USER", "UIDL", f"LOGIN-DELAY {PROBE_MAX_LOGIN_DELAY}"]
    world.idle_round()


def test_a_longer_login_delay_is_polled_in_full_without_a_probe_login_and_the_next_poll_waits(
    world: World,
) -> None:
    """LOGIN-DELAY 900: after a probe's login, new mail would wait 15 minutes for the full poll's."""
    world.server.extra_capabilities = ["USER", "UIDL", "LOGIN-DELAY 900"]

    def logins() -> int:
        return sum(command.startswith("PASS ") for command in world.server.recorded.commands)

    before_logins, before = logins(), world.engine.clock()
    result = world.handed_over_round()
    assert (result.status, result.delivered) == ("ok", 0)
    assert logins() == before_logins + 1  # the full poll's only
    assert result.next_poll_at is not None
    assert result.next_poll_at >= before + timedelta(seconds=900)  # not the 5-minute interval
    assert world.status().next_poll_at == result.next_poll_at


def test_a_handover_under_an_enforced_login_delay_still_delivers(world: World) -> None:
    """A server that announces LOGIN-DELAY enforces it: a second login within the delay is refused. A new
    message arrives: the probe logs in, sees it and hands over; the full poll must wait out the delay, or
    its login is refused ([LOGIN-DELAY]) and the message waits a failed poll and the delay more."""
    world.server.extra_capabilities = ["USER", "UIDL", "LOGIN-DELAY 1"]
    last_login: list[float] = []

    def enforced(session: Pop3Session, argument: str) -> None:
        now = time.monotonic()
        if last_login and now - last_login[-1] < 1.0:
            session.err("[LOGIN-DELAY] wait 1 second between logins")
            return
        last_login.append(now)
        session.default("PASS", argument)

    world.server.on("PASS", enforced)
    world.server.messages.append(StoredMessage("uid-3", simple(3)))
    result = world.handed_over_round()
    assert (result.status, result.delivered) == ("ok", 1)


@pytest.fixture
def over_tls(tmp_path: Path, ledger_template: Path) -> Iterator[World]:
    """As ``world``, over implicit TLS (the probe reads a TLS record, at most 16 KiB, at a time)."""
    context, ca_file = tls_contexts(tmp_path)
    server = {"tls_context": context, "implicit_tls": True}
    with _world(
        tmp_path, ledger_template, _messages(UIDLS), server, tls="implicit", ca_file=str(ca_file)
    ) as world:
        world.handed_over_round()
        world.handed_over_round()  # in full: the last poll delivered
        world.idle_round()
        yield world


@pytest.mark.parametrize("transport", ["plain", "implicit-tls"])
def test_an_endless_capa_is_handed_over_at_the_limit_with_memory_bounded(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """CAPA lines without end (well, twice the limit, then the server hangs up: a probe without a limit
    fails this test instead of hanging it): the probe stops at ``DEFAULT_MAX_LISTING_BYTES`` (32 MiB) and
    hands over; the full poll (whose CAPA is normal) finds nothing to do. What the probe holds stays a small
    multiple of the limit (allocations traced in this process; the server's thread reuses one block)."""
    world: World = request.getfixturevalue("world" if transport == "plain" else "over_tls")
    sent = 0

    def endless(session: Pop3Session, argument: str) -> None:
        nonlocal sent
        # The full poll's session: after the fixture's three rounds' and the probe's.
        if session.server.recorded.connections > 4:
            session.default("CAPA", argument)
            return
        session.send_raw(b"+OK\r\n")
        block = b"X-ENDLESS-CAPABILITY and more of it\r\n" * 4096
        try:
            while sent < 2 * DEFAULT_MAX_LISTING_BYTES:
                session.send_raw(block)
                sent += len(block)
        except OSError:
            pass
        raise CloseConnection

    world.server.on("CAPA", endless)
    tracemalloc.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="connector.poll.probe"):
            result = world.handed_over_round()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.status == "ok"
    assert f"polled in full: CAPA: reply longer than {DEFAULT_MAX_LISTING_BYTES} bytes" in _logged(caplog)
    assert peak < 2 * DEFAULT_MAX_LISTING_BYTES  # the buffer, and not a copy of it at every read
    world.assert_each_delivered_once(UIDLS)


# --- the login -------------------------------------------------------------------------------------------


def test_the_server_closing_after_pass_is_handed_over(world: World) -> None:
    calls = 0

    def close_once(session: Pop3Session, argument: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise CloseConnection
        session.default("PASS", argument)

    world.server.on("PASS", close_once)
    result = world.handed_over_round()
    assert result.status == "ok" and calls == 2
    world.assert_each_delivered_once(UIDLS)


@pytest.mark.parametrize(
    "reply",
    [
        f"-ERR [AUTH] password {PASSWORD} is wrong",
        # Not a status line at all: the probe must not quote it either (a protocol error quotes the line).
        f"NO password {PASSWORD} is wrong",
    ],
    ids=["err-echoing-the-password", "garbage-echoing-the-password"],
)
def test_a_refused_pass_echoing_the_password_logs_no_password(
    world: World, caplog: pytest.LogCaptureFixture, reply: str
) -> None:
    world.server.fail("PASS", reply, times=1)  # the probe's PASS; the full poll's is accepted
    with caplog.at_level(logging.DEBUG):
        # At DEBUG the wire trace would turn the probe off (probe_refusal): this test is about the probe.
        logging.getLogger("connector.pop3.wire").setLevel(logging.INFO)
        try:
            result = world.handed_over_round()
        finally:
            logging.getLogger("connector.pop3.wire").setLevel(logging.NOTSET)
    assert result.status == "ok"
    assert any("polled in full: PASS" in record.getMessage() for record in caplog.records)
    assert PASSWORD not in _logged(caplog)
    for record in caplog.records:  # the arguments too, as a formatter that does not format would write them
        assert PASSWORD not in repr(record.args) and PASSWORD not in str(record.msg)


# --- UIDL ------------------------------------------------------------------------------------------------


def test_uidl_refused_is_handed_over_and_the_maildrop_left_unlocked(world: World) -> None:
    world.server.fail("UIDL", "-ERR [SYS/TEMP] try later", times=1)
    commands = len(world.server.recorded.commands)
    result = world.handed_over_round()
    assert result.status == "ok"
    probe, full = (
        world.server.recorded.commands[commands:][:5],
        world.server.recorded.commands[commands + 5 :],
    )
    assert probe == ["CAPA", f"USER {ACCOUNT}", f"PASS {PASSWORD}", "UIDL", "QUIT"]  # QUIT: the lock goes
    assert full[:4] == ["CAPA", f"USER {ACCOUNT}", f"PASS {PASSWORD}", "UIDL"]
    world.assert_each_delivered_once(UIDLS)


def test_one_malformed_uidl_line_is_handed_over(world: World) -> None:
    world.server.messages[1].uidl_line = b"{n}"  # no unique-id at all
    result = world.handed_over_round()
    assert (result.status, result.delivered, result.unidentified) == ("ok", 0, 1)
    world.assert_each_delivered_once(UIDLS)


def test_a_uidl_listed_twice_is_handed_over_though_the_count_matches(world: World) -> None:
    """uid-2 gone and a new message listed as uid-1 again: three lines as the ledger keeps three messages,
    but not the same three."""
    world.server.messages = [*world.server.messages[:2], StoredMessage("uid-1", simple(7))]
    result = world.handed_over_round()
    assert result.status == "ok"
    assert world.server.recorded.deleted == []
    # What the full poll delivers here is its business (see the xfail below); the probe only handed over.


def test_a_delivered_message_whose_uidl_is_then_listed_twice_is_not_delivered_again(world: World) -> None:
    """Found while writing the test above: the full poll identifies both copies of a duplicated UIDL by
    header hash ("uid-1/hdr:..."), a key the ledger does not have for the message it delivered as "uid-1",
    so that message is delivered a second time (Message-ID <msg1@example.net> twice in the destination)."""
    world.server.messages = [*world.server.messages[:2], StoredMessage("uid-1", simple(7))]
    world.handed_over_round()
    message_ids = [stored.message_id for stored in world.destination.stored]
    assert message_ids.count("<msg1@example.net>") == 1


def _listed_twice(world: World) -> None:
    """uid-2 gone; uid-0 and uid-1 (delivered) still there, and a new message listed as uid-1 too."""
    world.server.messages = [*world.server.messages[:2], StoredMessage("uid-1", simple(7))]


def _message_ids(world: World) -> list[str]:
    return sorted(stored.message_id for stored in world.destination.stored)


EACH_ONCE = [f"<msg{n}@example.net>" for n in (0, 1, 2, 7)]


@pytest.mark.parametrize("removed", ["none", "the delivered one", "the new one"])
def test_a_uidl_listed_twice_delivers_the_new_message_once_and_nothing_at_the_next_polls(
    world: World, removed: str
) -> None:
    """The new copy under uid-1 is delivered once, keyed by its header hash; the delivered one keeps its
    row "uid-1". The next polls (handed over: a UIDL listed twice is never idle) deliver nothing, also once
    one of the two is removed from the server."""
    _listed_twice(world)
    result = world.handed_over_round()
    assert (result.status, result.delivered, result.unidentified) == ("ok", 1, 0)
    assert _message_ids(world) == EACH_ONCE
    [new_key] = [stored.uidl for stored in world.destination.stored if stored.message_id == EACH_ONCE[-1]]
    assert new_key.startswith("uid-1/hdr:")
    assert world.states()["uid-1"] == world.states()[new_key] == MessageState.DELIVERED
    result = world.handed_over_round()
    assert (result.status, result.delivered) == ("ok", 0)
    if removed == "the delivered one":
        del world.server.messages[1]
    elif removed == "the new one":
        del world.server.messages[2]
    for _ in range(2):
        result = world.round()
        assert (result.status, result.delivered, result.deleted) == ("ok", 0, 0)
    assert _message_ids(world) == EACH_ONCE
    assert world.server.recorded.deleted == []


def test_a_uidl_listed_twice_with_retention_delete_deletes_each_message_once_delivered(
    tmp_path: Path, ledger_template: Path
) -> None:
    """Delivered and DELEted, but the QUIT that would have removed them failed: the rows stay delivered,
    due for deletion. Then uid-1 is listed twice: the delivered message is deleted (not delivered again),
    the new one delivered and deleted; the next poll finds nothing to do."""
    with _world(tmp_path, ledger_template, _messages(UIDLS), retention="delete") as world:
        world.server.fail("QUIT", "-ERR [SYS/TEMP] could not expunge", times=1)
        world.handed_over_round()
        assert world.server.recorded.deleted == []
        assert set(world.states().values()) == {MessageState.DELIVERED}
        _listed_twice(world)
        result = world.round()
        assert (result.status, result.delivered, result.deleted) == ("ok", 1, 3)
        assert sorted(world.server.recorded.deleted) == ["uid-0", "uid-1", "uid-1"]
        assert world.server.messages == []
        assert _message_ids(world) == EACH_ONCE
        result = world.round()
        assert (result.status, result.delivered, result.deleted) == ("ok", 0, 0)
        assert _message_ids(world) == EACH_ONCE


def test_a_uidl_listed_twice_whose_row_has_no_header_hash_leaves_both_on_the_server(world: World) -> None:
    """A row written before header hashes were recorded cannot tell which of the two is the delivered one:
    both stay on the server, reported, at every poll, and the row is not forgotten (it is still listed)."""
    account_id = world.engine.ledger.account_id(ACCOUNT, create=False)
    with world.engine.ledger.engine.begin() as connection:
        connection.execute(
            update(MessageRow).where(MessageRow.account_id == account_id).values(header_hash=None)
        )
    _listed_twice(world)
    for _ in range(4):
        result = world.handed_over_round()
        assert (result.status, result.delivered, result.unidentified) == ("ok", 0, 2)
    assert _message_ids(world) == EACH_ONCE[:-1]
    rows = world.engine.ledger.known_messages(account_id or 0)
    assert (rows["uid-1"].state, rows["uid-1"].missing_polls) == (MessageState.DELIVERED, 0)
    assert rows["uid-2"].missing_polls == 4  # counted missing, as a message gone is
    status = world.status()
    assert status.identity_note is not None
    assert "UIDL 'uid-1' is listed more than once by the server; left on the server" in status.identity_note
    assert "nothing tells which one the row is about" in status.identity_note
    assert world.server.recorded.deleted == []


@pytest.mark.parametrize("terminator", ["bare-lf-terminator", "bare-lf-throughout"])
def test_a_listing_with_bare_lf_is_still_idle(world: World, terminator: str) -> None:
    def sloppy(session: Pop3Session, argument: str) -> None:
        lines = b"".join(f"{n} {uidl}\r\n".encode() for n, uidl in enumerate(UIDLS, 1))
        reply = b"+OK\r\n" + lines + b".\n"
        if terminator == "bare-lf-throughout":
            reply = reply.replace(b"\r\n", b"\n")
        session.send_raw(reply)

    world.server.on("UIDL", sloppy)
    assert world.idle_round().listed == 3


def test_replies_in_one_byte_segments_are_still_recognised_as_idle(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every reply sent a byte at a time, each its own TCP segment (no Nagle, a pause between): every
    boundary of every reply, the status lines' and the listing terminator's among them, falls between two
    reads of the probe."""

    def trickle(session: Pop3Session, data: bytes) -> None:
        session.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for at in range(len(data)):
            session.sock.sendall(data[at : at + 1])
            time.sleep(0.0005)

    monkeypatch.setattr(Pop3Session, "send_raw", trickle)
    assert world.idle_round().listed == 3


def test_one_more_uidl_than_the_ledger_is_handed_over_and_delivered_once(world: World) -> None:
    world.server.messages.append(StoredMessage("uid-3", simple(3)))
    result = world.handed_over_round()
    assert (result.status, result.delivered) == ("ok", 1)
    world.assert_each_delivered_once([*UIDLS, "uid-3"])
    world.handed_over_round()  # in full: the last poll delivered
    world.idle_round()  # the ledger keeps the fourth now
    world.assert_each_delivered_once([*UIDLS, "uid-3"])


# --- UIDLs that look like protocol ---------------------------------------------------------------------


@pytest.fixture
def dotted(tmp_path: Path, ledger_template: Path) -> Iterator[World]:
    """Messages whose UIDLs begin with "." (and one that is only dots): on the wire each line begins with
    its message number, so nothing is dot-stuffed, but a terminator search that looked for "." after any
    LF, or unstuffed the UIDL, would get them wrong."""
    with _world(tmp_path, ledger_template, _messages([".uid-0", "..", ".x"])) as world:
        world.handed_over_round()
        world.handed_over_round()  # in full: the last poll delivered
        yield world


def test_uidls_beginning_with_a_dot_are_idle_when_the_ledger_keeps_them(dotted: World) -> None:
    dotted.assert_each_delivered_once([".uid-0", "..", ".x"])
    assert dotted.idle_round().listed == 3
    dotted.assert_each_delivered_once([".uid-0", "..", ".x"])


# --- what the probe cannot even start ------------------------------------------------------------------


def test_a_ca_file_gone_since_the_configuration_was_read_costs_the_account_not_the_round(
    tmp_path: Path, ledger_template: Path
) -> None:
    """The configuration checks its ``ca_file`` when it is read; the TLS context is built (and rebuilt when
    the file changes) at the connection. A file removed since then (a certificate tool rewriting it) fails
    that: the full poll reports it as its account's error; the probe must not let it end the whole round,
    and the other accounts' polls with it."""
    _server_context, ca_file = tls_contexts(tmp_path)
    with _world(tmp_path, ledger_template, _messages(UIDLS), tls="implicit", ca_file=str(ca_file)) as world:
        ca_file.unlink()
        result = world.handed_over_round()
        assert result.status == "error" and "internal error" in (result.error or "")
        assert world.destination.uidls == []


def test_a_password_with_a_line_break_sends_no_second_command(world: World) -> None:
    """A password may hold a line break (TOML "\\r\\n", an accounts file): the POP3 client refuses to send
    it (the rest would be a command of its own). The probe must not send it either: here the rest is a
    DELE of the message just arrived, and a QUIT that carries it out, before anything delivered it."""
    world.server.messages.append(StoredMessage("uid-3", simple(3)))
    password = SecretStr(f"{PASSWORD}\r\nDELE 4\r\nQUIT")
    injected = world.account.model_copy(update={"password": password})
    before = len(world.full)
    [result] = poll_round(world.engine, [injected], workers=2, full_poll=world._full_poll)
    assert world.full[before:] == [ACCOUNT]
    assert result.status == "auth_error" and "line break" in (result.error or "")
    assert world.server.recorded.deleted == []
    assert "DELE 4" not in world.server.recorded.commands


def test_a_server_slow_to_answer_quit_after_a_handover_holds_up_no_other_account(
    tmp_path: Path, ledger_template: Path
) -> None:
    """alice's server refuses UIDL (a handover: the probe sends QUIT and awaits its reply, so that the full
    poll finds the maildrop unlocked) and answers that QUIT only after 2.5 s. bob's server is well behaved,
    only a little slow with CAPA; bob's poll is idle, and its timeout (1 s) is far longer than its session.
    The probe awaits alice's QUIT in its loop, as any other reply: bob's session goes on meanwhile (a
    blocking wait for it in the probe's one thread had bob handed over for a timeout it never had)."""
    quits = 0

    def slow_quit(session: Pop3Session, argument: str) -> None:
        nonlocal quits
        quits += 1
        if quits == 1:
            time.sleep(2.5)
        session.default("QUIT", argument)

    def slow_capa(session: Pop3Session, argument: str) -> None:
        time.sleep(0.3)  # alice's session reaches its UIDL first
        session.default("CAPA", argument)

    bobs = ScriptedPop3Server(_messages(UIDLS), username=ACCOUNT, password=PASSWORD)
    with bobs, _world(tmp_path, ledger_template, _messages(UIDLS), second=bobs, timeout="5s") as world:
        accounts = world.config.accounts
        full: list[str] = []

        def full_poll(account: Account) -> PollResult:
            full.append(account.name)
            return world.engine.poll(account)

        # Delivered, then polled in full once more (the last poll delivered), then idle; a first poll that
        # failed (both deliver the same messages into one destination at once) adds a round. Each full
        # poll's QUIT is not awaited: seen by each server before the next round logs in again (a maildrop
        # still locked would hand the next poll over for [IN-USE]).
        for _ in range(5):
            polled = len(full)
            poll_round(world.engine, accounts, workers=2, full_poll=full_poll)
            for server in (world.server, bobs):
                wait_until(lambda s=server: s.recorded.commands[-1:] == ["QUIT"], "the QUIT", timeout=5)
            if len(full) == polled:
                break  # both idle, recorded by the probe
        assert len(full) == polled and sorted(set(full)) == ["alice", "bob"]
        world.server.fail("UIDL", "-ERR [SYS/TEMP] try later", times=1)
        world.server.on("QUIT", slow_quit)
        bobs.on("CAPA", slow_capa)
        poll_round(world.engine, accounts, workers=2, full_poll=full_poll)
        assert full[polled:] == ["alice"]  # bob's poll was idle, recorded by the probe


@pytest.mark.parametrize("empty_listings", [1, 2], ids=["probe-only", "probe-and-full-poll"])
def test_a_listing_empty_once_is_handed_over_and_forgets_nothing(world: World, empty_listings: int) -> None:
    """The server lists nothing for a moment (a maildrop being repaired, a backend hiccup): the probe hands
    over; the full poll, whether it sees the empty listing too or the real one, neither forgets nor
    delivers anything; and once the listing is back (and, after an empty one, confirmed by a full poll),
    the account is the probe's again."""
    used = 0

    def empty(session: Pop3Session, argument: str) -> None:
        nonlocal used
        if argument or used >= empty_listings:
            session.default("UIDL", argument)
            return
        used += 1
        session.send_multiline("+OK", [])

    world.server.on("UIDL", empty)
    result = world.handed_over_round()
    assert (result.status, result.delivered, result.deleted) == ("ok", 0, 0)
    assert world.server.recorded.deleted == []
    world.assert_each_delivered_once(UIDLS)  # every row still delivered, none forgotten
    wait_until(lambda: world.server.recorded.commands[-1:] == ["QUIT"], "the full poll's QUIT", timeout=5)
    if empty_listings == 2:
        # The full poll saw the empty listing too: its rows are marked missing (not counted), and the poll
        # that finds them listed again is the full poll's.
        world.handed_over_round()
        wait_until(lambda: world.server.recorded.commands[-1:] == ["QUIT"], "the full poll's QUIT", timeout=5)
    world.idle_round()
    world.assert_each_delivered_once(UIDLS)
