"""When a poll may be a probe: the rules of the idle probe (connector/poll/probe.py). Pure.

Most polls of a large installation find nothing: the listing is what the ledger already keeps. The probe
finds that out for many accounts at once, in one thread, with one ledger read and one write per batch, and
records such a poll as the full poll would (result ``ok``, nothing delivered, the lease taken and released
in the write). Anything else goes to the full poll (connector/poll/engine.py), which makes the decisions.
So the probe decides one thing only, and conservatively: "this poll has nothing to do". Three rules:

- ``probe_refusal``: the account's settings are ones the probe speaks (USER/PASS over implicit TLS or
  plaintext, no protocol log), else the full poll;
- ``ledger_refusal``: the ledger gives the plan nothing to decide (no row the plan needs in full: nothing
  pending, failed, deleted, missing from the last listing or due for deletion; no note to clear; the
  last poll neither failed nor delivered anything; no baseline still to take; no live lease);
- ``listing_is_idle``: the server lists exactly the UIDLs the ledger keeps (delivered, or seen by a
  ``start = "new"`` baseline), each once, and none of them is one the ledger knows in its header-hash form.

Under those, ``plan.plan_poll`` makes an empty plan but for its count of ``seen`` messages (the property
test in tests/unit/test_idle_policy.py checks it against the planner), and the full poll would write its
result and nothing else.
"""

from __future__ import annotations

from collections.abc import Set
from datetime import datetime

from connector.config import Account
from connector.ledger.records import KnownMessages, LedgerView
from connector.policies.retention import deletable_until
from connector.policies.server_limits import retention_conflict
from connector.policies.uidl import hashed_uidls
from connector.pop3 import Capabilities, MessageList

# Seconds of LOGIN-DELAY (RFC 2449) up to which an account is probed: Courier announces 10 by default, and
# a new message then waits 10 s more for the full poll; the servers that announce more tend to announce
# 300 or 900, which the probe leaves to the full poll (``capabilities_refusal``).
PROBE_MAX_LOGIN_DELAY = 60


def probe_refusal(account: Account, *, wire_traced: bool) -> str | None:
    """Why ``account``'s polls are full polls whatever the ledger says (None: the probe may try)."""
    if account.auth != "user":
        return f"auth = {account.auth!r} (the probe logs in with USER/PASS only)"
    if account.tls == "starttls":
        return 'tls = "starttls" (the probe speaks implicit TLS or plaintext)'
    if account.protocol_log:
        return "protocol_log = true (the full poll writes the conversation)"
    if wire_traced:
        return "the POP3 wire trace is on (connector.pop3.wire at DEBUG)"
    return None


def ledger_refusal(account: Account, view: LedgerView | None, now: datetime) -> str | None:
    """Why this poll needs the full poll, from the ledger alone (None: only the listing can tell)."""
    if view is None:
        return "the account is not in the ledger yet"
    if view.suspended:
        return "suspended"
    if not view.lease_free:
        return "another poll holds the account's lease"
    if view.consecutive_failures:
        # A failed login tried by both the probe and the full poll would count twice against the server's
        # lockout (fail2ban and the like): a failing account is polled in full until it succeeds again.
        return "the last poll failed"
    if view.last_delivered:
        # Mail tends to come in bursts: probing an account that is busy costs one more login than polling
        # it in full, so one that just had mail is polled in full until a poll finds nothing again.
        return "the last poll delivered messages"
    if view.noted:
        return "the account has a note a poll may clear"
    if account.start == "new" and not view.baseline_taken:
        return 'start = "new": the baseline is still to be taken'
    if view.others or view.missing or view.undated:
        return "the ledger has messages the plan decides one by one"
    until = deletable_until(account.retention, now)
    if until is not None and view.oldest_delivery is not None and view.oldest_delivery <= until:
        return "the retention deletes delivered messages now"
    return None


def kept_uidls(view: LedgerView) -> set[str]:
    """The UIDLs the ledger expects on the server: delivered ones it keeps and ones a baseline recorded
    as seen (given ``ledger_refusal`` found no other row)."""
    return set(view.joined.split("\n")) if view.joined else set()


def listing_is_idle(listing: MessageList, unlisted: int, kept: Set[str], view: LedgerView) -> bool:
    """The server lists exactly the kept UIDLs, each once, with no malformed line, and the ledger knows
    none in its header-hash form: the plan is empty."""
    expected = view.delivered + view.seen
    if unlisted or len(listing) != expected or len(kept) != expected:
        return False  # a malformed line, a UIDL listed twice (or a line break in one kept: never ours)
    if hashed_uidls(KnownMessages(kept=kept, joined=view.joined)):
        return False
    return listing.uidl_set == kept


def capabilities_refusal(capabilities: Capabilities, account: Account) -> str | None:
    """Why the full poll must run after CAPA, before the probe logs in: it logs the retention conflict
    (CAPA EXPIRE) at every poll; and a LOGIN-DELAY longer than ``PROBE_MAX_LOGIN_DELAY``."""
    delay = capabilities.login_delay
    if delay is not None and delay > PROBE_MAX_LOGIN_DELAY:
        # After a probe's login the server refuses the next one for that long, so mail the probe finds
        # would wait that long for the full poll (and a distributed job would hold its thread meanwhile):
        # a login delay of 15 minutes would double the latency of every new message. Such a server lets
        # no client in more often anyway, so the idle polls the probe would save are few.
        return f"the server announces LOGIN-DELAY {delay} (over {PROBE_MAX_LOGIN_DELAY} s: polled in full)"
    return retention_conflict(capabilities, account.retention)
