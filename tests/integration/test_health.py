"""The health endpoint notices a stuck scheduler (the service in-process, its scheduler paused)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.runtime import Runtime
from tests.configs import make_config
from tests.servers.dovecot import Dovecot, MailUsers
from tests.waiting import wait_until


def healthz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_fails_while_the_scheduler_is_stuck(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, sqlite_url: str
) -> None:
    config = make_config(
        tmp_path,
        dovecot,
        mail_users,
        sqlite_url,
        service={"metrics": "127.0.0.1:0", "health_grace": "1s"},
        defaults={"poll_interval": "1s", "poll_jitter": 0},
    )
    engine = open_database(sqlite_url)
    runtime = Runtime(config, Ledger(engine), tmp_path / "config.toml")
    assert runtime.server is not None
    port = runtime.server.address[1]
    thread = threading.Thread(target=runtime.run)
    thread.start()
    try:
        wait_until(lambda: healthz(port)[0] == 200, "a healthy service")
        runtime.service._scheduler.pause()  # what a dead scheduler thread looks like from outside
        wait_until(lambda: healthz(port)[0] == 503, "the stuck scheduler to be noticed")
        problems = healthz(port)[1]["problems"]
        assert isinstance(problems, list)
        assert problems[0].startswith("scheduler stuck: account alice was due at ")
        assert problems[0].endswith("and has not started (grace 1s)")
        runtime.service._scheduler.resume()
        wait_until(lambda: healthz(port)[0] == 200, "recovery after the scheduler resumed")
    finally:
        runtime.service.stop.set()
        thread.join(timeout=60)
        engine.dispose()
    assert not thread.is_alive()
