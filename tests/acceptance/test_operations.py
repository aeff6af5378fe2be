"""Operating the service: metrics, health, status JSON, SIGHUP reload, JSON logs, sync progress."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.ops.progress import SUMMARY_COLUMNS
from tests.acceptance.conftest import ROOT, RunCli
from tests.acceptance.service import RunningService, free_port, wait_for
from tests.conftest import drop_postgres_database, fresh_postgres_database
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUser, MailUsers

pytestmark = pytest.mark.acceptance


def account_toml(name: str, dovecot: Dovecot, user: MailUser) -> str:
    return (
        f'\n[[accounts]]\nname = "{name}"\nhost = "{dovecot.host}"\nport = {dovecot.ports.pop3}\n'
        f'tls = "none"\nusername = "{user.name}"\npassword = "{user.password}"\ndestination = "dovecot"\n'
    )


def status_of(service: RunningService, name: str) -> dict[str, object] | None:
    code, body = service.get("/status.json")
    assert code == 200, body
    return next((record for record in json.loads(body) if record["account"] == name), None)


def polled_ok(service: RunningService, name: str) -> bool:
    record = status_of(service, name)
    return record is not None and record.get("last_result") == "ok"


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample, None when there is none (labels in the order Prometheus writes them)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    series = f"{name}{{{wanted}}}" if labels else name
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_metrics_health_status_and_reload(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path]
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    port = free_port()
    config = write_cfg(service={"metrics": f"127.0.0.1:{port}"}, defaults={"poll_interval": "1h"})
    with RunningService(config, port, "--log-format", "json") as service:
        wait_for("the first poll", lambda: polled_ok(service, "alice"), service)
        _, metrics = service.get("/metrics")
        assert metric(metrics, "pop_connector_messages_delivered_total") == 3
        assert metric(metrics, "pop_connector_polls_total", result="ok") == 1
        assert (metric(metrics, "pop_connector_bytes_delivered_total") or 0) > 600
        assert metric(metrics, "pop_connector_poll_duration_seconds_count") == 1
        assert metric(metrics, "pop_connector_scheduling_lag_seconds_count") == 1
        assert metric(metrics, "pop_connector_polls_in_progress") == 0
        assert metric(metrics, "pop_connector_accounts_configured") == 1
        assert metric(metrics, "pop_connector_overdue_accounts") == 0
        assert metric(metrics, "pop_connector_accounts", state="backing_off") == 0
        assert (metric(metrics, "process_resident_memory_bytes") or 0) > 0
        # alice is fine: no series names her (no backlog, no failure), and no counter has a _created.
        assert 'account="alice"' not in metrics and "_created" not in metrics
        assert service.get("/healthz") == (200, json.dumps({"status": "ok", "problems": []}))

        # SIGHUP: a new account is polled at once, a removed one is unscheduled, a broken file is refused.
        bob = dovecot.new_user("bob")
        dovecot.seed(bob.name, [simple(n) for n in range(2)])
        base = config.read_text()
        config.write_text(base + account_toml("bob", dovecot, bob))
        service.hup()
        wait_for("bob's first poll", lambda: polled_ok(service, "bob"), service)
        metrics = service.get("/metrics")[1]
        assert metric(metrics, "pop_connector_messages_delivered_total") == 5  # alice's 3 and bob's 2
        assert metric(metrics, "pop_connector_accounts_configured") == 2
        alice_section = base.index("[[accounts]]")
        config.write_text(base[:alice_section] + account_toml("bob", dovecot, bob))
        service.hup()
        wait_for(
            "alice's removal", lambda: (status_of(service, "alice") or {}).get("configured") is False, service
        )
        config.write_text("this is not toml [")
        service.hup()
        wait_for("the refused reload", lambda: "reload failed" in service.log(), service)
        assert polled_ok(service, "bob")
    assert service.process.returncode == 0
    log_lines = [json.loads(line) for line in service.log().splitlines() if line.strip()]
    for name in ("alice", "bob"):
        about = [line for line in log_lines if line["message"].startswith((f"account {name}", f"{name}: "))]
        assert len(about) > 3 and all(line.get("account") == name for line in about), about
    delivered = [line for line in log_lines if " delivered (" in line["message"]]
    assert len(delivered) == 5
    assert all(line["account"] in ("alice", "bob") and line["uidl"] in line["message"] for line in delivered)
    reloaded = [line["message"] for line in log_lines if line["message"].startswith("configuration reloaded")]
    assert reloaded == ["configuration reloaded: added bob", "configuration reloaded: removed alice"]
    assert mail_users.source.password not in service.log()
    dovecot.remove_user(bob.name)


@pytest.fixture
def own_postgres_url() -> Iterator[str]:
    with fresh_postgres_database("pop_connector_health") as url:
        yield url


def test_health_fails_when_the_database_goes_away(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], own_postgres_url: str
) -> None:
    port = free_port()
    config = write_cfg(service={"metrics": str(port), "database": own_postgres_url})
    with RunningService(config, port) as service:
        wait_for("the first poll", lambda: polled_ok(service, "alice"), service)
        assert service.get("/healthz")[0] == 200
        drop_postgres_database(own_postgres_url)
        code, body = service.get("/healthz")
        assert code == 503
        assert json.loads(body)["problems"][0].startswith("database unreachable: OperationalError")
        page_code, page = service.get("/")
        assert page_code == 200 and "database unreachable" in page


def test_sync_prints_progress_lines_and_a_summary_table(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n, size=3000) for n in range(4)])
    result = run_cli("--config", str(write_cfg()), "sync")
    assert result.returncode == 0, result.stderr
    assert re.search(r"account alice: 4 messages \(\d+ bytes\) to deliver", result.stderr)
    assert re.search(r"account alice: 4/4 messages, (\d+)/\1 bytes", result.stderr)
    table = result.stdout.splitlines()[-3:]
    assert table[0].split() == list(SUMMARY_COLUMNS)
    assert table[1].split()[:6] == ["alice", "ok", "4", "0", "0", "0"]
    assert table[2].split()[:7] == ["1", "accounts", "ok", "4", "0", "0", "0"]


def test_sync_json_logs_carry_account_and_uidl(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path], run_cli: RunCli
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(2)])
    result = run_cli("--config", str(write_cfg()), "--log-format", "json", "sync")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    about_alice = [line for line in lines if "alice" in line["message"]]
    assert about_alice and all(line.get("account") == "alice" for line in about_alice)
    delivered = [line for line in lines if " delivered (" in line["message"]]
    assert len(delivered) == 2 and all(line["uidl"] in line["message"] for line in delivered)


def test_sync_in_a_terminal_shows_progress_bars(
    dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path]
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(3)])
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "connector", "--config", str(write_cfg()), "sync"],
        cwd=ROOT,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(secondary)
    output = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert process.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert "3/3 msgs" in text and "alice (ok)" in text
    assert "sync summary" in text
