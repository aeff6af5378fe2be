"""Accounts in CSV files (connector/accounts_file.py): read beside [[accounts]], validated alike, every error
at its line, secrets only as references, reloaded with the configuration; ``accounts check-file``."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from connector.cli import main
from connector.cli.accounts import check_file
from connector.config import load_config
from connector.errors import ConfigError
from connector.service.distributed.config_watch import ConfigWatch
from connector.service.reload import account_changes

CONFIG = """
accounts_file = "accounts.csv"

[defaults]
retry = { max_attempts = 7 }

[[destinations]]
name = "local"
type = "imap"
host = "127.0.0.1"
username = "archive"
password = "secret"

[[accounts]]
name = "alice"
host = "pop.example.net"
username = "alice"
password = "pw"
destination = "local"
"""

HEADER = "name,host,username,password,destination\n"


def setup(tmp_path: Path, rows: str, *, config: str = CONFIG, header: str = HEADER) -> Path:
    (tmp_path / "accounts.csv").write_text(header + rows)
    path = tmp_path / "config.toml"
    path.write_text(config)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


@pytest.fixture(autouse=True)
def _passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP_PW", "from-env")


def test_rows_are_accounts_beside_the_toml_ones(tmp_path: Path) -> None:
    (tmp_path / "carol.pw").write_text("from-file\n")
    path = setup(
        tmp_path,
        "bob,pop.hosted.example,bob@hosted,env:POP_PW,local\ncarol,pop.hosted.example,carol,file:carol.pw,local\n",
    )
    config = load_config(path)
    assert [a.name for a in config.accounts] == ["alice", "bob", "carol"]
    bob, carol = config.accounts[1], config.accounts[2]
    assert bob.username == "bob@hosted" and bob.password is not None
    assert bob.password.get_secret_value() == "from-env"
    # A file: reference is relative to the accounts file, and loses its trailing newline like { file = }.
    assert carol.password is not None and carol.password.get_secret_value() == "from-file"
    assert bob.retry.max_attempts == 7 and bob.folder == "INBOX"  # [defaults] apply to rows too
    assert config.account_file_paths == (tmp_path / "accounts.csv",)


def test_nested_fields_are_dotted_columns_and_an_empty_cell_is_not_set(tmp_path: Path) -> None:
    path = setup(
        tmp_path,
        "bob,h,bob,env:POP_PW,local,days,14,,FALSE,\ncarol,h,carol,env:POP_PW,local,,,3,,30s\n",
        header="name,host,username,password,destination,retention.mode,retention.days,retry.max_attempts,"
        "enabled,poll_interval\n",
    )
    bob, carol = load_config(path).accounts[1:]
    assert (bob.retention.mode, bob.retention.days, bob.enabled) == ("days", 14, False)
    assert bob.retry.max_attempts == 7 and bob.poll_interval == timedelta(minutes=5)
    assert carol.retention.mode == "delete" and carol.enabled
    # A partial retry inherits the rest from [defaults], as a partial retry table does.
    assert carol.retry.max_attempts == 3 and carol.retry.max_backoff == timedelta(hours=1)
    assert carol.poll_interval == timedelta(seconds=30)


def test_a_broken_row_is_reported_at_its_line(tmp_path: Path) -> None:
    rows = "".join(f"user{n},h,user{n},env:POP_PW,local\n" for n in range(2, 16))
    rows += '"quoted,\nover two lines",h,u,env:POP_PW,local\n'  # lines 16-17: one row
    rows += "broken,h,,env:POP_PW,local\n"  # line 18
    message = error_of(setup(tmp_path, rows))
    csv_path = tmp_path / "accounts.csv"
    assert message.splitlines() == [
        f"{csv_path}:16: name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._@+-]*$'",
        f"{csv_path}:18: username: required field is missing",
    ]


def test_a_broken_row_is_a_configuration_error_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = setup(tmp_path, "bob,h,bob,env:POP_PW,local\ncarol,h,,env:POP_PW,local\n")
    assert main(["--config", str(path), "status"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'accounts.csv'}:3: username: required field is missing" in err
    assert "Traceback" not in err


def test_an_inline_password_is_an_error_naming_the_cell_and_never_shown(tmp_path: Path) -> None:
    message = error_of(setup(tmp_path, "bob,h,bob,hunter2-secret,local\n"))
    assert message == (
        f"{tmp_path / 'accounts.csv'}:2: password: a secret written in the file; write env:NAME (an "
        "environment variable) or file:PATH (a file holding it) instead"
    )
    assert "hunter2" not in message


def test_every_secret_column_takes_references_only(tmp_path: Path) -> None:
    path = setup(
        tmp_path,
        "bob,h,bob,env:POP_PW,local,carol,inline\n",
        header="name,host,username,password,destination,destination_username,destination_password\n",
    )
    assert ":2: destination_password: a secret written in the file" in error_of(path)


def test_unresolvable_references_name_the_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    path = setup(tmp_path, "bob,h,bob,env:NOT_SET_ANYWHERE,local\ncarol,h,c,file:missing.pw,local\n")
    lines = error_of(path).splitlines()
    assert (
        lines[0]
        == f"{tmp_path / 'accounts.csv'}:2: password: environment variable NOT_SET_ANYWHERE is not set"
    )
    assert lines[1].startswith(f"{tmp_path / 'accounts.csv'}:3: password: cannot read secret file ")


def test_names_are_unique_across_the_file_and_the_toml(tmp_path: Path) -> None:
    path = setup(tmp_path, "alice,h,a,env:POP_PW,local\nbob,h,b,env:POP_PW,local\nbob,h,b,env:POP_PW,local\n")
    csv_path = tmp_path / "accounts.csv"
    assert error_of(path).splitlines() == [
        f"{csv_path}:2: name: duplicate name 'alice' (also {tmp_path / 'config.toml'}: accounts[0])",
        f"{csv_path}:4: name: duplicate name 'bob' (also {csv_path}:3)",
    ]


def test_header_problems_are_on_line_1(tmp_path: Path) -> None:
    path = setup(
        tmp_path,
        "bob,h,bob,env:POP_PW,local,1,keep,x\n",
        header="name,host,username,password,destination,colour,retention,retention.mode\n",
    )
    csv_path = tmp_path / "accounts.csv"
    assert error_of(path).splitlines() == [
        f"{csv_path}:1: colour: unknown column (the columns are the fields of [[accounts]])",
        f"{csv_path}:1: retention.mode: cannot go with column retention (write one or the other)",
    ]


def test_cross_references_point_at_the_row(tmp_path: Path) -> None:
    path = setup(tmp_path, "bob,h,bob,env:POP_PW,local\ncarol,h,c,env:POP_PW,nowhere\n")
    assert (
        error_of(path)
        == f"{tmp_path / 'accounts.csv'}:3: destination: unknown destination 'nowhere' (known: local)"
    )


def test_spreadsheet_exports_semicolons_and_a_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "accounts.csv").write_bytes(
        "\ufeffname;host;username;password;destination\r\nbob;h;bob;env:POP_PW;local\r\n\r\n".encode()
    )
    (tmp_path / "config.toml").write_text(CONFIG)
    assert [a.name for a in load_config(tmp_path / "config.toml").accounts] == ["alice", "bob"]


def test_account_files_tables_give_their_rows_defaults(tmp_path: Path) -> None:
    (tmp_path / "hosted").mkdir()
    (tmp_path / "hosted" / "a.csv").write_text("name,host,username,password\nbob,h,bob,env:POP_PW\n")
    (tmp_path / "b.csv").write_text("name,host,username,password,folder\ncarol,h,c,env:POP_PW,Own\n")
    config_text = CONFIG.replace('accounts_file = "accounts.csv"\n', "") + (
        '\n[[account_files]]\npath = "hosted/a.csv"\ndestination = "local"\n'
        '\n[[account_files]]\npath = "b.csv"\ndestination = "local"\nfolder = "Hosted"\n'
    )
    (tmp_path / "config.toml").write_text(config_text)
    config = load_config(tmp_path / "config.toml")
    bob, carol = config.accounts[1:]
    assert (bob.destination, bob.folder) == ("local", "INBOX")
    assert (carol.destination, carol.folder) == ("local", "Own")  # the row's cell wins
    # A bad default of a table is reported once, at the table, not at each of its rows.
    (tmp_path / "config.toml").write_text(
        config_text.replace('folder = "Hosted"', 'folder = "Hosted"\nport = 0')
    )
    (tmp_path / "b.csv").write_text("name,host,username,password\nc1,h,c,env:POP_PW\nc2,h,c,env:POP_PW\n")
    assert error_of(tmp_path / "config.toml") == (
        f"{tmp_path / 'config.toml'}: account_files[1].port: Input should be greater than or equal to 1"
    )
    (tmp_path / "config.toml").write_text(config_text.replace('folder = "Hosted"', "colour = 1"))
    assert error_of(tmp_path / "config.toml") == (
        f"{tmp_path / 'config.toml'}: account_files[1].colour: not an account field (check the spelling)"
    )


def test_a_missing_accounts_file_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    assert error_of(path) == (
        f"{tmp_path / 'accounts.csv'}: cannot read the accounts file: No such file or directory"
    )


def test_500_rows_load(tmp_path: Path) -> None:
    rows = "".join(
        f"user{n:03},pop{n % 7}.hosted.example,user{n}@hosted.example,env:POP_PW,local\n" for n in range(500)
    )
    config = load_config(setup(tmp_path, rows))
    assert len(config.accounts) == 501
    assert config.accounts[-1].name == "user499" and config.accounts[-1].host == "pop2.hosted.example"
    assert len({account.name for account in config.accounts}) == 501


def test_a_reload_sees_the_file_change(tmp_path: Path) -> None:
    path = setup(tmp_path, "bob,h,bob,env:POP_PW,local\ncarol,h,carol,env:POP_PW,local\n")
    old = load_config(path)
    (tmp_path / "accounts.csv").write_text(
        HEADER + "bob,h2,bob,env:POP_PW,local\ndave,h,d,env:POP_PW,local\n"
    )
    changes = account_changes(old, load_config(path))
    assert (changes.added, changes.removed, changes.changed) == (["dave"], ["carol"], ["bob"])


def test_a_distributed_worker_sees_the_file_change(tmp_path: Path) -> None:
    path = setup(tmp_path, "bob,h,bob,env:POP_PW,local\n")
    watch = ConfigWatch(load_config(path))
    assert watch.refresh()[1] is False
    csv_path = tmp_path / "accounts.csv"
    csv_path.write_text(HEADER + "bob,h,bob,env:POP_PW,local\ncarol,h,c,env:POP_PW,local\n")
    later = time.time_ns() + 10**9  # a new mtime even on coarse-grained file systems
    os.utime(csv_path, ns=(later, later))
    config, reloaded = watch.refresh()
    assert reloaded and [a.name for a in config.accounts] == ["alice", "bob", "carol"]


def test_a_poll_noticing_the_change_first_does_not_hide_it_from_the_registry(tmp_path: Path) -> None:
    path = setup(tmp_path, "bob,h,bob,env:POP_PW,local\n")
    watch = ConfigWatch(load_config(path))
    csv_path = tmp_path / "accounts.csv"
    csv_path.write_text(HEADER + "bob,h,bob,env:POP_PW,local\ncarol,h,c,env:POP_PW,local\n")
    later = time.time_ns() + 10**9
    os.utime(csv_path, ns=(later, later))
    # A poll job reads the configuration first (worker.poll_account), then the dispatch's sync asks.
    assert [a.name for a in watch.current().accounts] == ["alice", "bob", "carol"]
    config, reloaded = watch.refresh()
    assert reloaded and [a.name for a in config.accounts] == ["alice", "bob", "carol"]
    assert watch.refresh()[1] is False  # reported once


def test_a_distributed_worker_finds_a_poll_jobs_account_by_name_in_the_newest_file(tmp_path: Path) -> None:
    path = setup(
        tmp_path, "bob,h,bob,env:POP_PW,local\n", header="name,host,username,password,destination,enabled\n"
    )
    (tmp_path / "accounts.csv").write_text(
        "name,host,username,password,destination,enabled\nbob,h,bob,env:POP_PW,local,true\n"
        "carol,h,c,env:POP_PW,local,false\n"
    )
    watch = ConfigWatch(load_config(path))
    config, bob = watch.account("bob")
    assert bob is not None and bob.username == "bob" and bob in config.accounts
    assert watch.account("carol")[1] is None  # disabled
    assert watch.account("nobody")[1] is None
    csv_path = tmp_path / "accounts.csv"
    csv_path.write_text(HEADER + "bob,h,bob2,env:POP_PW,local\ndave,h,d,env:POP_PW,local\n")
    later = time.time_ns() + 10**9
    os.utime(csv_path, ns=(later, later))
    config, dave = watch.account("dave")
    assert dave is not None and dave in config.accounts
    bob = watch.account("bob")[1]
    assert bob is not None and bob.username == "bob2"


# --- accounts check-file -------------------------------------------------------------------------------


def test_check_file_counts_the_accounts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = setup(tmp_path, "bob,h,bob,env:POP_PW,local\ncarol,h,c,env:POP_PW,local\n")
    csv_path = tmp_path / "accounts.csv"
    assert main(["--config", str(path), "accounts", "check-file", str(csv_path)]) == 0
    assert capsys.readouterr().out == f"{csv_path}: 2 accounts (checked against {path})\n"


def test_check_file_lists_each_error_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = setup(tmp_path, "bob,h,bob,inline,local\ncarol,h,,env:POP_PW,nowhere\n")
    csv_path = tmp_path / "accounts.csv"
    assert main(["--config", str(path), "accounts", "check-file", str(csv_path)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{csv_path}:2: password: a secret written in the file; write env:NAME (an environment variable) or "
        "file:PATH (a file holding it) instead",
        f"{csv_path}:3: username: required field is missing",
        f"{csv_path}: 2 errors",
    ]


def test_check_file_checks_another_file_than_the_configured_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The configured accounts.csv is broken; the file checked is not, and is checked on its own.
    path = setup(tmp_path, "broken,h,,env:POP_PW,local\n")
    new = tmp_path / "new.csv"
    new.write_text(HEADER + "bob,h,bob,env:POP_PW,local\nalice,h,a,env:POP_PW,local\n")
    assert check_file(new, path) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{new}:3: name: duplicate name 'alice' (also {path}: accounts[0])",
        f"{new}: 1 error",
    ]


def test_check_file_uses_the_defaults_of_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("name,host,username,password\nbob,h,bob,env:POP_PW\n")
    config_text = CONFIG.replace('accounts_file = "accounts.csv"\n', "")
    path = tmp_path / "config.toml"
    path.write_text(config_text + '\n[[account_files]]\npath = "a.csv"\ndestination = "local"\n')
    assert check_file(csv_path, path) == 0
    assert capsys.readouterr().out == f"{csv_path}: 1 account (checked against {path})\n"


def test_check_file_without_a_configuration_checks_each_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POP_CONNECTOR_CONFIG", raising=False)
    csv_path = tmp_path / "accounts.csv"
    csv_path.write_text(HEADER + "bob,h,bob,env:POP_PW,anywhere\ncarol,h,c,env:POP_PW,x,\n")
    assert main(["accounts", "check-file", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{csv_path}: 2 accounts (no configuration given")
    csv_path.write_text(HEADER + "bob,h,bob,env:POP_PW,anywhere\ncarol,h,c,env:POP_PW,x,extra\n,h\n")
    assert main(["accounts", "check-file", str(csv_path)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{csv_path}:3: 6 cells, but the header names 5 columns",
        f"{csv_path}:4: name: required field is missing",
        f"{csv_path}:4: username: required field is missing",
        f"{csv_path}:4: destination: required field is missing",
        f"{csv_path}: 4 errors",
    ]


def test_errors_come_in_line_order(tmp_path: Path) -> None:
    # An inline secret is found while reading, a missing field while validating: still listed by line.
    path = setup(tmp_path, "bob,h,,env:POP_PW,local\ncarol,h,c,inline,local\ndave,h,,env:POP_PW,local\n")
    lines = error_of(path).splitlines()
    assert [line.split(": ")[0].rsplit(":", 1)[1] for line in lines] == ["2", "3", "4"]
