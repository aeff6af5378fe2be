"""Protocol logs (issue 4): one private rotating file per account, with timestamps, no secrets, no bodies.
And the house rule checked end to end: no password appears in any log, trace, output or the ledger."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance


def test_protocol_log_per_account_without_secrets_or_bodies(
    tmp_path: Path,
    dovecot: Dovecot,
    mail_users: MailUsers,
    write_cfg: Callable[..., Path],
    run_cli: RunCli,
) -> None:
    dovecot.seed(mail_users.source.name, [simple(1), simple(2, size=5000)])
    logs = tmp_path / "protocol"
    config = write_cfg(account={"protocol_log": True})
    text = config.read_text().replace("[service]\n", f'[service]\nprotocol_log_dir = "{logs}"\n', 1)
    config.write_text(text)
    sync = run_cli("--config", str(config), "--log-level", "DEBUG", "sync")
    assert sync.returncode == 0, sync.stderr
    # A wrong destination password too: refused logins are where secrets tend to leak into messages.
    dovecot.seed(mail_users.source.name, [simple(3)])
    bad = config.read_text().replace(mail_users.destination.password, "Wrong-Destination-Pw-42")
    config.write_text(bad)
    failed = run_cli("--config", str(config), "--log-level", "DEBUG", "sync")
    assert failed.returncode == 1
    status = run_cli("--config", str(config), "status", "--json")

    log_file = logs / "alice.log"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    trace = log_file.read_text()
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z connector\.pop3\.wire C: USER ", trace, re.M)
    assert "C: PASS ****" in trace and "LOGIN **REDACTED**" in trace
    assert re.search(r"S: <RETR body, \d+ bytes, sha256 [0-9a-f]{64}>", trace)
    assert re.search(r"delivered \S+: \d+ bytes, sha256 [0-9a-f]{64} -> imap:", trace)
    assert "Body of message" not in trace and "xxxxxxxxxx" not in trace  # bodies are never written

    secrets = [mail_users.source.password, mail_users.destination.password, "Wrong-Destination-Pw-42"]
    everything = {
        "sync output": sync.stdout + sync.stderr,
        "failed sync output": failed.stdout + failed.stderr,
        "status": status.stdout + status.stderr,
        **{str(path): path.read_bytes().decode("utf-8", "replace") for path in logs.iterdir()},
        **{str(path): path.read_bytes().decode("latin-1") for path in tmp_path.glob("ledger.sqlite3*")},
    }
    assert "C: PASS ****" in everything["sync output"]  # the DEBUG console trace was really there
    for where, content in everything.items():
        for secret in secrets:
            assert secret not in content, f"a password appears in {where}"
