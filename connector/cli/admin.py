"""Admin commands for messy mailboxes: ``quarantine list|retry`` and ``resume``.

Kept out of cli.py so that the main command table stays short; cli.py only registers and dispatches.
"""

from __future__ import annotations

import argparse
import io
import sys

from connector.config import Config, RoutingPolicy
from connector.connections import Connections
from connector.errors import SourceMessageError
from connector.ledger.records import KnownMessages, QuarantinedMessage
from connector.ledger.store import Ledger
from connector.message import HEADER_PARSE_LIMIT
from connector.policies.lease import LeaseHeld
from connector.policies.routing import route
from connector.poll.identity import baseline_entries, identify
from connector.pop3 import MessageInfo, Pop3Client

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def run(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    if args.command == "resume":
        return _resume(config, ledger, args.name)
    if args.command == "baseline":
        return _baseline(config, ledger, args.account)
    if args.command == "routes":
        return _routes(config, args.account)
    if args.account is not None:
        config.account(args.account)  # a misspelt name is an error, not an empty list
    if args.quarantine_command == "list":
        return _list(ledger, args.account)
    return _retry(ledger, args)


def quarantine_line(message: QuarantinedMessage) -> str:
    size = message.pop_size if message.pop_size is not None else message.size
    return (
        f"{message.id:>6}  {message.account}  uidl={message.uidl} size={size if size is not None else '-'} "
        f"attempts={message.attempts} since {message.updated_at.isoformat(timespec='seconds')}\n"
        f"        reason: {message.last_error or '-'}"
    )


def _list(ledger: Ledger, account: str | None) -> int:
    messages = ledger.quarantine.messages(account)
    if not messages:
        print("no quarantined messages")
        return EXIT_OK
    print("\n".join(quarantine_line(message) for message in messages))
    return EXIT_OK


def _retry(ledger: Ledger, args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all):
        print("error: name message ids or --all (not both)")
        return EXIT_CONFIG
    ids = None if args.all else list(args.ids)
    released = ledger.quarantine.release(ids, args.account)
    if ids is not None and released < len(ids):
        print(f"{len(ids) - released} of the given ids are not quarantined messages")
    print(
        f"{released} message(s) will be retried at the next poll of their account (or now with "
        "`pop-connector sync`); each is first looked for in the destination, so none is delivered twice"
    )
    return EXIT_OK if ids is None or released == len(ids) else EXIT_FAILED


def _resume(config: Config, ledger: Ledger, name: str) -> int:
    config.account(name)
    if not ledger.suspensions.resume(name):
        print(f"account {name!r} has never been polled: nothing to resume")
        return EXIT_OK
    print(f"account {name!r} resumed: failure count reset, due for polling now")
    return EXIT_OK


def _baseline(config: Config, ledger: Ledger, name: str) -> int:
    account = config.account(name)
    account_id = ledger.account_id(name)
    assert account_id is not None
    # A poll running meanwhile would deliver what this records as seen: one of the two at a time.
    lease = ledger.leases.take_for_poll(account_id, name, config.service.lease_ttl)
    if isinstance(lease, LeaseHeld):
        print(lease.describe(name), file=sys.stderr)
        return EXIT_FAILED
    try:
        with Connections().open_source(account) as pop:
            listing = identify(pop, KnownMessages(ledger.known_messages(account_id))).listing
            entries = baseline_entries(pop, listing, ledger.known_messages(account_id))
        count = ledger.record_seen(account_id, entries)
    finally:
        lease.close()
    print(
        f"account {name!r}: {count} of the {len(listing)} messages on the server recorded as already seen "
        "(not downloaded; they will never be delivered or deleted by pop-connector); mail arriving from now "
        "on is delivered"
    )
    return EXIT_OK


def _routes(config: Config, name: str) -> int:
    account = config.account(name)
    if account.routing is None:
        print(f"account {name!r} has no routing table ([accounts.routing]): all its mail goes to one folder")
        return EXIT_CONFIG
    with Connections().open_source(account) as pop:
        listing = identify(pop, KnownMessages()).listing
        lines = [_route_line(pop, info, account.routing) for info in listing]
    print(f"account {name!r}: {len(listing)} messages on the server")
    print("\n".join(lines))
    return EXIT_OK


def _route_line(pop: Pop3Client, info: MessageInfo, policy: RoutingPolicy) -> str:
    """One message's routing, from its header section (TOP n 0): nothing is downloaded or changed."""
    top = io.BytesIO()
    where = f"#{info.number} uidl={info.uidl} size={info.size}"
    try:
        pop.top(info.number, 0, top, max_bytes=2 * HEADER_PARSE_LIMIT)
    except SourceMessageError as exc:
        return f"{where} -> cannot read its headers: {exc.message}"
    return f"{where} -> {route(top.getvalue(), policy).describe()}"
