"""Configuration fields of issue 4: sizes, limits, selection, retry additions."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest

from connector.config import load_config, parse_size
from connector.errors import ConfigError
from tests.unit.test_config import BASE, error_of, write


@pytest.mark.parametrize(
    ("text", "size"),
    [("25MB", 25 * 2**20), ("512K", 512 * 1024), ("512 kb", 512 * 1024), ("1G", 2**30), (1000, 1000)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "-1", 0, "10 TB", True])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_policy_defaults(tmp_path: Path) -> None:
    (account,) = load_config(write(tmp_path, BASE)).accounts
    assert account.max_message_size is None and account.oversize == "skip"
    assert account.max_messages_per_poll == 0 and account.start == "all"
    assert account.retry.auth_failure_backoff == timedelta(hours=1)
    assert account.retry.max_consecutive_failures == 50


def test_policy_fields_inherit_and_override(tmp_path: Path) -> None:
    text = BASE.replace(
        "[[destinations]]",
        '[defaults]\nmax_message_size = "10MB"\nretry = { max_consecutive_failures = 3 }\n\n[[destinations]]',
    )
    text += 'oversize = "headers_only"\nstart = "new"\nretry = { auth_failure_backoff = "6h" }\n'
    (account,) = load_config(write(tmp_path, text)).accounts
    assert account.max_message_size == 10 * 2**20 and account.oversize == "headers_only"
    assert account.start == "new" and account.retry.max_consecutive_failures == 3
    assert account.retry.auth_failure_backoff == timedelta(hours=6)


def test_bad_policy_fields_name_the_path(tmp_path: Path) -> None:
    assert "accounts[0].max_message_size" in error_of(tmp_path, BASE + 'max_message_size = "huge"\n')
    assert "accounts[0].start" in error_of(tmp_path, BASE + 'start = "old"\n')
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.oversize"):
        load_config(write(tmp_path, BASE + 'oversize = "drop"\n'))


def test_forgetting_missing_messages_defaults_and_overrides(tmp_path: Path) -> None:
    (account,) = load_config(write(tmp_path, BASE)).accounts
    assert account.forget_missing_after_polls == 3 and account.forget_missing_after == timedelta(hours=24)
    text = BASE.replace("[[destinations]]", '[defaults]\nforget_missing_after = "2h"\n\n[[destinations]]')
    (account,) = load_config(write(tmp_path, text + "forget_missing_after_polls = 1\n")).accounts
    assert account.forget_missing_after_polls == 1 and account.forget_missing_after == timedelta(hours=2)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("forget_missing_after_polls = 0", "accounts[0].forget_missing_after_polls"),
        ('forget_missing_after_polls = "many"', "accounts[0].forget_missing_after_polls"),
        ('forget_missing_after = "soon"', "accounts[0].forget_missing_after"),
        ('forget_missing_after = "-1h"', "accounts[0].forget_missing_after"),
    ],
)
def test_bad_forgetting_fields_name_the_path(tmp_path: Path, line: str, expected: str) -> None:
    assert expected in error_of(tmp_path, BASE + line + "\n")


def test_accounts_with_the_same_policy_share_one_object(tmp_path: Path) -> None:
    """Equal policies are one (frozen) object, whether inherited from [defaults] or written per account;
    what each account's policy says is unchanged, a partial retry table still inheriting the rest."""
    text = (
        BASE.replace("[[destinations]]", "[defaults]\nretry = { max_attempts = 3 }\n\n[[destinations]]")
        + 'retention = "keep"\n'
    )
    for name, extra in [("bob", 'retention = "keep"\n'), ("carol", 'retry = { initial_backoff = "2m" }\n')]:
        text += (
            f'\n[[accounts]]\nname = "{name}"\nhost = "pop.example.net"\nusername = "{name}"\n'
            f'password = "pw"\ndestination = "local"\n{extra}'
        )
    alice, bob, carol = load_config(write(tmp_path, text)).accounts
    assert alice.retry is bob.retry and alice.retry.max_attempts == 3
    assert alice.retention is bob.retention and alice.retention.mode == "keep"
    assert carol.retry is not alice.retry
    assert carol.retry.max_attempts == 3 and carol.retry.initial_backoff == timedelta(minutes=2)
    assert carol.retention.mode == "delete"


def test_an_account_of_a_big_accounts_file_holds_a_few_kilobytes(tmp_path: Path) -> None:
    """100,000 accounts took 722 MB, each holding its own copy of every policy and of every default as
    set; what one account of a file keeps after loading is bounded (2.0 kB here; 4.6 kB before)."""
    rows = ["name,host,username,password,destination"]
    rows += [f"a{n},pop.example.net,u{n},file:pw.txt,local" for n in range(2000)]
    (tmp_path / "pw.txt").write_text("secret-password\n")
    (tmp_path / "accounts.csv").write_text("\n".join(rows) + "\n")
    text = 'accounts_file = "accounts.csv"\n' + BASE[: BASE.index("[[accounts]]")]
    text = text.replace("[[destinations]]", '[defaults]\npoll_interval = "10m"\n\n[[destinations]]')
    load_config(write(tmp_path, text))  # imports and caches out of the count
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        config = load_config(write(tmp_path, text))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(config.accounts) == 2000 and config.accounts[0].poll_interval == timedelta(minutes=10)
    assert held / 2000 < 3000
