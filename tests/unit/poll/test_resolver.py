"""The idle probe's host addresses (connector/poll/resolver.py), looked up in threads of their own."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from connector.poll import resolver
from connector.poll.resolver import HostAddresses

HOST = ("pop.example", 110)
FIRST = [(socket.AF_INET, ("192.0.2.1", 110))]
SECOND = [(socket.AF_INET, ("192.0.2.2", 110))]


class _Lookups:
    """``look_up`` answering from a list of outcomes, one per call."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self, host: str, port: int) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def _settled(hosts: HostAddresses, woken: threading.Event) -> list[Any]:
    assert woken.wait(5), "the lookup thread never woke the loop"
    woken.clear()
    return hosts.finished()


def test_the_first_lookup_is_waited_for_then_the_addresses_serve_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups = _Lookups(FIRST)
    monkeypatch.setattr(resolver, "look_up", lookups)
    woken = threading.Event()
    hosts = HostAddresses(woken.set)
    assert hosts.get(HOST) is None and hosts.get(HOST) is None  # one lookup, however many ask
    assert _settled(hosts, woken) == [(HOST, FIRST)]
    assert hosts.get(HOST) == FIRST and lookups.calls == 1


def test_stale_addresses_serve_while_the_host_is_looked_up_again_and_after_that_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups = _Lookups(FIRST, socket.gaierror(socket.EAI_AGAIN, "try again"), SECOND)
    monkeypatch.setattr(resolver, "look_up", lookups)
    woken = threading.Event()
    hosts = HostAddresses(woken.set, every=0.0)  # always stale
    assert hosts.get(HOST) is None
    _settled(hosts, woken)
    assert hosts.get(HOST) == FIRST  # stale: served, and looked up again meanwhile
    assert _settled(hosts, woken) == []  # a refresh is no first lookup: no account waits for it
    assert hosts.get(HOST) == FIRST  # that lookup failed: the last addresses serve on
    _settled(hosts, woken)
    assert hosts.get(HOST) == SECOND


def test_a_failed_first_lookup_is_told_once_and_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    failure = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    lookups = _Lookups(failure, FIRST)
    monkeypatch.setattr(resolver, "look_up", lookups)
    woken = threading.Event()
    hosts = HostAddresses(woken.set)
    assert hosts.get(HOST) is None
    assert _settled(hosts, woken) == [(HOST, failure)]
    assert hosts.get(HOST) is None  # asked again: a new lookup
    assert _settled(hosts, woken) == [(HOST, FIRST)]


def test_a_name_the_resolver_cannot_even_encode_fails_as_a_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolver, "look_up", _Lookups(UnicodeError("label too long")))
    woken = threading.Event()
    hosts = HostAddresses(woken.set)
    hosts.get(HOST)
    [(host, outcome)] = _settled(hosts, woken)
    assert host == HOST and isinstance(outcome, OSError) and "label too long" in str(outcome)
