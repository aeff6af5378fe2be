"""The health endpoint notices a stuck scheduler (the service in-process, its scheduler paused) and an
unreachable database, and tells the details only to callers with the status token."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

from connector.ledger.database import make_engine, open_database
from connector.ledger.store import Ledger
from connector.ops.health import HealthMonitor
from connector.ops.metrics import PollMetrics
from connector.ops.web import Operations, OpsServer
from connector.service.runtime import Runtime
from tests.configs import make_config
from tests.servers.dovecot import Dovecot, MailUsers
from tests.waiting import wait_until

TOKEN = "health-token-5e1d"


def healthz(port: int, *, token: str | None = None, query: str = "") -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz{query}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
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


def test_healthz_without_the_token_names_no_account(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers, sqlite_url: str
) -> None:
    """12.9: a probe without the token learns the status word and the HTTP status, not which account is
    stuck; with the token (header or query) the problems are there as before."""
    config = make_config(
        tmp_path,
        dovecot,
        mail_users,
        sqlite_url,
        service={"metrics": "127.0.0.1:0", "health_grace": "1s", "status_token": TOKEN},
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
        assert healthz(port) == (200, {"status": "ok"})
        assert healthz(port, token=TOKEN) == (200, {"status": "ok", "problems": []})
        runtime.service._scheduler.pause()
        wait_until(lambda: healthz(port)[0] == 503, "the stuck scheduler to be noticed")
        assert healthz(port) == (503, {"status": "failing"})
        assert healthz(port, token="not-the-token") == (503, {"status": "failing"})
        for answer in (healthz(port, token=TOKEN), healthz(port, query=f"?token={TOKEN}")):
            code, body = answer
            problems = body["problems"]
            assert code == 503 and isinstance(problems, list)
            assert problems[0].startswith("scheduler stuck: account alice was due at ")
        runtime.service._scheduler.resume()
    finally:
        runtime.service.stop.set()
        thread.join(timeout=60)
        engine.dispose()
    assert not thread.is_alive()


def test_healthz_without_the_token_hides_the_database_error(
    tmp_path: Path, dovecot: Dovecot, mail_users: MailUsers
) -> None:
    """12.9: the first line of a database error names the database's host and port; a probe without the
    token gets the status word only."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])  # nothing listens there once the socket is closed
    database = f"postgresql+psycopg://connector@127.0.0.1:{port}/ledger?connect_timeout=5"
    config = make_config(
        tmp_path, dovecot, mail_users, database, service={"metrics": "127.0.0.1:0", "status_token": TOKEN}
    )
    engine = make_engine(database)
    assert config.service.metrics is not None
    server = OpsServer(
        config.service.metrics, Operations(lambda: config, Ledger(engine), PollMetrics(), HealthMonitor())
    )
    server.start()
    try:
        listening = server.address[1]
        code, body = healthz(listening)
        assert (code, body) == (503, {"status": "failing"})
        code, body = healthz(listening, token=TOKEN)
        problems = body["problems"]
        assert code == 503 and isinstance(problems, list)
        assert problems[0].startswith("database unreachable: OperationalError") and str(port) in problems[0]
    finally:
        server.stop()
        engine.dispose()
