"""Dispatch at scale: N synthetic accounts, an instant POP3 server, 1..k distributed workers, and what each
poll costs the workers and PostgreSQL.

    python -m bench.distributed --scale 100000 [--workers 1 2] [--window 60] [--max-workers 16]
                                [--due-rate 0] [--tree DIR] [--json FILE]

Everything is on this machine and of its own, so that every CPU second counted is the benchmark's:

- a **throwaway PostgreSQL cluster** (``initdb`` into a temporary directory, loopback only, default
  settings but ``shared_preload_libraries = pg_stat_statements``), one fresh database per worker count;
  its CPU is the postmaster's own and its children's, reaped ones included (``/proc``: ``cutime``);
- the **instant POP3 server** (``tests/servers/instant_pop3.py``, a process of its own): every login
  accepted, every maildrop empty, so each poll is an idle poll and costs the server next to nothing;
- the accounts in an **accounts file** (``accounts.csv``, N rows, the way a large fleet is configured),
  all due at once (``--due-rate 0``: the start-up or after-an-outage case, the job queue deep) or made due
  at ``--due-rate`` accounts per second (the steady state of a fleet that keeps up, the queue shallow).
  The IMAP destination is never contacted (an idle poll has nothing to deliver).

For each worker count: a fresh database, ``db upgrade`` and ``accounts sync-config`` (timed: CPU of the
command), the workers started (``pop-connector run``, distributed mode), a warm-up until polls flow and
``--warmup`` seconds more, then a window of ``--window`` seconds between two snapshots of:

- polls: accounts whose ``last_poll_finished_at`` fell in the window;
- CPU (user + system, from ``/proc``) of the workers, of the whole PostgreSQL cluster and of the POP3
  server;
- ``pg_stat_statements`` (reset at the window's start): statements executed and their time, by query;
- ``pg_stat_database`` (commits, rows inserted / updated / deleted) and ``pg_stat_user_tables``;
- WAL written: ``pg_current_wal_lsn()`` before and after (the cluster is ours alone).

Every figure is divided by the polls of the window. ``--tree DIR`` runs the workers and the CLI from
another checkout (e.g. main before a change) while this harness stays the same: before/after in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PASSWORD_VARIABLE = "BENCH_POP_PASSWORD"
DUE_QUERY_MARK = "procrastinate_jobs j"
POLL_TASK = "pop_connector.poll"  # the dispatch's due-accounts query (registry.py)


# --- processes and their CPU ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 0


def process_cpu(pid: int, *, reaped: bool = False) -> float:
    """CPU seconds (user + system) of a live process; with ``reaped`` its waited-for children's too."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if reaped:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def cluster_cpu(postmaster: int) -> float:
    """The whole cluster: the postmaster, its live children (backends, WAL writer, checkpointer,
    autovacuum) and the children it reaped (backends of closed connections)."""
    return process_cpu(postmaster, reaped=True) + sum(process_cpu(child) for child in _children(postmaster))


# --- a throwaway PostgreSQL cluster -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    url: str  # libpq URL of its ``postgres`` database
    port: int
    data: Path

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def sqlalchemy_url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def libpq(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def throwaway_cluster(work: Path, max_connections: int) -> Iterator[Cluster]:
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not binaries:
        raise SystemExit("no PostgreSQL server here (apt-get install postgresql)")
    bin_dir = binaries[-1]
    run_as = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    base = work / "pg"
    base.mkdir()
    if run_as:
        shutil.chown(work, "postgres")
        shutil.chown(base, "postgres")
    data = base / "data"
    port = _free_port()
    subprocess.run(
        [*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        cwd="/",
    )
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c max_connections={max_connections} "
        "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
    )
    pg_ctl = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*pg_ctl, "-l", str(base / "server.log"), "-w", "-t", "60", "-o", options, "start"],
        check=True,
        capture_output=True,
        cwd="/",
    )
    try:
        yield Cluster(f"postgresql://postgres@127.0.0.1:{port}/postgres", port, data)
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, cwd="/", check=False)


# --- the fleet -------------------------------------------------------------------------------------------


def write_accounts(path: Path, count: int) -> None:
    with path.open("w") as out:
        out.write("name,username,password\n")
        for index in range(count):
            out.write(f"user{index:06d},user{index:06d}@hosted.example,env:{PASSWORD_VARIABLE}\n")


def write_config(path: Path, database: str, pop3_port: int, max_workers: int, dispatch: int) -> None:
    path.write_text(
        f"""[service]
mode = "distributed"
database = "{database}"
max_workers = {max_workers}
dispatch_interval = "{dispatch}s"
heartbeat_interval = "5s"
stalled_after = "60s"

[defaults]
poll_interval = "5m"
poll_jitter = 0
timeout = "20s"

[[account_files]]
path = "accounts.csv"
host = "127.0.0.1"
port = {pop3_port}
tls = "none"
destination = "archive"

# Never contacted: an idle poll has nothing to deliver.
[[destinations]]
name = "archive"
type = "imap"
host = "127.0.0.1"
port = 9
tls = "none"
username = "archive"
password = "unused-password"
"""
    )


def _environment(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), PASSWORD_VARIABLE: "instant"}


def cli_cpu(tree: Path, config: Path, *command: str) -> float:
    """Runs one CLI command from ``tree``; returns its CPU seconds."""
    process = subprocess.Popen(
        [sys.executable, "-m", "connector", "--config", str(config), *command],
        cwd=tree,
        env=_environment(tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output.decode(errors='replace')}")
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def pop3_server(work: Path) -> Iterator[tuple[int, int]]:
    """The instant POP3 server in a process of its own: (port, pid)."""
    log = (work / "pop3.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.instant_pop3", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    assert process.stdout is not None
    match = re.search(r":(\d+)$", process.stdout.readline().strip())
    if match is None:
        process.kill()
        raise SystemExit("the instant POP3 server did not start")
    try:
        yield int(match.group(1)), process.pid
    finally:
        process.terminate()
        process.wait(10)


# --- snapshots -------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    at: float
    polled: int
    worker_cpu: float
    postgres_cpu: float
    pop3_cpu: float
    wal_lsn: int
    commits: int
    inserted: int
    updated: int
    deleted: int
    queued: int


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def snapshot(
    connection: psycopg.Connection[Any], cluster: Cluster, workers: list[int], pop3: int
) -> Snapshot:
    connection.execute("SELECT pg_stat_clear_snapshot()")
    polled = connection.execute("SELECT count(*) FROM accounts WHERE last_poll_finished_at IS NOT NULL")
    stats = connection.execute(
        "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
        "WHERE datname = current_database()"
    ).fetchone()
    assert stats is not None
    queued = connection.execute("SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE status = 'todo'")
    lsn = connection.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert lsn is not None
    return Snapshot(
        at=time.monotonic(),
        polled=int(polled.fetchone()[0]),  # type: ignore[index]
        worker_cpu=sum(process_cpu(pid) for pid in workers),
        postgres_cpu=cluster_cpu(cluster.postmaster()),
        pop3_cpu=process_cpu(pop3),
        wal_lsn=_lsn(lsn[0]),
        commits=int(stats[0]),
        inserted=int(stats[1]),
        updated=int(stats[2]),
        deleted=int(stats[3]),
        queued=int(queued.fetchone()[0]),  # type: ignore[index]
    )


def _statements(connection: psycopg.Connection[Any]) -> list[tuple[str, int, float, int]]:
    """(query, calls, total ms, rows) of the statements clients sent to the benchmark database (not those
    run inside procrastinate's functions and triggers, whose time is their caller's), most time first."""
    rows = connection.execute(
        "SELECT query, calls, total_exec_time, rows FROM pg_stat_statements s "
        "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() AND s.toplevel "
        "AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%pg_current_wal_lsn%' "
        "ORDER BY total_exec_time DESC"
    ).fetchall()
    return [(str(q), int(c), float(t), int(r)) for q, c, t, r in rows]


def _table_writes(connection: psycopg.Connection[Any]) -> dict[str, tuple[int, int, int]]:
    connection.execute("SELECT pg_stat_clear_snapshot()")
    rows = connection.execute(
        "SELECT schemaname || '.' || relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables"
    ).fetchall()
    return {str(name): (int(i), int(u), int(d)) for name, i, u, d in rows}


# --- one measurement ----------------------------------------------------------------------------------------


@dataclass
class Result:
    workers: int
    max_workers: int
    accounts: int
    due_rate: float
    window: float
    polls: int
    polls_per_second: float
    worker_cpu_ms: float  # per poll
    worker_core_share: float  # of one core, per worker
    postgres_cpu_ms: float
    pop3_cpu_ms: float
    statements: float
    commits: float
    rows_written: float
    wal_bytes: float
    queue_depth: tuple[int, int]
    sync_config_cpu: float
    due_query_ms: float
    fetch_job_ms: float
    top_statements: list[tuple[str, float, float]] = field(default_factory=list)  # query, per poll, ms
    table_writes: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def _mean_ms(statements: list[tuple[str, int, float, int]], mark: str) -> float:
    calls = sum(c for q, c, _, _ in statements if mark in q)
    total = sum(t for q, _, t, _ in statements if mark in q)
    return total / calls if calls else 0.0


def _short(query: str) -> str:
    text = " ".join(query.split())
    return text[:90] + ("..." if len(text) > 90 else "")


def measure(
    args: argparse.Namespace, cluster: Cluster, pop3: tuple[int, int], work: Path, workers: int
) -> Result:
    name = f"bench_scale_{workers}_{os.getpid()}"
    with psycopg.connect(cluster.url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    config = work / f"config-{workers}.toml"
    write_config(config, cluster.sqlalchemy_url(name), pop3[0], args.max_workers, args.dispatch_interval)
    cli_cpu(args.tree, config, "db", "upgrade")
    sync_cpu = cli_cpu(args.tree, config, "accounts", "sync-config")
    observer = psycopg.connect(cluster.libpq(name), autocommit=True)
    observer.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    if args.due_rate > 0:
        # Account i falls due i / rate seconds from now: a steady stream, as a fleet that keeps up sees.
        observer.execute(
            "UPDATE accounts SET next_poll_at = now() + make_interval(secs => (id - 1) / %s::float)",
            (args.due_rate,),
        )
    processes = []
    logs = []
    try:
        for index in range(workers):
            log = (work / f"worker-{workers}-{index}.log").open("wb")
            logs.append(log)
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "connector", "--config", str(config), "run"],
                    cwd=args.tree,
                    env=_environment(args.tree),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        pids = [process.pid for process in processes]

        def polling() -> bool:
            """Polls flow, and (all due) the first dispatch has queued every account: its 100,000 job
            inserts are start-up, not the cost of a poll."""
            row = observer.execute(
                "SELECT (SELECT count(*) FROM accounts WHERE last_poll_finished_at IS NOT NULL), "
                "(SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE task_name = %s)",
                (POLL_TASK,),
            ).fetchone()
            assert all(process.poll() is None for process in processes), "a worker exited"
            assert row is not None
            polled, jobs = int(row[0]), int(row[1])
            return polled > 0 and (args.due_rate > 0 or polled + jobs >= args.scale)

        _wait(polling, 600, "the first polls")
        time.sleep(args.warmup)
        before_tables = _table_writes(observer)
        observer.execute("SELECT pg_stat_statements_reset()")
        before = snapshot(observer, cluster, pids, pop3[1])
        time.sleep(args.window)
        after = snapshot(observer, cluster, pids, pop3[1])
        statements = _statements(observer)
        time.sleep(1.5)  # backends report their table statistics about once a second
        after_tables = _table_writes(observer)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for log in logs:
            log.close()
        observer.close()
    polls = max(after.polled - before.polled, 1)
    seconds = after.at - before.at
    top = [(_short(q), c / polls, t / c if c else 0.0) for q, c, t, _ in statements[:8]]
    tables = {}
    for table, now in after_tables.items():
        then = before_tables.get(table, (0, 0, 0))
        diff = tuple((a - b) / polls for a, b in zip(now, then, strict=True))
        if any(diff):
            tables[table] = (diff[0], diff[1], diff[2])
    return Result(
        workers=workers,
        max_workers=args.max_workers,
        accounts=args.scale,
        due_rate=args.due_rate,
        window=seconds,
        polls=polls,
        polls_per_second=polls / seconds,
        worker_cpu_ms=(after.worker_cpu - before.worker_cpu) / polls * 1000,
        worker_core_share=(after.worker_cpu - before.worker_cpu) / seconds / workers,
        postgres_cpu_ms=(after.postgres_cpu - before.postgres_cpu) / polls * 1000,
        pop3_cpu_ms=(after.pop3_cpu - before.pop3_cpu) / polls * 1000,
        statements=sum(c for _, c, _, _ in statements) / polls,
        commits=(after.commits - before.commits) / polls,
        rows_written=(
            (after.inserted - before.inserted)
            + (after.updated - before.updated)
            + (after.deleted - before.deleted)
        )
        / polls,
        wal_bytes=(after.wal_lsn - before.wal_lsn) / polls,
        queue_depth=(before.queued, after.queued),
        sync_config_cpu=sync_cpu,
        due_query_ms=_mean_ms(statements, DUE_QUERY_MARK),
        fetch_job_ms=_mean_ms(statements, "procrastinate_fetch_job"),
        top_statements=top,
        table_writes=tables,
    )


def report(result: Result) -> None:
    r = result
    print(
        f"\n{r.workers} worker(s) x max_workers={r.max_workers}, {r.accounts} accounts"
        f" ({'all due' if not r.due_rate else f'{r.due_rate:g} due per second'}),"
        f" window {r.window:.0f} s; queue {r.queue_depth[0]} -> {r.queue_depth[1]} jobs waiting"
    )
    print(f"  polls/s                      {r.polls_per_second:8.1f}  ({r.polls} polls)")
    print(f"  worker CPU per poll          {r.worker_cpu_ms:8.2f} ms  ({r.worker_core_share:.0%} of a core)")
    print(f"  PostgreSQL CPU per poll      {r.postgres_cpu_ms:8.2f} ms")
    print(f"  POP3 server CPU per poll     {r.pop3_cpu_ms:8.2f} ms")
    print(f"  statements per poll          {r.statements:8.2f}")
    print(f"  commits per poll             {r.commits:8.2f}")
    print(f"  rows written per poll        {r.rows_written:8.2f}")
    print(f"  WAL bytes per poll           {r.wal_bytes:8.0f}")
    print(f"  dispatch due query           {r.due_query_ms:8.1f} ms per run")
    print(f"  procrastinate fetch_job      {r.fetch_job_ms:8.2f} ms per job")
    print(f"  accounts sync-config         {r.sync_config_cpu:8.1f} s CPU")
    print("  statements by time (per poll, mean ms):")
    for query, per_poll, mean in r.top_statements:
        print(f"    {per_poll:6.2f} x {mean:7.3f} ms  {query}")
    print("  rows per poll by table (inserted / updated / deleted):")
    for table, (ins, upd, dele) in sorted(r.table_writes.items()):
        print(f"    {table:<44} {ins:5.2f} / {upd:5.2f} / {dele:5.2f}")


def summary(results: list[Result]) -> None:
    print("\nworkers  polls/s  worker ms/poll  core/worker  pg ms/poll  statements  commits  rows  WAL B")
    for r in results:
        print(
            f"{r.workers:>7}  {r.polls_per_second:7.1f}  {r.worker_cpu_ms:14.2f}  {r.worker_core_share:11.0%}"
            f"  {r.postgres_cpu_ms:16.2f}  {r.statements:10.1f}  {r.commits:7.1f}  {r.rows_written:4.1f}"
            f"  {r.wal_bytes:5.0f}"
        )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds the with blocks: workers, POP3 server and cluster stop


def run(args: argparse.Namespace) -> None:
    # A SIGTERM (timeout, a CI job cancelled) would otherwise end this process at once and leave its
    # workers, POP3 server and PostgreSQL cluster running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.tree = Path(args.tree).resolve()
    print(
        f"{args.scale} accounts, workers {args.workers}, max_workers={args.max_workers}, tree {args.tree}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as directory:
        work = Path(directory)
        write_accounts(work / "accounts.csv", args.scale)
        connections = max(args.workers) * (2 * args.max_workers + 8) + 20
        with throwaway_cluster(work, connections) as cluster, pop3_server(work) as pop3:
            for workers in args.workers:
                result = measure(args, cluster, pop3, work, workers)
                report(result)
                results.append(result)
    summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=int, default=0, help="accounts of the scale benchmark (e.g. 100000)")
    parser.add_argument("--window", type=float, default=60, help="seconds measured per worker count")
    parser.add_argument("--warmup", type=float, default=10, help="seconds after the first polls")
    parser.add_argument("--due-rate", type=float, default=0, help="accounts due per second (0: all at once)")
    parser.add_argument("--dispatch-interval", type=int, default=10)
    parser.add_argument("--tree", default=str(ROOT), help="the checkout the workers run from")
    parser.add_argument("--json", help="write the results here")
