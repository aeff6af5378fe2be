"""scripts/try-it: a new user's first run, end to end against the throwaway Dovecot it starts."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acceptance.conftest import ROOT

pytestmark = pytest.mark.acceptance


def test_try_it_syncs_sample_messages_into_imap() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "try-it")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sample: ok delivered=5" in result.stdout
    assert (
        "IMAP folder Imported/Hosted of archive" in result.stdout and "now holds 5 messages" in result.stdout
    )
    assert result.stdout.count("Subject: test message") == 5
    assert "now holds 0 messages" in result.stdout  # the POP3 side was emptied (retention "delete")
    assert "configuration written to" in result.stdout and "pop-connector-try-" in result.stdout


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_try_it_keep_keeps_dovecot_running_for_the_kept_config_until_ctrl_c() -> None:
    """A kept configuration whose Dovecot is gone is no use: with --keep the servers stay up until Ctrl-C."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "try-it"), "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C as in a terminal, however the suite was started: a shell starts a background job (`nohup
        # scripts/test &`) with SIGINT ignored, children inherit that, and Python then never raises
        # KeyboardInterrupt, so the script waited for a Ctrl-C it could not get.
        preexec_fn=_interruptible,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Dovecot keeps running for "):
                break
        kept = Path(lines[-1].split("Dovecot keeps running for ", 1)[1].split(":", 1)[0])
        assert kept.is_file(), "".join(lines)
        status = subprocess.run(
            [sys.executable, "-m", "connector", "--config", str(kept), "check"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr  # its servers still answer
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, "".join(lines) + rest
    assert "Dovecot stopped" in rest and f"kept {kept.parent}" in rest
    assert kept.is_file()
    shutil.rmtree(kept.parent)
