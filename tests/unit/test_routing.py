"""Catch-all routing decisions (pure) and their configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.config import RoutingPolicy, load_config
from connector.errors import ConfigError
from connector.policies.routing import route, rule_for
from tests.unit.test_config import BASE, write

POLICY = RoutingPolicy.model_validate(
    {
        "rules": [
            {"match": "alice@example.org", "mailbox": "alice@corp.example"},
            {"match": "bob@example.org", "mailbox": "bob@corp.example"},
            {"match": "*@sales.example.org", "mailbox": "sales@corp.example"},
        ],
        "default": {"mailbox": "postmaster@corp.example"},
    }
)


def headers(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_envelope_header_wins_over_to_and_cc() -> None:
    decision = route(
        headers(
            "Delivered-To: catchall@hosted.example",
            "X-Original-To: bob@example.org",
            "To: list@lists.example",
        ),
        POLICY,
    )
    assert decision.mailboxes == ["bob@corp.example"]
    assert decision.recipients[0].header == "X-Original-To"  # Delivered-To matched no rule: not decisive


def test_one_message_for_several_people_goes_once_to_each() -> None:
    decision = route(
        headers(
            "To: Alice <ALICE@example.org>, x@sales.example.org, y@sales.example.org", "Cc: alice@example.org"
        ),
        POLICY,
    )
    assert decision.mailboxes == ["alice@corp.example", "sales@corp.example"]
    assert "by To: alice@example.org" in decision.describe()


def test_every_occurrence_of_a_header_counts() -> None:
    decision = route(headers("Delivered-To: alice@example.org", "Delivered-To: bob@example.org"), POLICY)
    assert decision.mailboxes == ["alice@corp.example", "bob@corp.example"]


def test_default_and_unroutable() -> None:
    stranger = headers("To: nobody@elsewhere.example")
    assert route(stranger, POLICY).by_default and route(stranger, POLICY).mailboxes == [
        "postmaster@corp.example"
    ]
    no_default = POLICY.model_copy(update={"default": None})
    decision = route(stranger, no_default)
    assert not decision.routed and "left on the server" in decision.describe()
    assert not route(b"\xff\xfe garbage without headers", no_default).routed


def test_rules_are_tried_in_order() -> None:
    assert rule_for("x@sales.example.org", POLICY.rules) is POLICY.rules[2]
    assert rule_for("alice@example.org.evil", POLICY.rules) is None


MASTER_BASE = BASE.replace(
    'password = "secret"\n', 'password = "secret"\nmaster_username = "master"\nmaster_password = "mpw"\n', 1
)
ROUTED = MASTER_BASE + (
    "[accounts.routing]\n"
    'rules = [{ match = "*@sales.example.org", mailbox = "sales@corp.example" }]\n'
    'default = { mailbox = "postmaster@corp.example" }\n'
)


def test_routing_config(tmp_path: Path) -> None:
    (account,) = load_config(write(tmp_path, ROUTED)).accounts
    assert account.routing is not None and account.routing.headers[0] == "Delivered-To"
    assert (
        account.routing.default is not None and account.routing.default.mailbox == "postmaster@corp.example"
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("[accounts.routing]\nheaders = []\n", "accounts[0].routing.headers"),
        ("[accounts.routing]\n", "routing needs rules, a default, or both"),
        (
            '[accounts.routing]\nrules = [{ match = "sales", mailbox = "x" }]\n',
            "accounts[0].routing.rules[0].match",
        ),
    ],
)
def test_bad_routing_config(tmp_path: Path, table: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, MASTER_BASE + table))


def test_catch_all_needs_a_master_user_or_impersonation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs master_username and master_password"):
        load_config(write(tmp_path, ROUTED.replace("master_", "# master_")))
    half = MASTER_BASE.replace('master_password = "mpw"\n', "")
    with pytest.raises(ConfigError, match="master_username and master_password go together"):
        load_config(write(tmp_path, half))


def test_catch_all_on_ews_needs_impersonation(tmp_path: Path) -> None:
    ews = (
        '[[destinations]]\nname = "ex"\ntype = "ews"\nservice_endpoint = "https://mail.corp.example/EWS"\n'
        'username = "svc@corp.example"\npassword = "pw"\nimpersonation = {impersonation}\n'
        '[[accounts]]\nname = "all"\nhost = "pop.example"\nusername = "u"\npassword = "p"\n'
        'destination = "ex"\n[accounts.routing]\ndefault = {{ mailbox = "pm@corp.example" }}\n'
    )
    with pytest.raises(ConfigError, match="needs impersonation = true"):
        load_config(write(tmp_path, ews.format(impersonation="false")))
    (account,) = load_config(write(tmp_path, ews.format(impersonation="true"))).accounts
    assert account.routing is not None and account.mailbox is None
