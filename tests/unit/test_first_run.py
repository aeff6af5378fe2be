"""First-run papercuts (issue 15), each as a new user meets it: a missing ca_file, a destination pointed at a
POP3 port, TLS against a plain port, where the ledger is, a service that waits silently, a summary that
disagrees with the ledger, and the help text."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import certifi
import pytest

from connector.cli import build_parser, main
from connector.config import Account, load_config
from connector.destinations.imap import open_imap
from connector.errors import ConfigError, DestinationConnectError, SourceConnectError
from connector.ledger.database import open_database
from connector.ledger.records import PollOutcome
from connector.ledger.store import Ledger
from connector.poll.result import PollResult
from connector.pop3 import connect_pop3
from connector.service.scheduler import Service
from tests.unit.test_config import BASE, write
from tests.unit.test_scheduler import RecordingEngine, config_with

# --- ca_file ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ('destination = "local"', "accounts[0].ca_file"),
        ('password = "secret"', "destinations[0].ca_file"),
    ],
)
def test_a_missing_ca_file_is_a_configuration_error_naming_the_field(
    tmp_path: Path, where: str, field: str
) -> None:
    text = BASE.replace(where, f'{where}\nca_file = "{tmp_path}/no-such-ca.pem"')
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    missing = f"{tmp_path}/no-such-ca.pem"
    assert (
        str(caught.value)
        == f"{tmp_path / 'config.toml'}: {field}: cannot read {missing}: No such file or directory"
    )


def test_a_ca_file_without_certificates_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    text = BASE.replace('destination = "local"', f'destination = "local"\nca_file = "{tmp_path}/ca.pem"')
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.ca_file: .*ca.pem holds no certificate"):
        load_config(write(tmp_path, text))
    text = BASE.replace('destination = "local"', f'destination = "local"\nca_file = "{certifi.where()}"')
    assert load_config(write(tmp_path, text)).accounts[0].ca_file == Path(certifi.where())


@pytest.mark.parametrize("command", ["check", "sync"])
def test_check_and_sync_with_a_missing_ca_file_exit_2_without_a_traceback(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE.replace('destination = "local"', 'destination = "local"\nca_file = "/nonexistent/ca.pem"')
    assert main(["--config", str(write(tmp_path, text)), command]) == 2
    err = capsys.readouterr().err
    assert "accounts[0].ca_file: cannot read /nonexistent/ca.pem" in err
    assert "Traceback" not in err and "internal error" not in err


# --- the wrong port ------------------------------------------------------------------------------------


@pytest.fixture
def pop3_port() -> Iterator[int]:
    """A server that greets like POP3 on a plain port, whatever it is sent."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"+OK Dovecot ready. <123.456@pop.example>\r\n")
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    connection.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _open_imap(port: int, tls: str) -> None:
    open_imap(
        host="127.0.0.1",
        port=port,
        tls=tls,  # type: ignore[arg-type]
        ssl_context=None,
        timeout=5,
        username="archive",
        password="secret",
        folder="INBOX",
        mark_seen=False,
    )


def test_an_imap_destination_on_a_pop3_port_says_what_it_heard(pop3_port: int) -> None:
    with pytest.raises(DestinationConnectError) as caught:
        _open_imap(pop3_port, "none")
    message = caught.value.message
    assert "'+OK Dovecot ready. <123.456@pop.example>' does not look like IMAP" in message
    assert "POP3" in message and "None" not in message


def test_tls_against_a_plain_imap_port_says_what_to_change(pop3_port: int) -> None:
    with pytest.raises(DestinationConnectError) as caught:
        _open_imap(pop3_port, "implicit")
    message = caught.value.message
    assert "WRONG_VERSION_NUMBER" in message
    assert (
        f'the server on port {pop3_port} answered without TLS: for a port without TLS set tls = "starttls"'
        in message
    )
    assert '(or "none"), or use the TLS port (993)' in message


def test_tls_against_a_plain_pop3_port_says_what_to_change(pop3_port: int) -> None:
    with pytest.raises(SourceConnectError) as caught:
        connect_pop3("127.0.0.1", pop3_port, tls="implicit", ssl_context=None, timeout=5)
    message = caught.value.message
    assert "TLS handshake failed: WRONG_VERSION_NUMBER" in message
    assert 'set tls = "starttls" (or "none"), or use the TLS port (995)' in message


# --- where the ledger is -------------------------------------------------------------------------------


def test_without_database_sync_check_and_status_say_where_the_ledger_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No [service] database: the state directory ($STATE_DIRECTORY under systemd), not beside the config.
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    text = BASE[: BASE.index("[[accounts]]")]  # no accounts: nothing to log in to
    config = str(write(tmp_path, text))
    ledger = tmp_path / "state" / "state.db"

    assert main(["--config", config, "check"]) == 0
    assert (
        f"ledger: {ledger} (SQLite, not created yet; [service] database sets where)\n"
        in capsys.readouterr().err
    )

    assert main(["--config", config, "sync"]) == 0
    assert f"ledger: {ledger} (SQLite; [service] database sets where)\n" in capsys.readouterr().err

    # With JSON logs, stderr stays JSON lines: the line is one of them.
    assert main(["--config", config, "--log-format", "json", "sync"]) == 0
    err = capsys.readouterr().err.splitlines()  # and "no enabled accounts in the configuration"
    messages = [json.loads(line)["message"] for line in err if line.startswith("{")]
    assert f"ledger: {ledger} (SQLite; [service] database sets where)" in messages

    assert main(["--config", config, "status"]) == 0
    where = f"ledger: {ledger} (SQLite; [service] database sets where)"
    assert capsys.readouterr().out.splitlines()[-1] == where
    assert main(["--config", config, "status", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []  # stdout stays the JSON list
    assert where in captured.err.splitlines()


def test_a_server_database_is_shown_without_its_password() -> None:
    from connector.cli.report import ledger_line

    line = ledger_line("postgresql+psycopg://pc:s3cret@db.example/connector")
    assert line == "ledger: postgresql+psycopg://pc:***@db.example/connector"


# --- run after a sync ------------------------------------------------------------------------------------


def _ledger_with_next_poll(tmp_path: Path, name: str, when: datetime) -> Ledger:
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"))
    account_id = ledger.account_id(name)
    assert account_id is not None
    ledger.poll_finished(account_id, PollOutcome("ok", None, 0, 0, 0, when))
    return ledger


class HourlyEngine(RecordingEngine):
    """Each poll asks for the next an hour later: the tests see only the polls at start."""

    def poll(self, account: Account, *, stop: threading.Event, dry_run: bool = False) -> PollResult:
        result = super().poll(account, stop=stop, dry_run=dry_run)
        result.next_poll_at = self.clock() + timedelta(hours=1)
        return result


def _polled_and_rescheduled(service: Service, engine: RecordingEngine, name: str) -> bool:
    next_run = service.scheduled().get(name)
    return (
        engine.polls[name] > 0
        and next_run is not None
        and next_run > datetime.now(UTC) + timedelta(minutes=30)
    )


def test_run_logs_each_account_s_first_poll_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    ledger = _ledger_with_next_poll(tmp_path, "a0", later)
    engine = HourlyEngine()
    service = Service(config_with(accounts=2, max_workers=2), engine, ledger)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="connector.service.scheduler"):
        service.start()
        try:
            deadline = time.monotonic() + 30
            # a1 is due now: polled, then scheduled an hour later (shut down before that, APScheduler may
            # still be removing the run it just started); a0 waits for its hour.
            while not _polled_and_rescheduled(service, engine, "a1"):
                assert time.monotonic() < deadline, "a1 was not polled at start"
                time.sleep(0.02)
        finally:
            service.shutdown()
    assert engine.polls["a0"] == 0
    lines = [record.getMessage() for record in caplog.records if "first poll" in record.getMessage()]
    assert lines == [
        f"account a0: first poll at {later.isoformat(timespec='seconds')}, the next poll time its last poll "
        "chose (run --now polls at once)",
        "account a1: first poll now (never polled)",
    ]


def test_run_now_polls_every_account_at_once(tmp_path: Path) -> None:
    ledger = _ledger_with_next_poll(tmp_path, "a0", datetime.now(UTC) + timedelta(hours=1))
    engine = HourlyEngine()
    service = Service(config_with(accounts=1, max_workers=1), engine, ledger)  # type: ignore[arg-type]
    service.start(poll_now=True)
    try:
        deadline = time.monotonic() + 30
        while not _polled_and_rescheduled(service, engine, "a0"):
            assert time.monotonic() < deadline, "a0 was not polled at start"
            time.sleep(0.02)
    finally:
        service.shutdown()


def test_run_now_is_an_option_of_run() -> None:
    args = build_parser().parse_args(["run", "--now"])
    assert args.now is True


# --- help ------------------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_help_is_plain_text_and_lists_every_command() -> None:
    parser = build_parser()
    text = parser.format_help()
    assert "`" not in text and "``" not in text
    commands = _subparsers(parser)
    listed = text.split("positional arguments:", 1)[1]
    for name in commands:
        assert f"\n    {name} " in listed, name
    for name, sub in commands.items():
        assert "`" not in sub.format_help(), name
        for inner in _subparsers(sub).values():
            assert "`" not in inner.format_help(), name
    log_level = next(action for action in parser._actions if "--log-level" in action.option_strings)
    assert log_level.help
