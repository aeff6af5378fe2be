"""The benchmark harness runs end to end on tiny data and prints its table. Never a time asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.acceptance.conftest import ROOT

pytestmark = pytest.mark.acceptance

TINY = [
    "--quick", "--no-fetchmail", "--small-count", "3", "--large-count", "1", "--large-size", "20000",
    "--huge-size", "100000", "--latency-count", "3", "--latency-ms", "2", "--idle-accounts", "2",
    "--big-mailbox", "20", "--new-messages", "2", "--ews-count", "4", "--create-batch", "3",
]  # fmt: skip


def test_bench_prints_a_row_per_scenario() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", *TINY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("scenario"))
    assert [cell.strip() for cell in header.split("|")] == [
        "scenario",
        "connector",
        "baseline",
        "ratio",
        "fetchmail",
    ]
    for scenario in ("(1)", "(2)", "(3)", "(4)", "(5)", "(6)", "(7)", "(8)"):
        row = next(line for line in lines if line.startswith(scenario))
        float(row.split("|")[3])  # a ratio, whatever its value


def test_ledger_bench_prints_its_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.ledger import main

    assert main(["--messages", "20"]) == 0
    assert "ratio (bare CPU / connector CPU):" in capsys.readouterr().out


def test_listing_bench_prints_its_cpu_and_collections(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.listing import main

    assert main(["--kept", "200", "--new", "3", "--runs", "2"]) == 0
    assert "listing of 200 kept + 3 new:" in capsys.readouterr().out


def test_big_compare_polls_each_side_every_round(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.big_compare import main

    # The same checkout twice under two names: each side's ledger and maildrop are its own.
    assert main(["one=" + str(ROOT), "two=" + str(ROOT), "--rounds", "2", "--kept", "20", "--new", "2"]) == 0
    out = capsys.readouterr().out
    for side in ("baseline", "one", "two"):
        assert sum(f" {side}: " in line and line.startswith("round ") for line in out.splitlines()) == 2
        assert f"{side}: median " in out


@pytest.mark.parametrize("tls", [False, True])
def test_idle_design_bench_finds_every_account_idle(capsys: pytest.CaptureFixture[str], tls: bool) -> None:
    from bench.idle_design import main

    # It stops with an AssertionError unless every poll found its account's one message, as the ledger says.
    assert main(["--accounts", "12", "--batch", "5", "--rounds", "2", *(["--tls"] if tls else [])]) == 0
    out = capsys.readouterr().out
    assert f"12 idle accounts, {'POP3S' if tls else 'POP3'}, best of 2 rounds:" in out
    assert "bare loop" in out and "this design" in out


def test_idle_parts_bench_prints_each_part(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.idle_parts import main

    assert main(["--accounts", "5"]) == 0
    out = capsys.readouterr().out
    assert "connector idle poll (SyncEngine.poll)" in out and "poplib + CAPA" in out


def test_gmail_bench_prints_throughput_against_the_quota(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.gmail import main

    assert main(["--messages", "3", "--mailboxes", "1", "--latency", "0"]) == 0
    out = capsys.readouterr().out
    assert "messages/s per mailbox" in out and "of the quota's ceiling" in out and "3 delivered" in out


def test_reconcile_bench_reads_a_folder_and_finds_nothing_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.reconcile import main

    assert main(["--messages", "5"]) == 0
    out = capsys.readouterr().out
    assert "reconcile of 5 messages" in out and "0 discrepancies" in out


def test_schedule_bench_runs_the_service_and_reports_lag_and_bunching(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.schedule import main

    assert main(["--accounts", "12", "--interval", "2", "--intervals", "1"]) == 0
    out = capsys.readouterr().out
    assert "polls/s needed 6.0" in out and " 0 failed" in out
    assert "lag, first interval: median" in out and "most started in one second" in out


def test_startup_bench_times_each_command_of_each_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.startup import main

    # The same checkout twice: the lead's before/after run gives two (the second run's idle sync is
    # checked to deliver nothing, or the bench stops).
    assert main(["--repo", str(ROOT), "--repo", str(ROOT), "--runs", "1", "--imports", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("  status ") == 2 and out.count("  sync ") == 2 and out.count("imports of --help") == 2
