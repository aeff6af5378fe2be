"""scripts/try-it: a new user's first run, end to end against the throwaway Dovecot it starts."""

from __future__ import annotations

import subprocess
import sys

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
