"""SIGKILL and SIGTERM at random moments of `pop-connector sync` against real Dovecot, in every retention
mode; after each signal nothing is lost, duplicated or deleted before its delivery was recorded, and a
final run delivers everything exactly once (test_crash.py kills at fixed points instead).

Short by default. The long run (kills and SIGTERMs per retention mode)::

    POP_CONNECTOR_CRASH_KILLS=20 POP_CONNECTOR_CRASH_TERMS=6 \
        python -m pytest tests/acceptance/test_crash_random.py

``POP_CONNECTOR_CRASH_SEED=N`` replays a run (the seed is printed with ``-s``).
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.random_kills import CrashRun, KillStats, interrupt_repeatedly, mixed_mailbox
from tests.configs import config_toml, write_config
from tests.servers.dovecot import Dovecot, MailUsers

pytestmark = pytest.mark.acceptance

KILLS = int(os.environ.get("POP_CONNECTOR_CRASH_KILLS", "3"))
SEED = int(os.environ.get("POP_CONNECTOR_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
TERMS = int(os.environ.get("POP_CONNECTOR_CRASH_TERMS", "1"))
MESSAGES = int(os.environ.get("POP_CONNECTOR_CRASH_MESSAGES", "24"))
RETENTION = {"delete": "delete", "keep": "keep", "days": {"mode": "days", "days": 30}}


def _runs(tmp_path: Path, dovecot: Dovecot, retention: str, seed: int) -> Callable[[int], CrashRun]:
    rng = random.Random(seed)

    def make(round_number: int) -> CrashRun:
        users = MailUsers(source=dovecot.new_user("crsrc"), destination=dovecot.new_user("crdst"))
        directory = tmp_path / f"round{round_number}"
        directory.mkdir()
        database = directory / "ledger.sqlite3"
        text = config_toml(
            dovecot,
            users,
            f"sqlite:///{database}",
            name=users.source.name,
            account={"retention": RETENTION[retention]},
        )
        config = write_config(directory / "config.toml", text)
        messages = mixed_mailbox(MESSAGES, f"{retention}-{round_number}")
        dovecot.seed(users.source.name, messages)
        return CrashRun(dovecot, users, config, database, messages, rng, retention)

    return make


@pytest.mark.parametrize("retention", list(RETENTION))
def test_random_sigkills_and_sigterms(tmp_path: Path, dovecot: Dovecot, retention: str) -> None:
    stats = KillStats()
    # Interleaved, so SIGTERMs also meet ledgers that earlier SIGKILLs left with pending rows.
    signals = [signal.SIGKILL] * KILLS + [signal.SIGTERM] * TERMS
    random.Random(SEED).shuffle(signals)
    print(f"seed {SEED}")
    interrupt_repeatedly(_runs(tmp_path, dovecot, retention, SEED), signals, stats)
    print(f"{retention}: {stats}")
    assert (stats.kills, stats.terms) == (KILLS, TERMS)
