"""The benchmark run: one throwaway Dovecot, every scenario, connector and baselines on the same data."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import data, fetchmail, gmail
from bench.proxy import DelayProxy
from bench.setup import (
    SERVICE,
    SERVICE_PASSWORD,
    connector_config,
    endpoint,
    ews_connector_config,
    imap_endpoint,
    prime_ledger,
    uidls,
)
from tests.servers.dovecot import Dovecot, MailUser
from tests.servers.ews import EwsServer

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    small_count: int = 2000
    small_size: int = 5 * 1024
    large_count: int = 200
    large_size: int = MB
    huge_size: int = 50 * MB
    latency_count: int = 2000
    latency_ms: float = 25.0
    idle_accounts: int = 1000
    big_mailbox: int = 100_000
    new_messages: int = 10
    ews_count: int = 500
    create_batch: int = 10
    gmail_count: int = 100
    gmail_mailboxes: int = 2


QUICK = Sizes(
    small_count=30,
    large_count=3,
    large_size=256 * 1024,
    huge_size=2 * MB,
    latency_count=20,
    idle_accounts=10,
    big_mailbox=300,
    new_messages=3,
    ews_count=20,
    gmail_count=5,
    gmail_mailboxes=1,
)


@dataclass
class Row:
    scenario: str
    connector: str
    baseline: str
    ratio: float
    fetchmail: str = "-"
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(
        self, dovecot: Dovecot, workdir: Path, sizes: Sizes, *, use_fetchmail: bool, profile: str | None
    ):
        self.dovecot, self.workdir, self.sizes = dovecot, workdir, sizes
        self.use_fetchmail = use_fetchmail
        self.profile = profile
        self.database_dir: Path | None = None
        self.repeat = 1
        # Connector runs import ``connector`` (and bench.worker) from here: another worktree, e.g. of the
        # commit before a change, for before/after figures in one run against the same Dovecot and data.
        self.connector_root: Path | None = None
        self._jobs = 0

    # --- plumbing -------------------------------------------------------------------------------------

    def _worker(self, job: dict[str, Any]) -> dict[str, Any]:
        self._jobs += 1
        path = self.workdir / f"job{self._jobs}.json"
        command = [sys.executable, "-m", "bench.worker", str(path)]
        if self.profile == "cprofile" and job["kind"] == "connector":
            job["profile"] = str(self.workdir / f"job{self._jobs}.prof")
        elif self.profile == "py-spy" and job["kind"] == "connector":
            # Every thread, native waits included: shows where the fetching thread and the poll wait.
            job["profile"] = str(self.workdir / f"job{self._jobs}.folded")
            command = [
                "py-spy",
                "record",
                "--idle",
                "--threads",
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                job.pop("profile"),
                "--",
                *command,
            ]
            print(f"  profile: {self.workdir / f'job{self._jobs}.folded'}", file=sys.stderr)
        path.write_text(json.dumps(job))
        env = None
        if self.connector_root is not None and job["kind"] == "connector":
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.connector_root), str(ROOT)])}
        result = subprocess.run(
            command,
            cwd=self.connector_root if env is not None else ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"benchmark worker failed: {result.stdout[-1000:]}{result.stderr[-3000:]}")
        # The last JSON line: a profiler may print its own lines after the worker's.
        line = [line for line in result.stdout.splitlines() if line.startswith("{")][-1]
        figures: dict[str, Any] = json.loads(line)
        if "profile" in job:
            print(f"  profile: {job['profile']}", file=sys.stderr)
        return figures

    def _database(self, name: str) -> str:
        directory = self.database_dir or self.workdir
        return f"sqlite:///{directory / (name + '.sqlite3')}"

    def _user(self, prefix: str, messages: Sequence[bytes] = ()) -> MailUser:
        user = self.dovecot.new_user(prefix)
        if messages:
            self.dovecot.seed(user.name, list(messages))
        return user

    def _connector(
        self, name: str, sources: Sequence[MailUser], destination: MailUser, **kw: Any
    ) -> dict[str, Any]:
        database = kw.pop("database", None) or self._database(name)
        config = connector_config(
            self.workdir / f"{name}.toml", database, self.dovecot, sources, destination, **kw
        )
        return self._worker({"kind": "connector", "config": str(config), "count": "delivered"})

    def _baseline(
        self, mode: str, sources: Sequence[MailUser], destination: MailUser | None, **kw: Any
    ) -> dict[str, Any]:
        port, tls = kw.pop("pop3_port", None), kw.pop("tls", False)
        job = {
            "kind": "baseline",
            "mode": mode,
            "sources": [endpoint(self.dovecot, source, port, tls=tls).__dict__ for source in sources],
            "destination": imap_endpoint(self.dovecot, destination) if destination else None,
            **kw,
        }
        return self._worker(job)

    @staticmethod
    def _check(label: str, result: dict[str, Any], expected: int) -> None:
        if result["count"] != expected:
            raise RuntimeError(f"{label}: moved {result['count']} messages, expected {expected}")

    # --- throughput scenarios (1), (2), (3), (4) --------------------------------------------------------

    def _move(
        self, name: str, messages: list[bytes], *, latency: float = 0.0
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Baseline and connector alternately, ``repeat`` times without latency (once with): the run of
        median time of each side (other load on the machine moves single runs a lot)."""
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "connector": []}
        for round_ in range(1 if latency else self.repeat):
            for side in _in_turn(runs, round_):
                runs[side].append(self._move_once(name, side, messages, latency))
        base, conn = (sorted(results, key=lambda r: r["seconds"]) for results in runs.values())
        return base[len(base) // 2], conn[len(conn) // 2]

    def _move_once(self, name: str, side: str, messages: list[bytes], latency: float) -> dict[str, Any]:
        source, destination = self._user(f"{name}src", messages), self._user(f"{name}dst")
        uidls(endpoint(self.dovecot, source))  # Dovecot indexes the new maildrop outside the timing
        with DelayProxy((self.dovecot.host, self.dovecot.ports.pop3), latency / 1000) as proxy:
            port = proxy.port if latency else None
            if side == "baseline":
                result = self._baseline("move", [source], destination, pop3_port=port)
            else:
                result = self._connector(f"{name}{self._jobs}", [source], destination, pop3_port=port)
        self._check(f"{name} {side}", result, len(messages))
        for user in (source, destination):  # 200 MB per repetition otherwise stay on disk
            self.dovecot.remove_user(user.name)
        return result

    def _fetchmail(self, name: str, messages: list[bytes]) -> float | None:
        if not self.use_fetchmail:
            return None
        source, destination = self._user(f"{name}fm", messages), self._user(f"{name}fmd")
        uidls(endpoint(self.dovecot, source))
        seconds = fetchmail.move_all(self.dovecot, source, destination, self.workdir)
        if self.dovecot.maildir_count(destination.name) != len(messages):
            raise RuntimeError(f"fetchmail delivered {self.dovecot.maildir_count(destination.name)} messages")
        return seconds

    def messages_per_second(self, label: str, count: int, size: int, latency: float = 0.0) -> Row:
        messages = data.messages(count, size)
        base, conn = self._move(label.split()[0].strip("()"), messages, latency=latency)
        fm = None if latency else self._fetchmail("fm" + str(size), messages)
        rate = lambda seconds: count / seconds  # noqa: E731
        return Row(
            label,
            f"{rate(conn['seconds']):.0f} msg/s",
            f"{rate(base['seconds']):.0f} msg/s",
            rate(conn["seconds"]) / rate(base["seconds"]),
            fetchmail="-" if fm is None else f"{rate(fm):.0f} msg/s",
        )

    def megabytes_per_second(self, label: str, count: int, size: int) -> Row:
        messages = data.messages(count, size)
        total = sum(len(m) for m in messages) / MB
        base, conn = self._move("large", messages)
        fm = self._fetchmail("fmlarge", messages)
        return Row(
            label,
            f"{total / conn['seconds']:.1f} MB/s",
            f"{total / base['seconds']:.1f} MB/s",
            base["seconds"] / conn["seconds"],
            fetchmail="-" if fm is None else f"{total / fm:.1f} MB/s",
        )

    def single_huge(self, label: str, size: int) -> Row:
        messages = [data.message(0, size)]
        base, conn = self._move("huge", messages)
        actual = len(messages[0]) / MB

        def memory(result: dict[str, Any]) -> str:
            above = (result["peak_rss_kib"] - result["idle_rss_kib"]) / 1024
            return f"{result['seconds']:.2f} s, peak +{above:.0f} MB ({above / actual:.1f}x)"

        return Row(
            label,
            memory(conn),
            memory(base),
            base["seconds"] / conn["seconds"],
            notes=[f"message {actual:.1f} MB; peak RSS above the idle process (target <= 2.5x)"],
        )

    # --- polls without much to do (5), (6) ---------------------------------------------------------------

    def idle_accounts(self, label: str, accounts: int) -> list[Row]:
        """The same accounts polled over POP3 without TLS, then over POP3S (TLS), each with a fresh
        ledger that knows their one message as delivered: connect, log in, UIDL, nothing new, QUIT."""
        sources = [self._user("idle", [data.message(n, 2048)]) for n in range(accounts)]
        known = {source.name: uidls(endpoint(self.dovecot, source)) for source in sources}
        destination = self._user("idledst")
        rows = []
        for tls in (False, True):
            name = "idletls" if tls else "idle"
            database = self._database(name)
            prime_ledger(database, known)
            base = self._baseline("idle", sources, None, tls=tls)
            conn = self._connector(name, sources, destination, database=database, retention="keep", tls=tls)
            conn_rate, base_rate = accounts / conn["seconds"], accounts / base["seconds"]
            conn_cpu, base_cpu = conn["cpu"] / accounts * 1000, base["cpu"] / accounts * 1000
            variant = "POP3S (TLS)" if tls else "POP3 (no TLS)"
            rows.append(
                Row(
                    f"{label}, {variant}",
                    f"{conn_rate:.0f} polls/s, {conn_cpu:.2f} ms CPU/poll",
                    f"{base_rate:.0f} polls/s, {base_cpu:.2f} ms CPU/poll",
                    conn_rate / base_rate,
                    notes=[
                        f"{variant}: CPU per poll connector/baseline {conn_cpu / base_cpu:.1f}x "
                        f"(target <= 2x), {conn_rate:.0f} polls/s (target >= 300); {accounts} accounts, "
                        "max_workers = 8 (the default: the idle probe keeps 8 sessions in flight in one "
                        "thread); baseline polls one at a time"
                    ],
                )
            )
        return rows

    def big_mailbox(self, label: str, kept: int, new: int) -> Row:
        """One poll of a maildrop keeping ``kept`` messages with ``new`` new ones, ``repeat`` times per side,
        alternately (each round ``new`` more arrive; the medians are shown, with the CPU of that run)."""
        old = data.messages(kept, 1024)
        sides: dict[str, tuple[MailUser, MailUser]] = {}
        for side in ("baseline", "connector"):
            sides[side] = self._user(f"big{side}", old), self._user(f"big{side}dst")
        database = self._database("big")
        connector_source = sides["connector"][0]
        prime_ledger(database, {connector_source.name: uidls(endpoint(self.dovecot, connector_source))})
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "connector": []}
        for round_ in range(self.repeat):
            fresh = [data.message(kept + round_ * new + n, 5 * 1024) for n in range(new)]
            for side in _in_turn(sides, round_):
                source, destination = sides[side]
                # The ones delivered in earlier rounds are known too (the connector's ledger has them).
                known = uidls(endpoint(self.dovecot, source))
                self.dovecot.seed(source.name, fresh)
                if side == "baseline":
                    known_file = self.workdir / "known.txt"
                    known_file.write_text("\n".join(known))
                    result = self._baseline("new", [source], destination, known=str(known_file))
                else:
                    result = self._connector(
                        "big", [source], destination, database=database, retention="keep"
                    )
                self._check(f"big mailbox {side}", result, new)
                runs[side].append(result)
        base, conn = (sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for rs in runs.values())
        return Row(
            label,
            f"{conn['seconds']:.2f} s ({conn['cpu']:.2f} s CPU)",
            f"{base['seconds']:.2f} s ({base['cpu']:.2f} s CPU)",
            base["seconds"] / conn["seconds"],
            notes=[f"target: under 1 s; median of {self.repeat} run(s) per side, alternately"],
        )

    # --- a migration into Exchange (7) ------------------------------------------------------------------

    def ews_migration(self, label: str, count: int, size: int, latency: float, create_batch: int) -> Row:
        """The connector into the EWS test server behind the delaying proxy, one CreateItem per message
        (``create_batch = 1``, the path before issue 16) against ``create_batch`` messages per request."""
        messages = data.messages(count, size)
        with EwsServer() as ews:
            ews.add_user(SERVICE, SERVICE_PASSWORD, impersonation=True)
            upstream = ("127.0.0.1", int(ews.base_url.rsplit(":", 1)[1]))
            with DelayProxy(upstream, latency / 1000) as proxy:
                url = ews.service_endpoint.replace(f":{upstream[1]}/", f":{proxy.port}/")
                single = self._ews_once(ews, url, messages, 1)
                batched = self._ews_once(ews, url, messages, create_batch)
            requests = len(ews.batches())
        return Row(
            label,
            f"{batched:.0f} msg/s (create_batch {create_batch})",
            f"{single:.0f} msg/s (create_batch 1)",
            batched / single,
            notes=[
                "baseline column: the connector itself with one CreateItem per message (before issue 16); "
                f"{requests} CreateItem requests for both runs; target ratio >= 3"
            ],
        )

    def _ews_once(self, ews: EwsServer, url: str, messages: list[bytes], create_batch: int) -> float:
        """Messages per second of one poll moving ``messages`` into a new mailbox."""
        name = f"ews{create_batch}x{self._jobs}"
        mailbox = f"{name}@corp.example"
        ews.add_mailbox(mailbox)
        source = self._user(f"ews{create_batch}src", messages)
        uidls(endpoint(self.dovecot, source))
        config = ews_connector_config(
            self.workdir / f"{name}.toml",
            self._database(name),
            self.dovecot,
            source,
            ews,
            mailbox=mailbox,
            service_endpoint=url,
            create_batch=create_batch,
        )
        result = self._worker({"kind": "connector", "config": str(config), "count": "delivered"})
        self._check(f"EWS create_batch {create_batch}", result, len(messages))
        created = len(ews.items(mailbox))
        if created != len(messages):
            raise RuntimeError(f"EWS create_batch {create_batch}: {created} items for {len(messages)}")
        self.dovecot.remove_user(source.name)
        return len(messages) / float(result["seconds"])


def _scenarios(bench: Bench, sizes: Sizes) -> dict[str, Callable[[], Row | list[Row]]]:
    kb = lambda size: f"{size // 1024} KB" if size < MB else f"{size // MB} MB"  # noqa: E731
    return {
        "1": lambda: bench.messages_per_second(
            f"(1) {sizes.small_count} x {kb(sizes.small_size)}", sizes.small_count, sizes.small_size
        ),
        "2": lambda: bench.megabytes_per_second(
            f"(2) {sizes.large_count} x {kb(sizes.large_size)}", sizes.large_count, sizes.large_size
        ),
        "3": lambda: bench.single_huge(f"(3) 1 x {kb(sizes.huge_size)}", sizes.huge_size),
        "4": lambda: bench.messages_per_second(
            f"(4) {sizes.latency_count} x {kb(sizes.small_size)}, +{sizes.latency_ms:g} ms each way",
            sizes.latency_count,
            sizes.small_size,
            latency=sizes.latency_ms,
        ),
        "5": lambda: bench.idle_accounts(f"(5) {sizes.idle_accounts} idle accounts", sizes.idle_accounts),
        "6": lambda: bench.big_mailbox(
            f"(6) {sizes.big_mailbox} kept + {sizes.new_messages} new", sizes.big_mailbox, sizes.new_messages
        ),
        "7": lambda: bench.ews_migration(
            f"(7) {sizes.ews_count} x {kb(sizes.small_size)} into EWS, +{sizes.latency_ms:g} ms each way",
            sizes.ews_count,
            sizes.small_size,
            sizes.latency_ms,
            sizes.create_batch,
        ),
        "8": lambda: gmail_row(sizes.gmail_count, sizes.gmail_mailboxes, sizes.latency_ms),
    }


def gmail_row(count: int, mailboxes: int, latency: float) -> Row:
    """Gmail imports per mailbox (bench/gmail.py): the bound is the API's quota, not a bare loop."""
    with tempfile.TemporaryDirectory() as work:
        figures = gmail.run(count, mailboxes, latency, Path(work))
    return Row(
        f"(8) {mailboxes} Gmail mailbox(es) x {count}, +{latency:g} ms",
        f"{figures['per_mailbox']:.1f} msg/s per mailbox",
        f"{gmail.CEILING:g} msg/s (quota ceiling)",
        figures["of_ceiling"],
        notes=[
            "(8) ratio: the share of Gmail's per-user quota ceiling reached; "
            f"{figures['throttled']:.0f} requests answered 429"
        ],
    )


def format_table(rows: Sequence[Row]) -> str:
    header = ("scenario", "connector", "baseline", "ratio", "fetchmail")
    cells = [header] + [(r.scenario, r.connector, r.baseline, f"{r.ratio:.2f}", r.fetchmail) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    notes = [f"{r.scenario.split()[0]} {note}" for r in rows for note in r.notes]
    return "\n".join([*lines, "", *notes])


def _in_turn(sides: Mapping[str, object], round_: int) -> list[str]:
    """The sides in the order of this round: each goes first every other round, since the second run of a
    round measured ~40 ms slower on a 100,000-message maildrop, whichever client it was."""
    order = list(sides)
    return order if round_ % 2 == 0 else order[::-1]


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    python = platform.python_version()
    return f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs, Python {python}, load average {load}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every scenario")
    parser.add_argument("--scenarios", default="1,2,3,4,5,6,7,8", help="comma-separated, e.g. 1,4")
    parser.add_argument("--no-fetchmail", action="store_true", help="skip fetchmail even where installed")
    parser.add_argument(
        "--profile",
        choices=["cprofile", "py-spy"],
        help="profile connector runs: cProfile (.prof, poll thread) or py-spy (folded stacks, all threads)",
    )
    parser.add_argument(
        "--database-dir",
        type=Path,
        help="where the connector's SQLite ledgers go (default: the work directory), e.g. a tmpfs to see "
        "what the ledger's fsyncs cost",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per side for scenarios 1-3 and 6, the median is shown"
    )
    parser.add_argument(
        "--dovecot-forks",
        action="store_true",
        help="Dovecot's default process model (a login and a pop3 process forked per connection) instead of "
        "processes serving one connection after another; it caps idle polls (scenario 5) at what Dovecot "
        "can fork",
    )
    parser.add_argument(
        "--connector-root",
        type=Path,
        help="run the connector (and bench/worker.py) from this checkout, e.g. a worktree of the commit "
        "before a change: before and after in one run, on the same Dovecot and data",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, profiles)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    for name, value in Sizes().__dict__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), help=f"default {value}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    overrides = {name: getattr(args, name) for name in Sizes().__dict__ if getattr(args, name) is not None}
    sizes = replace(sizes, **overrides)
    use_fetchmail = fetchmail.available() and not args.no_fetchmail
    workdir = Path(tempfile.mkdtemp(prefix="pop-connector-bench-"))
    ledgers = Path(tempfile.mkdtemp(prefix="ledgers-", dir=args.database_dir)) if args.database_dir else None
    print(f"machine: {machine()}", flush=True)
    rows: list[Row] = []
    try:
        with Dovecot(lmtp=use_fetchmail, reuse_processes=not args.dovecot_forks) as dovecot:
            bench = Bench(dovecot, workdir, sizes, use_fetchmail=use_fetchmail, profile=args.profile)
            bench.database_dir = ledgers
            bench.connector_root = args.connector_root.resolve() if args.connector_root else None
            bench.repeat = max(1, args.repeat)
            scenarios = _scenarios(bench, sizes)
            for key in args.scenarios.split(","):
                done = scenarios[key.strip()]()
                for row in done if isinstance(done, list) else [done]:
                    print(
                        f"  {row.scenario}: connector {row.connector}, baseline {row.baseline}, "
                        f"ratio {row.ratio:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
                    rows.append(row)
    finally:
        if args.keep or args.profile:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if ledgers is not None:
            shutil.rmtree(ledgers, ignore_errors=True)
    if not use_fetchmail:
        print("fetchmail: not run (needs the fetchmail and dovecot-lmtpd packages)")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=2))
    return 0
