"""Distributed workers log, count and report their polls like ``run``: two worker processes with JSON logs
on one PostgreSQL database; every log line about an account carries it, and each worker's operations
listener shows the polls that worker made."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.distributed_setup import (
    Fleet,
    WorkerProcess,
    cli,
    config_text,
    fresh_database,
    make_fleet,
    start_worker,
)
from tests.servers.dovecot import Dovecot

pytestmark = pytest.mark.integration

ACCOUNTS = 6
JSON_RUN = ["-m", "connector", "--log-format", "json"]
_LISTENING = re.compile(r"^status page, /metrics and /healthz on http://([^/]+):(\d+)/$")


@pytest.fixture
def fleet(dovecot: Dovecot) -> Iterator[Fleet]:
    fleet = make_fleet(dovecot, ACCOUNTS, lambda index: 2 + index % 2)
    try:
        yield fleet
    finally:
        fleet.remove()


def json_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    """Every line the worker wrote so far (each must be JSON), but one it is still writing."""
    lines = worker.text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def finished_polls(worker: WorkerProcess) -> Counter[str]:
    polls: Counter[str] = Counter()
    for line in json_lines(worker):
        if (
            line["logger"] == "connector.service.distributed.worker"
            and " poll finished on worker " in line["message"]
        ):
            polls[line["account"]] += 1
    return polls


def started(worker: WorkerProcess) -> bool:
    return any(
        line["message"].startswith("worker ") and " started: " in line["message"]
        for line in json_lines(worker)
    )


def wait_for(condition: Callable[[], bool], workers: list[WorkerProcess], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        for worker in workers:
            assert worker.process.poll() is None, f"{worker.name} exited:\n{worker.text()[-3000:]}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"waited in vain for {what}:\n" + "\n".join(w.text()[-2000:] for w in workers)
            )
        time.sleep(0.2)


def listener(worker: WorkerProcess) -> str:
    for line in json_lines(worker):
        match = _LISTENING.match(line["message"])
        if match is not None:
            return f"http://{match.group(1)}:{match.group(2)}"
    raise AssertionError(f"worker {worker.name} announced no listener:\n{worker.text()[-3000:]}")


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def sample(text: str, series: str) -> float | None:
    """The value of ``series`` (a name and its labels as written), None when it has no sample."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def test_two_workers_log_every_line_with_its_account_and_serve_their_own_metrics(
    dovecot: Dovecot, fleet: Fleet, postgres_url: str, tmp_path: Path
) -> None:
    names = [user.name for user in fleet.sources]
    with fresh_database() as database:
        config = tmp_path / "config.toml"

        def write_config(accounts: Fleet) -> None:
            # Port 0: each worker listens on a port of its own, read from its log; one file for both.
            config.write_text(
                config_text(accounts, database, poll_interval="1h", max_workers=2, metrics="127.0.0.1:0")
            )

        # The accounts come once both workers run (a worker reads its changed file within a second), so
        # that both share them: the first to start would take them all otherwise.
        write_config(Fleet(dovecot, fleet.destination))
        upgraded = cli("--config", str(config), "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        workers = [start_worker(config, f"w{index}", tmp_path, JSON_RUN) for index in range(2)]
        try:
            wait_for(lambda: all(started(worker) for worker in workers), workers, "both workers to start")
            write_config(fleet)

            def all_polled() -> bool:
                polled = sum((finished_polls(worker) for worker in workers), Counter())
                return set(polled) == set(names) and not any(dovecot.maildir_count(name) for name in names)

            wait_for(all_polled, workers, "a poll of every account")
            served = {worker.name: get(listener(worker) + "/metrics")[1] for worker in workers}
            health = {worker.name: get(listener(worker) + "/healthz") for worker in workers}
            status = json.loads(get(listener(workers[0]) + "/status.json")[1])
        finally:
            codes = [worker.stop() for worker in workers]
    assert codes == [0, 0], "\n".join(worker.text()[-2000:] for worker in workers)

    # Each worker's /metrics counts exactly the polls that worker made, and only those; what the accounts
    # table says (accounts, overdue ones, failing ones) is the same on both.
    for worker in workers:
        made = finished_polls(worker)
        assert made, f"{worker.name} polled nothing"
        text = served[worker.name]
        polls = sum(made.values())
        assert sample(text, 'pop_connector_polls_total{result="ok"}') == polls, worker.name
        assert sample(text, "pop_connector_scheduling_lag_seconds_count") == polls, worker.name
        assert sample(text, "pop_connector_polls_in_progress") == 0
        assert sample(text, "pop_connector_accounts_configured") == ACCOUNTS
        assert sample(text, "pop_connector_overdue_accounts") == 0
        assert sample(text, 'pop_connector_accounts{state="backing_off"}') == 0
        assert 'account="' not in text  # every account is fine: no series names one
        assert health[worker.name] == (200, json.dumps({"status": "ok", "problems": []}))
    assert {record["account"]: record["last_result"] for record in status} == dict.fromkeys(names, "ok")

    # Every line that names an account carries it: the poll's, the worker's and procrastinate's own.
    lines = [line for worker in workers for line in json_lines(worker)]
    about = {name: [line for line in lines if name in line["message"]] for name in names}
    for name, its_lines in about.items():
        assert [line for line in its_lines if line.get("account") != name] == [], name
        loggers = {line["logger"] for line in its_lines}
        assert {"connector.service.distributed.worker", "connector.ops.poll_log"} <= loggers, loggers
        assert any(logger.startswith("connector.poll.") for logger in loggers), loggers
        assert any(logger.startswith("procrastinate.worker") for logger in loggers), loggers
    delivered = [line for line in lines if " delivered (" in line["message"]]
    assert len(delivered) == sum(len(mail) for mail in fleet.seeded.values())
    assert all(line["uidl"] in line["message"] for line in delivered)
