"""Catch-all (multidrop) routing: which local mailbox(es) a message from a domain-wide POP mailbox goes to.
Pure functions.

Headers are tried in the configured order (envelope headers such as Delivered-To and X-Original-To first:
Bcc'd and mailing-list mail only shows its recipient there). The first header holding at least one address
that a rule matches decides; every matching address in it adds its rule's mailbox, each mailbox once. A
header whose addresses match no rule (e.g. ``Delivered-To: catchall@hosted.example``, the POP mailbox
itself) does not decide. When no header decides, the message goes to the default mailbox, or, without one,
stays on the server and is quarantined with the reason.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

from connector.config import RoutingPolicy, RoutingRule


@dataclass(frozen=True)
class Recipient:
    """One local mailbox a message goes to, with the address and header that decided it (empty when
    the message went to the default mailbox)."""

    mailbox: str
    address: str
    header: str


@dataclass(frozen=True)
class RouteDecision:
    recipients: list[Recipient] = field(default_factory=list)
    by_default: bool = False

    @property
    def mailboxes(self) -> list[str]:
        return [recipient.mailbox for recipient in self.recipients]

    @property
    def routed(self) -> bool:
        return bool(self.recipients)

    def describe(self) -> str:
        if not self.recipients:
            return "no rule matches and there is no default: left on the server (quarantined)"
        if self.by_default:
            return f"{self.recipients[0].mailbox} (default: no rule matches)"
        return ", ".join(f"{r.mailbox} (by {r.header}: {r.address})" for r in self.recipients)


def rule_for(address: str, rules: Sequence[RoutingRule]) -> RoutingRule | None:
    """The first rule whose ``match`` (an address, or a pattern such as ``*@sales.example.org``) fits."""
    address = address.lower()
    for rule in rules:
        pattern = rule.match.lower()
        if address == pattern or fnmatch.fnmatchcase(address, pattern):
            return rule
    return None


def header_addresses(header_section: bytes, name: str) -> list[str]:
    """Every address in every occurrence of header ``name``; nothing (never an exception) when broken."""
    try:
        values = BytesHeaderParser(policy=compat32).parsebytes(header_section).get_all(name) or []
        pairs = getaddresses([str(value) for value in values])
    except Exception:  # a malformed header cannot route, but must not stop the poll
        return []
    return [address.strip().lower() for _, address in pairs if "@" in address]


def routed_mailboxes(policy: RoutingPolicy) -> list[str]:
    """Every mailbox the routing table can deliver into, each once, in the table's order."""
    mailboxes = [rule.mailbox for rule in policy.rules]
    if policy.default is not None:
        mailboxes.append(policy.default.mailbox)
    return list(dict.fromkeys(mailboxes))


def route(header_section: bytes, policy: RoutingPolicy) -> RouteDecision:
    for name in policy.headers:
        recipients: dict[str, Recipient] = {}
        for address in header_addresses(header_section, name):
            rule = rule_for(address, policy.rules)
            if rule is not None and rule.mailbox not in recipients:
                recipients[rule.mailbox] = Recipient(rule.mailbox, address, name)
        if recipients:
            return RouteDecision(list(recipients.values()))
    if policy.default is not None:
        return RouteDecision([Recipient(policy.default.mailbox, "", "")], by_default=True)
    return RouteDecision()
