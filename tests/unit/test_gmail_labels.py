"""The pure parts of the Gmail session (connector/destinations/gmail.py): label paths and ids, the search
for a Message-ID, resumable upload offsets, the per-user quota, and redaction of token answers."""

from __future__ import annotations

import json
import shlex

from connector import redaction
from connector.destinations.gmail import (
    LabelIndex,
    QuotaPacer,
    _received_through,
    label_path,
    rfc822msgid_query,
    wanted_labels,
)
from connector.destinations.gmail_auth import register_token_answer


def test_label_path_lists_each_parent_first() -> None:
    assert label_path("Hosted/alice") == ["Hosted", "Hosted/alice"]
    assert label_path("a/b/c") == ["a", "a/b", "a/b/c"]
    assert label_path(" a // b /") == ["a", "a/b"]
    assert label_path("Single") == ["Single"]


def test_wanted_labels_adds_the_account_label_and_unread_each_once() -> None:
    assert wanted_labels(["INBOX"], "Hosted/alice", unread=True) == ["INBOX", "Hosted/alice", "UNREAD"]
    assert wanted_labels(["INBOX", "UNREAD"], None, unread=True) == ["INBOX", "UNREAD"]
    assert wanted_labels(["INBOX"], "hosted/ alice", unread=False) == ["INBOX", "hosted/alice"]
    assert wanted_labels(["STARRED", "Work/ Old "], "", unread=False) == ["STARRED", "Work/Old"]
    assert wanted_labels(["Work", "work"], None, unread=False) == ["Work"]  # Gmail: case-insensitive names


def test_label_index_finds_system_labels_user_labels_and_says_what_is_missing() -> None:
    listing = {
        "labels": [
            {"id": "INBOX", "name": "INBOX", "type": "system"},
            {"id": "Label_1", "name": "Hosted", "type": "user"},
            {"id": "Label_2", "name": "hosted/Bob", "type": "user"},
            {"name": "no id"},
        ]
    }
    index = LabelIndex.parse(listing)
    assert index.find("INBOX") == "INBOX"
    assert index.find("UNREAD") == "UNREAD"  # system labels need not be listed
    assert index.find("HOSTED/bob") == "Label_2"
    assert index.find("Label_1") == "Label_1"  # a label given by its id
    assert index.find("Hosted/alice") is None
    assert index.missing(["INBOX", "Hosted/alice", "UNREAD", "New/x/y"]) == [
        "Hosted/alice",
        "New",
        "New/x",
        "New/x/y",
    ]
    assert LabelIndex.parse({"labels": "garbage"}).by_name == {}
    assert LabelIndex.parse(None).ids == set()


def test_the_search_names_the_message_id_without_brackets_and_quotes_odd_ones() -> None:
    assert rfc822msgid_query("<abc.123@example.com>") == "rfc822msgid:abc.123@example.com"
    assert rfc822msgid_query("no-brackets@example.com") == "rfc822msgid:no-brackets@example.com"
    assert rfc822msgid_query('<a b"c@example.com>') == 'rfc822msgid:"a b\\"c@example.com"'
    assert rfc822msgid_query('<"a\\"b c"@x>') == 'rfc822msgid:"\\"a\\\\\\"b c\\"@x"'
    assert shlex.split(rfc822msgid_query('<"a\\"b c"@x>')) == ['rfc822msgid:"a\\"b c"@x']


def test_a_resumable_upload_goes_on_after_the_range_gmail_kept() -> None:
    assert _received_through("bytes=0-262143") == 262144
    assert _received_through(None) == 0
    assert _received_through("garbage") == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_pacer_never_spends_more_than_gmails_quota_in_any_second() -> None:
    clock = FakeClock()
    pacer = QuotaPacer(225, burst=25, clock=clock, sleep=clock.sleep)
    sent: list[tuple[float, int]] = []
    for units in [25] * 40 + [5, 5, 1, 25] * 10:
        pacer.spend("alice@example.com", units)
        sent.append((clock.now, units))
    for start, _ in sent:  # Gmail's window: every second that begins at a request
        assert sum(units for at, units in sent if start <= at < start + 1) <= 250
    assert clock.now - 100 < 10  # and it is not slower than the quota: 1370 units at 225 a second


def test_the_pacer_keeps_a_quota_per_user_and_no_more_than_a_burst_for_an_idle_one() -> None:
    clock = FakeClock()
    pacer = QuotaPacer(225, burst=25, clock=clock, sleep=clock.sleep)
    assert pacer.spend("alice@example.com", 25) == 0  # the first import goes at once
    assert abs(pacer.spend("ALICE@example.com", 25) - 25 / 225) < 1e-9  # the same user, any case
    assert pacer.spend("bob@example.com", 25) == 0  # another user has a quota of their own
    clock.now += 60  # an idle mailbox gets back one burst, not a minute's quota
    assert pacer.spend("alice@example.com", 25) == 0
    assert pacer.spend("alice@example.com", 25) > 0


def test_tokens_in_a_token_answer_are_registered_before_anyone_reads_them() -> None:
    answer = {"access_token": "ya29.test-access-1", "refresh_token": "1//test-refresh-1", "expires_in": 3599}
    register_token_answer(json.dumps(answer).encode())
    assert redaction.redact("Bearer ya29.test-access-1 and 1//test-refresh-1") == "Bearer **** and ****"
    register_token_answer(b"not json")  # ignored
    register_token_answer(None)


def test_tls_is_verified_against_the_ca_file_and_off_only_when_configured() -> None:
    from pathlib import Path

    import certifi

    from connector.config import GmailDestination
    from connector.destinations.gmail_auth import verify_setting

    base = {"name": "g", "type": "gmail", "service_account_key": "{}"}
    assert verify_setting(GmailDestination.model_validate(base)) is True
    # A ca_file must exist and hold certificates (checked at load): certifi's bundle stands in for the CA.
    with_ca = GmailDestination.model_validate({**base, "ca_file": certifi.where()})
    assert verify_setting(with_ca) == str(Path(certifi.where()))
    assert verify_setting(GmailDestination.model_validate({**base, "tls_verify": False})) is False
