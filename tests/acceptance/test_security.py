"""Security end to end: certificates are verified on both sides unless the config says otherwise, no
password is sent when TLS was asked for and is not there, and no secret ends up in any log line,
protocol trace, status output, error message or ledger byte after a run with every auth type and failure.
"""

from __future__ import annotations

import json
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli
from tests.acceptance.service import RunningService, free_port, wait_for
from tests.acceptance.test_operations import metric
from tests.configs import write_tables
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.scripted_pop3 import Pop3Session, ScriptedPop3Server, StoredMessage

pytestmark = pytest.mark.acceptance


def _secret(label: str) -> str:
    return f"{label}-{secrets.token_hex(6)}"


def _echo_password(session: Pop3Session, argument: str) -> None:
    # A careless server that repeats what it was sent in its refusal.
    session.send_line(f"-ERR [AUTH] wrong password {argument!s}")


def test_no_secret_anywhere_after_every_auth_type_and_failure(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, run_cli: RunCli
) -> None:
    source, destination = mail_users.source, mail_users.destination
    dovecot.seed(source.name, [simple(1), simple(2, message_id=False)])
    wrong_pop, wrong_imap, apop_ok, apop_bad, echoed = (
        _secret(x) for x in ("wrongpop", "wrongimap", "apopok", "apopbad", "echoed")
    )
    test_secrets = [source.password, destination.password, wrong_pop, wrong_imap, apop_ok, apop_bad, echoed]
    apop_server = ScriptedPop3Server([StoredMessage("a-1", simple(3))], username="apop", password=apop_ok)
    echo_server = ScriptedPop3Server([StoredMessage("e-1", simple(4))], username="echo", password="other")
    echo_server.on("PASS", _echo_password)

    plain = {"host": dovecot.host, "tls": "none", "destination": "dovecot", "timeout": "10s"}
    dovecot_pop = {**plain, "port": dovecot.ports.pop3, "username": source.name}
    database = tmp_path / "ledger.sqlite3"
    with apop_server, echo_server:
        accounts = [
            {**dovecot_pop, "name": "user-ok", "password": source.password},
            {**dovecot_pop, "name": "pop-wrong", "password": wrong_pop},
            {**dovecot_pop, "name": "imap-wrong", "password": source.password,
             "destination_username": destination.name, "destination_password": wrong_imap},
            {**dovecot_pop, "name": "tls-untrusted", "tls": "implicit", "port": dovecot.ports.pop3s,
             "password": source.password},
            {**plain, "name": "apop-ok", "port": apop_server.port, "auth": "apop", "username": "apop",
             "password": apop_ok},
            {**plain, "name": "apop-bad", "port": apop_server.port, "auth": "apop", "username": "apop",
             "password": apop_bad},
            {**plain, "name": "echoing-server", "port": echo_server.port, "username": "echo",
             "password": echoed},
        ]  # fmt: skip
        destinations = [
            {"name": "dovecot", "type": "imap", "host": dovecot.host, "port": dovecot.ports.imap,
             "tls": "none", "username": destination.name, "password": destination.password},
        ]  # fmt: skip
        config = str(write_tables(tmp_path / "config.toml", f"sqlite:///{database}", destinations, accounts))
        outputs = [
            run_cli("--config", config, "--log-level", "DEBUG", "sync"),
            run_cli("--config", config, "--log-level", "DEBUG", "check"),
        ]
    outputs += [
        run_cli("--config", config, "--log-level", "DEBUG", "status"),
        run_cli("--config", config, "--log-level", "DEBUG", "status", "--json"),
    ]
    sync = outputs[0]
    assert sync.returncode == 1
    for name in ("pop-wrong", "imap-wrong", "tls-untrusted", "apop-bad", "echoing-server"):
        assert name in sync.stdout, sync.stdout  # each failure is reported ...
    assert "DEBUG" in sync.stderr and "PASS ****" in sync.stderr  # ... with the protocol trace on
    assert len(dovecot.imap_messages(destination.name)) == 3  # user-ok and apop-ok delivered

    texts = {
        f"{' '.join(o.args[3:])} {stream}": getattr(o, stream)
        for o in outputs
        for stream in ("stdout", "stderr")
    }
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith("ledger")}
    assert "ledger.sqlite3" in files
    for secret in test_secrets:
        for where, text in texts.items():
            assert secret not in text, f"a password is in the output of {where}"
        for name, data in files.items():
            assert secret.encode() not in data, f"a password is in the database file {name}"
    for path in tmp_path.iterdir():
        if path.name.startswith("ledger"):
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path.name} is readable by others"


@pytest.mark.parametrize(
    ("side", "tls", "port"),
    [("pop3", "implicit", "pop3s"), ("pop3", "starttls", "pop3"), ("imap", "implicit", "imaps"),
     ("imap", "starttls", "imap")],
)  # fmt: skip
def test_certificates_are_verified_unless_told_otherwise(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, run_cli: RunCli, side: str, tls: str, port: str
) -> None:
    """Dovecot's certificate is signed by a CA nobody trusts: refused by default, accepted with ca_file
    or with tls_verify = false, on the POP3 side and on the IMAP side, implicit TLS and STARTTLS."""
    dovecot.seed(mail_users.source.name, [simple(1), simple(2), simple(3)])
    source, destination = mail_users.source, mail_users.destination
    database = tmp_path / "ledger.sqlite3"
    for n, (extra, ok) in enumerate(
        [({}, False), ({"ca_file": str(dovecot.ca_file)}, True), ({"tls_verify": False}, True)]
    ):
        secured = {"tls": tls, "port": getattr(dovecot.ports, port), **extra}
        pop = {"tls": "none", "port": dovecot.ports.pop3, **(secured if side == "pop3" else {})}
        imap = {"tls": "none", "port": dovecot.ports.imap, **(secured if side == "imap" else {})}
        config = write_tables(
            tmp_path / "config.toml",
            f"sqlite:///{database}",
            [{"name": "d", "type": "imap", "host": dovecot.host, "username": destination.name,
              "password": destination.password, **imap}],
            [{"name": "a", "host": dovecot.host, "username": source.name, "password": source.password,
              "destination": "d", "retention": "keep", **pop}],
        )  # fmt: skip
        result = run_cli("--config", str(config), "sync")
        assert (result.returncode == 0) is ok, result.stdout + result.stderr
        if not ok:
            assert "certificate" in result.stdout.lower(), result.stdout
        assert len(dovecot.imap_messages(destination.name)) == (3 if n else 0)


def test_starttls_required_sends_no_password_to_a_server_without_stls(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, run_cli: RunCli
) -> None:
    server = ScriptedPop3Server([StoredMessage("u-1", simple(1))], stls=False)
    with server:
        config = write_tables(
            tmp_path / "config.toml",
            f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
            [{"name": "d", "type": "imap", "host": dovecot.host, "port": dovecot.ports.imap, "tls": "none",
              "username": mail_users.destination.name, "password": mail_users.destination.password}],
            [{"name": "a", "host": "127.0.0.1", "port": server.port, "tls": "starttls", "username": "alice",
              "password": "secret", "destination": "d"}],
        )  # fmt: skip
        result = run_cli("--config", str(config), "sync")
    assert result.returncode == 1 and "STLS" in result.stdout, result.stdout
    assert not any(
        command.upper().startswith(("USER", "PASS", "APOP")) for command in server.recorded.commands
    )
    assert dovecot.imap_messages(mail_users.destination.name) == []


def test_a_rotated_password_is_redacted_after_a_reload(
    tmp_path: Path, write_cfg: Callable[..., Path]
) -> None:
    """12.7: the running service (protocol log on, DEBUG logging) has its password rotated on the server and
    in the file, then SIGHUP. The server repeats the password in its -ERR to UIDL, a line the POP3 client
    does not know to redact (unlike the answer to PASS): the new password is in no log, protocol log,
    page, metric or ledger byte."""
    old, new, token = _secret("oldpw"), _secret("rotatedpw"), _secret("status-token")
    server = ScriptedPop3Server([StoredMessage("r-1", simple(1))], username="rotating", password=old)

    def echo_in_uidl(session: Pop3Session, _argument: str) -> None:
        session.send_line(f"-ERR [SYS/TEMP] maildrop rotating:{session.server.password} is busy")

    server.on("UIDL", echo_in_uidl)
    logs, port = tmp_path / "protocol", free_port()
    with server:
        config = write_cfg(
            service={"metrics": f"127.0.0.1:{port}", "protocol_log_dir": str(logs), "status_token": token},
            defaults={"poll_interval": "1h"},
            account={"host": server.host, "port": server.port, "username": "rotating", "password": old,
                     "protocol_log": True},
        )  # fmt: skip

        def failed_polls() -> float:
            metrics = service.get("/metrics", token=token)[1]
            return metric(metrics, "pop_connector_polls_total", result="error") or 0

        with RunningService(config, port, "--log-level", "DEBUG") as service:
            wait_for("the first poll", lambda: failed_polls() == 1, service)
            metrics = service.get("/metrics", token=token)[1]
            assert metric(metrics, "pop_connector_account_state", account="alice", state="backing_off") == 1
            server.password = new
            config.write_text(config.read_text().replace(old, new))
            service.hup()
            wait_for("the poll after the reload", lambda: failed_polls() == 2, service)
            assert f"PASS {new}" in server.recorded.commands
            pages = {path: service.get(path, token=token)[1] for path in ("/", "/status.json", "/metrics")}
            pages["/healthz"] = service.get("/healthz")[1]
    status = json.loads(pages["/status.json"])[0]
    assert "is busy" in status["last_error"]  # the echo reached the ledger and the page, redacted
    trace = (logs / "alice.log").read_text()
    assert trace.count("maildrop rotating:**** is busy") == 2 and "PASS ****" in trace
    everything = {
        "service log": service.log(),
        **pages,
        **{str(path): path.read_bytes().decode("utf-8", "replace") for path in logs.iterdir()},
        **{str(path): path.read_bytes().decode("latin-1") for path in tmp_path.glob("ledger.sqlite3*")},
    }
    assert "configuration reloaded: changed alice" in everything["service log"]
    for where, content in everything.items():
        for secret in (old, new):
            assert secret not in content, f"a password is in {where}"
