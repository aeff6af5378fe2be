"""The logging set-up: the console, ``--log-file``, and the console handed over to the progress bars."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from connector import redaction
from connector.cli import EXIT_CONFIG, main
from connector.ops.bars import BarProgress, ProgressConsoleHandler
from connector.ops.logs import (
    JsonFormatter,
    TextFormatter,
    console_formatter,
    console_replaced,
    log_context,
    setup_logging,
)
from connector.poll.events import Fetched, Finished, Planned, Started
from connector.poll.result import PollResult

log = logging.getLogger("connector.test.logging_setup")


@pytest.fixture(autouse=True)
def _root_logger() -> Iterator[None]:
    """setup_logging configures the process's root logger: give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_the_log_file_gets_every_line_at_the_level_and_is_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "connector.log"
    old_umask = os.umask(0o022)  # what would make a plain open() world-readable
    try:
        setup_logging("INFO", "text", path)
    finally:
        os.umask(old_umask)
    with log_context("alice"):
        log.debug("not at this level")
        log.info("message 1 delivered to INBOX")
        log.warning("something to see")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = path.read_text()
    assert "INFO connector.test.logging_setup: message 1 delivered to INBOX [account=alice]" in written
    assert "WARNING" in written and "not at this level" not in written
    # Without a live display the console shows the same as before: everything at the level.
    console = capsys.readouterr().err
    assert "message 1 delivered" in console and "something to see" in console


def test_the_log_file_is_json_with_json_logs_and_redacted(tmp_path: Path) -> None:
    path = tmp_path / "connector.log"
    redaction.register("s3cret-value")
    setup_logging("DEBUG", "json", path)
    with log_context("alice"):
        log.debug("password is s3cret-value")
    (entry,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert entry["level"] == "DEBUG" and entry["account"] == "alice"
    assert entry["message"] == "password is ****"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_line_is_redacted_once_for_the_console_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, log_format: str
) -> None:
    """Redacting is most of a line's cost when the process knows many secrets (100,000 accounts'
    passwords): the console and the file share one formatting of each record, and both get it whole."""
    redacted: list[str] = []

    def counted(text: str) -> str:
        redacted.append(text)
        return redaction.redact(text)

    monkeypatch.setattr("connector.ops.logs.redact", counted)
    redaction.register("once-s3cret")
    path = tmp_path / "connector.log"
    setup_logging("INFO", log_format, path)  # type: ignore[arg-type]
    log.info("login with once-s3cret refused")
    assert len(redacted) == 1
    console, written = capsys.readouterr().err, path.read_text()
    assert "login with **** refused" in written and "once-s3cret" not in written
    assert written.strip() in console


def test_an_existing_log_file_is_appended_to_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "connector.log"
    path.write_text("earlier line\n")
    path.chmod(0o640)
    setup_logging("INFO", "text", path)
    log.info("later line")
    assert path.read_text().startswith("earlier line\n") and "later line" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_log_file_that_cannot_be_opened_raises_and_leaves_logging_alone(tmp_path: Path) -> None:
    before = list(logging.getLogger().handlers)
    with pytest.raises(OSError):
        setup_logging("INFO", "text", tmp_path / "no such directory" / "connector.log")
    assert logging.getLogger().handlers == before


def test_the_command_says_which_log_file_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no such directory" / "connector.log"
    assert main(["--log-file", str(path), "--config", str(tmp_path / "config.toml"), "status"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"cannot write the log file {path}" in err and "No such file or directory" in err


def test_the_console_can_be_replaced_while_the_file_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "connector.log"
    setup_logging("INFO", "json", path)
    assert isinstance(console_formatter(), JsonFormatter)
    seen = io.StringIO()
    replacement = logging.StreamHandler(seen)
    replacement.setLevel(logging.WARNING)
    with console_replaced(replacement):
        log.info("per message")
        log.warning("worth a look")
    log.info("after the bars")

    assert "per message" not in seen.getvalue() and "worth a look" in seen.getvalue()
    console = capsys.readouterr().err
    assert "per message" not in console and "worth a look" not in console and "after the bars" in console
    messages = [json.loads(line)["message"] for line in path.read_text().splitlines()]
    assert messages == ["per message", "worth a look", "after the bars"]


def test_without_set_up_the_console_format_is_text() -> None:
    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)
    assert isinstance(console_formatter(), TextFormatter)


def test_the_progress_console_handler_prints_warnings_through_the_rich_console() -> None:
    out = io.StringIO()
    handler = ProgressConsoleHandler(Console(file=out, width=40), TextFormatter())
    logger = logging.getLogger("connector.test.progress_console")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with log_context("alice"):
            logger.info("message 1 delivered")
            # Square brackets are not rich markup here, and a long line is not cut into several.
            logger.warning("[bold]quarantined[/bold] " + "x" * 60)
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "message 1 delivered" not in out.getvalue()
    assert "WARNING connector.test.progress_console: [bold]quarantined[/bold] " + "x" * 60 in lines[0]
    assert lines[0].endswith("[account=alice]")


def test_bars_keep_the_console_to_warnings_and_give_it_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "connector.log"
    setup_logging("INFO", "text", path)
    out = io.StringIO()
    bars = BarProgress([], Console(file=out, force_terminal=True, width=120))
    with bars:
        bars.notify(Started("alice"))
        bars.notify(Planned("alice", 1, 100, 1))
        log.info("account alice: message 1 delivered (100 bytes)")
        log.warning("account alice: message 2 quarantined")
        bars.notify(Fetched("alice", "1", 100, 100))
        bars.notify(Finished("alice", PollResult("alice", status="ok"), 1.0, 1))
    log.info("account alice: after the bars")

    screen = out.getvalue()
    assert "message 2 quarantined" in screen and "message 1 delivered" not in screen
    console = capsys.readouterr().err
    assert "delivered" not in console and "quarantined" not in console and "after the bars" in console
    written = path.read_text()
    assert "message 1 delivered" in written and "message 2 quarantined" in written
