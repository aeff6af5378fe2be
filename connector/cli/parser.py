"""The command line: every command and its options, and nothing that a command needs to run.

``pop-connector --help`` (and a usage error) should answer at once, so this module imports no more than
argparse: each command's module is imported only when that command runs (``connector/cli/commands.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from connector import __version__
from connector.ops.logs import LOG_FORMATS

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# The commands of connector/cli/admin.py.
ADMIN_COMMANDS = ("quarantine", "resume", "baseline", "routes")
# `status --state` (connector/cli/report.py decides which an account is in).
STATES = ("ok", "backing-off", "failing", "suspended", "polling", "never-polled", "removed")
# `report --format` (connector/cli/delivery_report.py).
REPORT_FORMATS = ("table", "csv", "json", "html")
# `authorize --timeout` default, in seconds (connector/cli/authorize.py).
AUTHORIZE_WAIT = 300.0

# Plain text (no reStructuredText quoting): argparse prints it as it is.
DESCRIPTION = """\
Polls POP3 mailboxes and delivers every message into IMAP, Exchange or Gmail,
exactly once, keeping a ledger of what it delivered. Start with "check", then
"sync"; "run" is the service."""

EPILOG = """\
exit codes: 0 everything succeeded, 1 an account or a message failed,
2 a configuration or usage error.
Each command has its own help: pop-connector COMMAND --help"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pop-connector",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", help="configuration file (default: $POP_CONNECTOR_CONFIG)")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the least important log lines shown (default: INFO; DEBUG shows every message's steps)",
    )
    parser.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS, help="text (default) or json lines"
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        metavar="PATH",
        help="also write every log line at --log-level to this file (created with mode 600); with sync's "
        "progress bars on a terminal, only warnings and errors are shown there",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sync = commands.add_parser("sync", help="poll accounts once and exit")
    sync.add_argument(
        "--account", "-a", action="append", metavar="NAME", help="only this account (repeatable)"
    )
    sync.add_argument("--dry-run", action="store_true", help="show what would be delivered and deleted")
    run = commands.add_parser("run", help="run the service: poll every account on its schedule")
    run.add_argument(
        "--now",
        action="store_true",
        help="poll every account at once at start, instead of at the next poll time its last poll chose",
    )
    status = commands.add_parser(
        "status", help="a summary by state, then each account's last poll, counts and errors"
    )
    status.add_argument(
        "--json", action="store_true", help="machine-readable output (the summary line goes to stderr)"
    )
    status.add_argument(
        "--state",
        action="append",
        choices=STATES,
        metavar="STATE",
        help=f"only accounts in this state, one of {', '.join(STATES)} (repeatable)",
    )
    status.add_argument(
        "--account",
        "-a",
        action="append",
        metavar="GLOB",
        help="only accounts whose name matches this shell pattern, e.g. 'shop-*' (repeatable)",
    )
    commands.add_parser("check", help="validate the config and log in to every server; changes nothing")
    db = commands.add_parser("db", help="ledger database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_commands.add_parser("upgrade", help="apply pending schema migrations")
    _accounts(commands)
    _admin(commands)
    _authorize(commands)
    _report(commands)
    _reconcile(commands)
    return parser


def _admin(commands: Any) -> None:
    """Register the subcommands on the parser's ``add_subparsers()`` object."""
    quarantine = commands.add_parser("quarantine", help="show or retry quarantined (failed) messages")
    actions = quarantine.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every quarantined message with its reason")
    listing.add_argument("--account", "-a", metavar="NAME", help="only this account")
    retry = actions.add_parser(
        "retry", help="deliver quarantined messages again at the next poll (the destination is checked first)"
    )
    retry.add_argument(
        "ids", nargs="*", type=int, metavar="ID", help='message ids, as "quarantine list" shows them'
    )
    retry.add_argument("--all", action="store_true", help="every quarantined message")
    retry.add_argument("--account", "-a", metavar="NAME", help="only this account")
    resume = commands.add_parser("resume", help="lift the suspension of an account after repeated failures")
    resume.add_argument("name", metavar="NAME", help="the account")
    baseline = commands.add_parser(
        "baseline", help="record everything now on the POP3 server as already seen, without downloading it"
    )
    baseline.add_argument("--account", "-a", metavar="NAME", required=True, help="the account")
    routes = commands.add_parser(
        "routes", help="preview where each message of a catch-all account would go; changes nothing"
    )
    routes.add_argument("--account", "-a", metavar="NAME", required=True, help="the account")


def _accounts(commands: Any) -> None:
    """Register ``accounts`` on the parser's ``add_subparsers()`` object."""
    accounts = commands.add_parser(
        "accounts", help="check an accounts file (CSV); write the accounts into the database"
    )
    actions = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    actions.add_parser(
        "sync-config", help="write the configured accounts into the database (distributed workers read it)"
    )
    check = actions.add_parser(
        "check-file",
        help="check one accounts file (CSV) against the configuration, if one is given; changes nothing",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the accounts file")


def _report(commands: Any) -> None:
    report = commands.add_parser(
        "report", help="per-account totals from the delivery journal, what is left, migration verdicts"
    )
    report.add_argument("--account", "-a", action="append", metavar="NAME", help="only this account")
    report.add_argument("--since", metavar="DATE", help="count deliveries from this date (YYYY-MM-DD)")
    report.add_argument(
        "--format", default="table", choices=REPORT_FORMATS, help="table (default), csv, json, html"
    )


def _reconcile(commands: Any) -> None:
    command = commands.add_parser(
        "reconcile", help="check that every journaled delivery is still in the destination, once (read-only)"
    )
    command.add_argument("--account", "-a", required=True, metavar="NAME", help="the account to check")


def _authorize(commands: Any) -> None:
    """``authorize`` on the ``pop-connector`` parser (``commands``: its sub-parsers)."""
    parser = commands.add_parser(
        "authorize",
        help="give a Gmail user's consent to a gmail destination (or Gmail over IMAP) and keep its token",
    )
    parser.add_argument("destination", metavar="DESTINATION", help="the destination's name in the config")
    parser.add_argument(
        "--user", metavar="ADDRESS", help="the Gmail address that must consent (suggested on Google's page)"
    )
    parser.add_argument(
        "--no-browser",
        action="store_true",
        help="print the address to open (on any machine) and read back the address the browser ended on",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=AUTHORIZE_WAIT,
        metavar="SECONDS",
        help=f"how long to wait for the browser's redirect (default {AUTHORIZE_WAIT:.0f})",
    )


def checks_a_file_alone(args: argparse.Namespace) -> bool:
    """``accounts check-file`` reads the configuration itself (it may have none, and must not read the
    file's siblings through it)."""
    return bool(args.command == "accounts" and args.accounts_command == "check-file")
