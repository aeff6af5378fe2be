"""``/metrics`` stays small at 100,000 accounts (bench/metrics.py measures it; docs/operations.md states the
figures). Only a generous bound on the size is asserted, never a duration."""

from __future__ import annotations

from pathlib import Path

from bench.metrics import DAYS, scrape
from connector.ops.metrics import ACCOUNT_SERIES_LIMIT


def test_metrics_of_100_000_accounts_in_an_outage_stay_under_5_mb(tmp_path: Path) -> None:
    outage = DAYS[-1]  # every account failing, with a backlog and unidentified messages: the largest
    result = scrape(100_000, outage, tmp_path)
    assert result.size < 5_000_000, result
    # Four per-account families of at most ACCOUNT_SERIES_LIMIT accounts each, and a few dozen others.
    assert 3 * ACCOUNT_SERIES_LIMIT < result.samples < 4 * ACCOUNT_SERIES_LIMIT + 200, result
