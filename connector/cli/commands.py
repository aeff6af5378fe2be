"""Running a parsed command: the configuration, the ledger, and ``sync``, ``run``, ``status`` and ``check``;
the other commands live in their own modules (accounts.py, admin.py, authorize.py, delivery_report.py,
reconcile.py) and are dispatched here. The options are in parser.py.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from connector.cli.parser import ADMIN_COMMANDS, EXIT_CONFIG, EXIT_FAILED, EXIT_OK, checks_a_file_alone
from connector.cli.report import (
    account_state,
    dry_run_lines,
    in_states,
    ledger_line,
    matching_accounts,
    poll_line,
    status_json,
    status_records,
    status_report,
    summary_line,
)
from connector.config import Account, Config, config_path, load_config
from connector.errors import ConfigError, ConnectorError
from connector.ledger.database import open_database
from connector.ledger.store import Ledger
from connector.ops.logs import setup_logging

if TYPE_CHECKING:
    from connector.poll.result import PollResult

log = logging.getLogger("connector")


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names (parsed by connector/cli/parser.py)."""
    try:
        setup_logging(args.log_level, args.log_format, args.log_file)
    except OSError as exc:
        print(f"error: cannot write the log file {args.log_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    if checks_a_file_alone(args):
        from connector.cli import accounts

        try:
            return accounts.check_file(args.file, _given_config(args.config))
        except ConfigError as exc:
            print(f"configuration error:\n{exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        config = load_config(config_path(args.config))
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return _dispatch(args, config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConnectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _given_config(explicit: str | None) -> Path | None:
    try:
        return config_path(explicit)
    except ConfigError:
        return None  # none given: check-file checks the rows on their own


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    assert config.service.database is not None
    if args.command == "check":
        from connector.cli.check import run_checks

        _say_where(config.service.database, args)  # which check does not open
        return EXIT_OK if run_checks(config, print) else EXIT_FAILED
    if args.command == "authorize":
        from connector.cli import authorize

        return authorize.run(args, config)
    if args.command == "run":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload during start-up must not kill it
    engine = open_database(config.service.database, threads=config.service.max_workers)
    ledger = Ledger(engine)
    if args.command == "db":
        if config.service.mode == "distributed":
            from connector.service.distributed import ensure_queue_schema

            ensure_queue_schema(engine)
        print(f"ledger database is up to date: {engine.url.render_as_string(hide_password=True)}")
        return EXIT_OK
    if args.command == "accounts":
        from connector.cli import accounts

        return accounts.sync_config(config, engine)
    if args.command == "run" and config.service.mode == "distributed":
        from connector.service.distributed import run_worker

        if args.now:
            # Workers take whatever the shared schedule says is due; no one worker may reset it for all.
            print(
                "error: run --now is for the embedded mode; in distributed mode an account is made due "
                'with "pop-connector resume NAME"',
                file=sys.stderr,
            )
            return EXIT_CONFIG
        log.info("%s", ledger_line(config.service.database))
        engine.dispose()
        return EXIT_OK if run_worker(config) else EXIT_FAILED
    if args.command == "status":
        return _status(config, ledger, args)
    # Each command imports what it runs (connector/cli/parser.py: the start-up stays quick).
    if args.command in ADMIN_COMMANDS:
        from connector.cli import admin

        return admin.run(args, config, ledger)
    if args.command == "report":
        from connector.cli import delivery_report

        return delivery_report.run(args, config, ledger)
    if args.command == "reconcile":
        from connector.cli import reconcile
        from connector.connections import Connections

        return reconcile.run(args, config, ledger, Connections())
    if args.command == "run":
        # Imported here, as below: the listener (connector.ops.web) imports connector.cli.report, so this
        # package must not import it while it loads.
        from connector.service.runtime import run_service

        log.info("%s", ledger_line(config.service.database))
        run_service(config, ledger, config_path(args.config), poll_now=args.now)
        return EXIT_OK
    _say_where(config.service.database, args)  # after opening it: it exists now
    return _sync(config, ledger, args)


def _say_where(database: str, args: argparse.Namespace) -> None:
    """Where the ledger is, one line on stderr: plain text beside text logs (no INFO line on the terminal
    of a sync with bars), a log line among JSON ones (stderr stays JSON lines)."""
    if args.log_format == "json":
        log.info("%s", ledger_line(database))
    else:
        print(ledger_line(database), file=sys.stderr)


def _status(config: Config, ledger: Ledger, args: argparse.Namespace) -> int:
    records = status_records(config.accounts, ledger.statuses())
    polling = ledger.leases.live()
    enabled = {account.name: account.enabled for account in config.accounts}
    for record in records:
        if record["account"] in polling:
            held = polling[record["account"]]
            record["polling"] = {"pid": held.pid, "host": held.host, "since": held.since.isoformat()}
        record["state"] = account_state(record, enabled=enabled.get(record["account"], True))
    # The summary counts the accounts --account names; --state narrows only what is shown in full.
    records = matching_accounts(records, args.account or ())
    shown = in_states(records, set(args.state or ()))
    assert config.service.database is not None
    where = ledger_line(config.service.database)
    if args.json:
        # stdout stays the list of records that scripts read; where the ledger is and the summary are for
        # the person watching.
        print(where, file=sys.stderr)
        print(summary_line(records), file=sys.stderr)
        print(status_json(shown))
    else:
        print(status_report(records, shown))
        print(where)
    return EXIT_OK


def _selected_accounts(config: Config, names: list[str] | None) -> list[Account]:
    if names:
        return [config.account(name) for name in names]
    return [account for account in config.accounts if account.enabled]


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.warning(
            "received %s: finishing the current message of each poll, then stopping",
            signal.Signals(signum).name,
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _sync(config: Config, ledger: Ledger, args: argparse.Namespace) -> int:
    from connector.connections import Connections
    from connector.ops.progress import SyncProgress, print_summary, summary_rows, sync_progress
    from connector.poll.engine import SyncEngine
    from connector.poll.rounds import poll_round

    accounts = _selected_accounts(config, args.account)
    if not accounts:
        print("no enabled accounts in the configuration", file=sys.stderr)
        return EXIT_OK
    stop = threading.Event()
    _stop_on_signals(stop)
    display = sync_progress(accounts, sys.stderr) if not args.dry_run else SyncProgress()
    # The display is the only observer: the metrics and the health monitor of connector/ops/observers.py
    # are read by the listener of `run`, which a sync has not (nor their imports, Prometheus's and the
    # status page's).
    engine = SyncEngine(config, ledger, Connections(), observers=[display])

    workers = config.service.max_workers
    with display:
        if args.dry_run:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(partial(engine.poll, dry_run=True, stop=stop), accounts))
        else:
            # Polls with nothing to do are found by the idle probe (connector/poll/probe.py).
            results = poll_round(engine, accounts, workers=workers, stop=stop)
    for result in results:
        print("\n".join(dry_run_lines(result)) if args.dry_run else poll_line(result))
    if not args.dry_run:
        print_summary(summary_rows(results, display.durations), sys.stdout)
    named = set(args.account or ())
    failed = any(_failed(r, named) for r in results)
    return EXIT_FAILED if failed else EXIT_OK


def _failed(result: PollResult, named: set[str]) -> bool:
    """An account another process was polling (``busy``) fails the run only when it was asked for by
    name: a sync of all accounts next to a running service is no failure."""
    if result.status == "busy":
        return result.account in named
    return not result.ok or bool(result.failed or result.not_delivered or result.skipped or result.problems)
