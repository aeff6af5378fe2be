"""Protocol log files: private modes across rotation, and the last-guard redaction of secrets."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from connector import redaction
from connector.ops.protocol_log import _PrivateRotatingFile, _Redacting


def test_rotated_files_stay_private_and_secrets_are_redacted(tmp_path: Path) -> None:
    handler = _PrivateRotatingFile(tmp_path / "a.log", maxBytes=200, backupCount=2, encoding="utf-8")
    redaction.register("hunter22", "xy")
    handler.setFormatter(_Redacting())
    logger = logging.getLogger("tests.protocol_log")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for n in range(20):
            logger.warning("S: line %d with hunter22 and xy", n)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["a.log", "a.log.1", "a.log.2"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        text = path.read_text()
        assert "hunter22" not in text and "with **** and xy" in text  # too short to redact blindly
        assert text.split(" ", 1)[0].endswith("Z")
