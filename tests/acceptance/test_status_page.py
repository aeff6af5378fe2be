"""The status page in a real headless Chromium (Debian's package, driven by Playwright) against `run`."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.acceptance.service import RunningService, free_port
from tests.acceptance.test_operations import account_toml
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers

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
            assert TOKEN not in content
    finally:
        page.close()
        dovecot.remove_user(locked_out.name)
