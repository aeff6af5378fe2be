"""How long the command line takes to start: ``python -m bench.startup [--repo PATH ...]``.

Three commands, each a fresh ``python -m connector`` process: ``--help``, ``status`` (one account, SQLite
ledger) and ``sync`` of that one account with nothing new (a throwaway Dovecot: connect, log in, UIDL,
QUIT). Each is run ``--runs`` times; the best wall time and the best CPU time (user + system of the child)
are reported, because on a shared machine the minimum is the figure least disturbed by others.
``--instructions`` adds the instructions each command executed (valgrind), which the load does not change.

``--repo`` names a checkout whose ``connector`` package is run (default: this one); given several times,
the checkouts take turns run by run, so that a before/after comparison is made in one run on one machine
(``--repo /work/old --repo .``). Every checkout gets a ledger of its own, created by a first ``sync`` that
delivers the seeded messages and is not counted. Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.configs import write_tables
from tests.servers.dovecot import Dovecot

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"--help": ["--help"], "status": ["status"], "sync": ["sync"]}


@dataclass
class Checkout:
    """One repository's CLI, with its own configuration and ledger."""

    path: Path
    config: Path
    label: str
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def run(
        self, python: str, args: list[str], *, importtime: bool = False, under: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``python -m connector --config CONFIG ARGS`` with this checkout's package."""
        env = {
            **os.environ,
            "PYTHONPATH": str(self.path),
            "PYTHONPYCACHEPREFIX": str(self.config.parent / "pycache"),
        }
        # An installed package runs from bytecode; without it each run would compile every module again.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        options = ["-X", "importtime"] if importtime else []
        command = [*under, python, *options, "-m", "connector", "--config", str(self.config), *args]
        # In the checkout: ``-m`` puts the working directory first on the path, before PYTHONPATH.
        return subprocess.run(command, env=env, cwd=self.path, capture_output=True, text=True, check=False)


def _label(path: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(path), "log", "-1", "--format=%h"], capture_output=True, text=True, check=False
    )
    revision = done.stdout.strip() or "?"
    dirty = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{path} ({revision}{'+' if dirty else ''})"


def timed(
    checkout: Checkout, python: str, args: list[str]
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall seconds and CPU seconds (user + system) of one run of the checkout's CLI, and how it ended."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = checkout.run(python, args)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done


def _check(name: str, done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0:
        raise SystemExit(f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    if name == "sync" and "bench: ok delivered=0 " not in done.stdout:
        raise SystemExit(f"the idle sync delivered something:\n{done.stdout}")


def instructions(python: str, checkout: Checkout, name: str) -> int:
    """Instructions the whole process executed, counted by valgrind (callgrind): the same on a busy machine
    as on a quiet one, unlike times."""
    done = checkout.run(
        python, COMMANDS[name], under=["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    )
    _check(name, done)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"valgrind counted nothing:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def heaviest_imports(python: str, checkout: Checkout, args: list[str], top: int) -> list[tuple[str, float]]:
    """The top-level packages whose modules took longest to import (``-X importtime``, seconds)."""
    done = checkout.run(python, args, importtime=True)
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        # Each module's own time, summed by top-level package: nested imports count for their own package.
        if own.isdigit():
            package = name.split(".")[0]
            totals[package] = totals.get(package, 0.0) + int(own) / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument(
        "--repo",
        action="append",
        type=Path,
        help="a checkout whose connector is run (repeatable; default: this one)",
    )
    parser.add_argument("--runs", type=int, default=7, help="runs of each command (default 7); best counts")
    parser.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    parser.add_argument(
        "--imports", type=int, default=0, metavar="N", help="also list the N slowest top-level imports"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count each command's instructions under valgrind (slow; independent of the load)",
    )
    options = parser.parse_args(argv)
    repos = [path.resolve() for path in options.repo or [ROOT]]
    with tempfile.TemporaryDirectory() as work, Dovecot() as dovecot:
        source, target = dovecot.new_user("startup"), dovecot.new_user("target")
        dovecot.seed(
            source.name, [f"Subject: {n}\r\nMessage-ID: <s{n}@bench>\r\n\r\nx\r\n".encode() for n in range(5)]
        )
        destination = {
            "name": "dovecot",
            "type": "imap",
            "host": dovecot.host,
            "port": dovecot.ports.imap,
            "tls": "none",
            "username": target.name,
            "password": target.password,
        }
        account = {
            "name": "bench",
            "host": dovecot.host,
            "port": dovecot.ports.pop3,
            "tls": "none",
            "username": source.name,
            "password": source.password,
            "destination": "dovecot",
            "retention": {"mode": "keep"},
        }
        checkouts = []
        for number, repo in enumerate(repos):
            directory = Path(work) / str(number)
            directory.mkdir()
            database = f"sqlite:///{directory / 'ledger.db'}"
            config = write_tables(directory / "config.toml", database, [destination], [account])
            checkout = Checkout(repo, config, _label(repo))
            done = checkout.run(options.python, ["sync"])
            if done.returncode != 0:
                raise SystemExit(f"the first sync with {repo} failed:\n{done.stdout}\n{done.stderr}")
            for args in COMMANDS.values():
                checkout.run(options.python, args)  # not counted: the bytecode is written now
            checkouts.append(checkout)
        for _run in range(options.runs):
            for checkout in checkouts:
                for name, args in COMMANDS.items():
                    wall, cpu, done = timed(checkout, options.python, args)
                    _check(name, done)
                    checkout.wall.setdefault(name, []).append(wall)
                    checkout.cpu.setdefault(name, []).append(cpu)
        print(f"start-up, best of {options.runs} runs (wall / CPU seconds), load {os.getloadavg()[0]:.2f}")
        for checkout in checkouts:
            print(checkout.label)
            for name in COMMANDS:
                line = f"  {name:8} {min(checkout.wall[name]):.3f} s / {min(checkout.cpu[name]):.3f} s"
                if options.instructions:
                    line += f" / {instructions(options.python, checkout, name) / 1e6:,.0f} M instructions"
                print(line)
            for name, args in COMMANDS.items() if options.imports else ():
                heaviest = heaviest_imports(options.python, checkout, args, options.imports)
                print(f"  imports of {name}: " + ", ".join(f"{m} {s:.3f}" for m, s in heaviest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
