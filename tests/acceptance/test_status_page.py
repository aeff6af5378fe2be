"""The status page in a real headless Chromium (Debian's package, driven by Playwright) against `run`: live
polls, and a thousand accounts of a synthetic ledger (sorting, filtering, paging, an account page; the
screenshots in docs/operations.md are taken here)."""

from __future__ import annotations

import os
import re
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

from connector.ledger.database import open_database
from tests.acceptance.conftest import ROOT
from tests.acceptance.service import RunningService, free_port
from tests.acceptance.test_operations import account_toml
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.synthetic_ledger import HOSTILE_NAME, account_names, config_toml, expected_state, fill

pytestmark = pytest.mark.acceptance

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "page-token-7f3a"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("chromium is not installed (apt-get install chromium; scripts/test does)", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_status_page_shows_accounts_refreshes_itself_and_wants_the_token(
    browser: Browser, dovecot: Dovecot, mail_users: MailUsers, write_cfg: Callable[..., Path]
) -> None:
    dovecot.seed(mail_users.source.name, [simple(n) for n in range(2)])
    port = free_port()
    config = write_cfg(
        service={"metrics": f"127.0.0.1:{port}", "status_token": TOKEN, "status_refresh": "1s"},
        defaults={"poll_interval": "1s", "poll_jitter": 0},
        account={"retention": {"mode": "keep"}},  # ledger counts then only grow: stable to look for
    )
    locked_out = dovecot.new_user("locked")
    wrong = account_toml("locked", dovecot, locked_out).replace(locked_out.password, "wrong-password-9c1")
    config.write_text(config.read_text() + wrong + 'retry = { initial_backoff = "1h" }\n')
    page = browser.new_page()
    try:
        with RunningService(config, port) as service:
            response = page.goto(service.base + "/")
            assert response is not None and response.status == 401
            assert "access token required" in page.inner_text("body")

            page.goto(f"{service.base}/?token={TOKEN}")
            expect(page.locator("h1")).to_have_text("POP Connector status")
            alice = page.locator('tr[data-account="alice"]')
            expect(alice.locator(".state")).to_have_text("ok", timeout=60_000)
            expect(alice).to_contain_text("delivered 2", timeout=60_000)
            locked = page.locator('tr[data-account="locked"]')
            expect(locked.locator(".state")).to_have_text("auth failing", timeout=60_000)
            expect(locked.locator(".error")).not_to_be_empty()

            # New mail: a later poll delivers it and the page, never reloaded by us, shows it.
            dovecot.seed(mail_users.source.name, [simple(n) for n in range(10, 13)])
            expect(alice).to_contain_text("delivered 5", timeout=60_000)
            expect(alice.locator(".state")).to_have_text("ok")

            content = page.content()
            for secret in (mail_users.source.password, mail_users.destination.password, "wrong-password-9c1"):
                assert secret not in content
            # The token the page was opened with is in its own links and form (a browser has no other
            # way to send it on), and nowhere else.
            assert TOKEN not in content.replace(f"token={TOKEN}", "").replace(f'value="{TOKEN}"', "")
    finally:
        page.close()
        dovecot.remove_user(locked_out.name)


def screenshots(tmp_path: Path) -> Path:
    """Where the screenshots go: docs/ (what docs/operations.md shows) only when asked with
    POP_CONNECTOR_SCREENSHOTS=docs, so that a test run leaves the checkout as it was."""
    return ROOT / "docs" if os.environ.get("POP_CONNECTOR_SCREENSHOTS") == "docs" else tmp_path


def delivered_column(page: Page) -> list[int]:
    cells = page.locator("#accounts tbody tr td:nth-child(6)").all_inner_texts()
    return [int(cell.split()[0].replace(",", "")) for cell in cells]


def test_a_thousand_accounts_sorted_filtered_paged_and_an_account_page(
    browser: Browser, tmp_path: Path
) -> None:
    """1,000 configured accounts (and one the configuration dropped, with a hostile name) in a ledger
    written directly, under `run`, which polls none of them while the browser looks."""
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    engine = open_database(database)
    names = account_names(1000)
    synthetic = fill(engine, names, datetime.now(UTC))
    engine.dispose()
    port = free_port()
    service_fields = {"metrics": f"127.0.0.1:{port}", "status_token": TOKEN, "status_refresh": "1h"}
    config = tmp_path / "config.toml"
    config.write_text(config_toml(names, database, service_fields))
    dialogs: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("dialog", lambda dialog: _refuse(dialog, dialogs))
    try:
        with RunningService(config, port) as service:
            page.goto(f"{service.base}/?token={TOKEN}")
            summary = page.locator("#summary")
            expect(summary).to_contain_text("1001 accounts:")
            by_state = {
                state: sum(expected_state(n) == state for n in names) for state in ("ok", "auth failing")
            }
            expect(summary).to_contain_text(f"{by_state['ok']} ok")
            rows = page.locator("#accounts tbody tr")
            expect(rows).to_have_count(50)
            # Natural order: user2 before user10; the dropped account with its markup name is plain text.
            shown = [row.get_attribute("data-account") for row in rows.all()]
            assert shown[:4] == [HOSTILE_NAME, "user1", "user2", "user3"]
            expect(page.locator("nav.pages .where").first).to_have_text(
                "page 1 of 21 (accounts 1\u201350 of 1001)"
            )

            # Without the old mailbox, for the documentation.
            page.fill('input[name="q"]', "user")
            page.click("form#filter button")
            expect(page.locator("nav.pages .where").first).to_contain_text("of 1000)")
            page.screenshot(path=str(screenshots(tmp_path) / "status-page.png"))

            # Sorting: the largest totals first; clicking again reverses.
            page.click('th[data-sort="delivered"] a')
            expect(page).to_have_url(re.compile(r"sort=delivered&order=desc"))
            first_page = delivered_column(page)
            assert first_page == sorted(first_page, reverse=True)
            assert first_page[0] == max(synthetic.delivered.get(n, 0) for n in names)
            page.click('th[data-sort="delivered"] a')
            expect(page).to_have_url(re.compile(r"sort=delivered&order=asc"))
            assert delivered_column(page)[:3] == [0, 0, 0]  # the accounts never polled

            # Filtering by state from the summary line, then paging through it with the form's page size.
            page.click('#summary a[data-state="auth failing"]')
            expect(rows).to_have_count(by_state["auth failing"])
            assert {row.get_attribute("data-state") for row in rows.all()} == {"auth failing"}
            page.select_option('select[name="state"]', "ok")
            page.select_option('select[name="per_page"]', "100")
            page.fill('input[name="q"]', "")
            page.click("form#filter button")
            expect(rows).to_have_count(100)
            pages = -(-by_state["ok"] // 100)
            expect(page.locator("nav.pages .where").first).to_contain_text(f"page 1 of {pages}")
            page.locator('nav.pages a[rel="last"]').first.click()
            expect(page.locator("nav.pages .where").first).to_contain_text(f"page {pages} of {pages}")
            expect(rows).to_have_count(by_state["ok"] - 100 * (pages - 1))
            assert {row.get_attribute("data-state") for row in rows.all()} == {"ok"}
            page.locator('nav.pages a[rel="prev"]').first.click()
            expect(page.locator("nav.pages .where").first).to_contain_text(f"page {pages - 1} of {pages}")
            for link in page.locator("a[href]").all():
                assert f"token={TOKEN}" in (link.get_attribute("href") or "")

            # An account page: found with the search, opened from its link.
            page.fill('input[name="q"]', "user7")
            page.select_option('select[name="state"]', "")
            page.click("form#filter button")
            page.locator("a.account", has_text=re.compile(r"^user7$")).click()
            expect(page.locator("#account-name")).to_have_text("user7")
            expect(page).to_have_url(re.compile(r"/account/user7\?token="))
            reason = page.locator("#next-poll-reason")
            expect(reason).to_contain_text("LOGIN-DELAY: the server refused a login this soon")
            expect(reason).to_contain_text("BACKING OFF after 3 failed polls in a row")
            expect(page.locator("#last-error")).to_contain_text("[LOGIN-DELAY]")
            journaled = sum(synthetic.per_day["user7"].values())
            expect(page.locator("#deliveries tbody tr")).to_have_count(min(50, journaled))
            expect(page.locator("svg.chart g.day")).to_have_count(30)
            expect(page.locator("#quarantine tbody tr")).to_have_count(1)
            expect(page.locator("#totals")).to_contain_text(f"{synthetic.delivered['user7']:,}")
            page.set_viewport_size({"width": 1400, "height": 1150})  # down to the quarantine
            page.screenshot(path=str(screenshots(tmp_path) / "account-page.png"))
            page.click("#back")
            expect(page.locator("h1")).to_have_text("POP Connector status")

            # The hostile one: its name, error and Message-IDs are text, and nothing ran.
            page.goto(f"{service.base}/account/{urllib.parse.quote(HOSTILE_NAME, safe='')}?token={TOKEN}")
            expect(page.locator("#account-name")).to_have_text(HOSTILE_NAME)
            expect(page.locator("#next-poll-reason")).to_have_text(
                "no longer in the configuration: not polled"
            )
            assert page.locator("img").count() == 0 and page.locator("script").count() == 0

            assert service.get("/account/user7")[0] == 401
            assert service.get("/account/user7?token=not-the-token")[0] == 401
            assert service.get("/account/nobody", token=TOKEN)[0] == 404
    finally:
        page.close()
    assert dialogs == []


def _refuse(dialog: Dialog, seen: list[str]) -> None:
    seen.append(dialog.message)
    dialog.dismiss()
