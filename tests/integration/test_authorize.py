"""``pop-connector authorize`` end to end, against the tests' token server (Google's consent page and token
endpoint, with PKCE) and Gmail API server (users.getProfile), both on HTTPS loopback with a test CA.

The "browser" is scripted: a fake ``webbrowser.open`` visits the consent page, which consents at once for
the user signed in there (``tokens.sign_in``) or the ``login_hint``, and follows its 302 to the loopback
address the command listens on. The pasted-address path reads the address the browser ended on from stdin.
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.cli import authorize, main
from connector.config import load_config
from connector.connections import Connections
from connector.destinations.gmail_auth import LOGINS
from connector.destinations.gmail_tokens import GMAIL_SCOPES, read_token, token_file
from tests.acceptance.conftest import ROOT
from tests.servers.gmail import INSERT, GmailServer
from tests.servers.token_server import Client

pytestmark = pytest.mark.integration

ALICE = "alice@example.com"
BOB = "bob@example.com"


@dataclasses.dataclass
class Setup:
    gmail: GmailServer
    client: Client
    config: Path
    tokens: Path

    def run(self, *args: str) -> int:
        return main(["--log-level", "DEBUG", "--config", str(self.config), "authorize", "gmail", *args])

    def secrets(self) -> list[str]:
        """Everything that must never be shown: tokens issued, refresh tokens, codes, the client secret."""
        server = self.gmail.tokens
        with server._lock:
            values = [*server.tokens, *server.refresh_tokens, *server.codes]
        assert self.client.secret is not None
        return [*values, self.client.secret]

    def token_requests(self) -> list[dict[str, str]]:
        return [
            f
            for f in self.gmail.tokens.recorded.token_requests
            if f.get("client_id") == self.client.client_id
        ]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with GmailServer() as gmail:
        gmail.add_user(ALICE)
        gmail.add_user(BOB)
        client = gmail.tokens.add_desktop_client()
        secrets_file = gmail.tokens.write_client_secrets(client, tmp_path / "client_secret.json")
        tokens = tmp_path / "state" / "tokens"
        config = tmp_path / "config.toml"
        config.write_text(
            f"""\
[[destinations]]
name = "gmail"
type = "gmail"
client_secrets = {{ file = "{secrets_file}" }}
api_url = "{gmail.api_url}"
ca_file = "{gmail.ca_file}"
token_dir = "{tokens}"
"""
        )
        yield Setup(gmail, client, config, tokens)


class Browser:
    """The person's browser. ``open`` is what ``webbrowser.open`` becomes: it shows the consent page
    (``edit`` may change the address first, as a person choosing another account would) and goes where
    the page redirects, to the command's loopback listener (``redirect`` may change that address)."""

    def __init__(
        self,
        ca_file: Path,
        *,
        edit: Callable[[str], str] = lambda url: url,
        redirect: Callable[[str], str] = lambda url: url,
        follow: bool = True,
    ) -> None:
        self.ca_file = ca_file
        self.edit = edit
        self.redirect = redirect
        self.follow = follow
        self.opened: list[str] = []
        self.pages: list[int] = []

    def _opener(self) -> urllib.request.OpenerDirector:
        # The standard library, not requests: urllib3's DEBUG lines would put the browser's own requests
        # (the code in the redirect's address) into the output the tests search for secrets.
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context), _NoRedirects()
        )

    def consent(self, url: str) -> str:
        """The consent page, and where it sends the browser back to."""
        try:
            self._opener().open(self.edit(url), timeout=10).close()
        except urllib.error.HTTPError as answer:
            assert answer.code == 302, answer.read()
            return self.redirect(answer.headers["Location"])
        raise AssertionError("the consent page did not redirect")

    def open(self, url: str, *args: Any, **kwargs: Any) -> bool:
        self.opened.append(url)
        location = self.consent(url)
        if self.follow:
            with self._opener().open(location, timeout=10) as page:
                self.pages.append(page.status)
        return True


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def desktop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A desktop session: a browser is at hand."""
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("DISPLAY", ":99")


def use(monkeypatch: pytest.MonkeyPatch, browser: Browser) -> Browser:
    monkeypatch.setattr("webbrowser.open", browser.open)
    return browser


def query_of(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def without_login_hint(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = {k: v for k, v in urllib.parse.parse_qsl(parts.query) if k != "login_hint"}
    return parts._replace(query=urllib.parse.urlencode(query)).geturl()


def assert_nothing_stored(setup: Setup) -> None:
    assert not setup.tokens.exists() or not list(setup.tokens.iterdir())


def assert_no_secret_in(text: str, setup: Setup) -> None:
    for secret in setup.secrets():
        assert secret not in text
        assert urllib.parse.quote(secret, safe="") not in text  # as it travels in a URL or a form


# --- with a browser --------------------------------------------------------------------------------------


def test_the_gmail_destination_signs_in_with_the_consent_authorize_stored(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, desktop: None
) -> None:
    """What "Next: pop-connector check" promises: the destination's own sign-in uses the stored consent."""
    use(monkeypatch, Browser(setup.gmail.ca_file))
    assert setup.run("--user", ALICE) == 0
    with setup.config.open("a") as config:
        config.write(
            '\n[[accounts]]\nname = "alice"\nhost = "pop.example"\nusername = "a"\npassword = "p"\n'
            'destination = "gmail"\n'
        )
    loaded = load_config(setup.config)
    try:
        with Connections().open_destination(loaded.destinations[0], loaded.accounts[0]) as session:
            assert f"Gmail user {ALICE}" in session.check()
    finally:
        LOGINS.clear()  # access tokens of this test's token server mean nothing to the next one
    # authorize's users.getProfile, then the check's: nothing written.
    assert setup.gmail.kinds() == ["profile", "profile", "labels.list"]


def test_consent_through_the_browser_is_stored_with_mode_600(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], desktop: None
) -> None:
    browser = use(monkeypatch, Browser(setup.gmail.ca_file))
    assert setup.run("--user", ALICE) == 0
    out, err = capsys.readouterr()

    # The consent page was asked for a refresh token, with PKCE (S256), our state and the login hint.
    [asked] = setup.gmail.tokens.recorded.authorizations
    assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
    assert (asked["access_type"], asked["prompt"], asked["login_hint"]) == ("offline", "consent", ALICE)
    assert asked["scope"].split() == list(GMAIL_SCOPES)
    assert asked["redirect_uri"].startswith("http://127.0.0.1:") and asked["redirect_uri"].endswith("/")
    assert browser.pages == [200]
    # The code went back with its verifier (the server checked it against the challenge).
    [exchange] = setup.token_requests()
    assert exchange["grant_type"] == "authorization_code"
    assert exchange["redirect_uri"] == asked["redirect_uri"] and exchange["code_verifier"]

    path = token_file(setup.tokens, ALICE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = read_token(path)
    assert stored.address == ALICE
    assert stored.client_id == setup.client.client_id and stored.client_secret == setup.client.secret
    assert stored.token_uri == setup.gmail.tokens.google_token_url
    assert stored.scopes == GMAIL_SCOPES
    assert setup.gmail.tokens.refresh_tokens_of(ALICE) == [stored.refresh_token]

    assert f"stored in {path} (mode 600)" in out
    assert f"pop-connector --config {setup.config} check" in out
    assert_no_secret_in(out + err, setup)


def test_without_user_the_consenting_address_names_the_file(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, desktop: None
) -> None:
    setup.gmail.tokens.sign_in(BOB)
    use(monkeypatch, Browser(setup.gmail.ca_file))
    assert setup.run() == 0
    assert "login_hint" not in setup.gmail.tokens.recorded.authorizations[0]
    assert read_token(token_file(setup.tokens, BOB)).address == BOB


def test_consent_of_another_address_than_user_is_refused(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], desktop: None
) -> None:
    # On Google's page the person picks another account than the one suggested.
    setup.gmail.tokens.sign_in(BOB)
    use(monkeypatch, Browser(setup.gmail.ca_file, edit=without_login_hint))
    assert setup.run("--user", ALICE) == 2
    _out, err = capsys.readouterr()
    assert f"the consent was given by {BOB}, not by {ALICE}: nothing stored" in err
    assert "Traceback" not in err
    assert_nothing_stored(setup)
    assert_no_secret_in(err, setup)


def test_a_redirect_with_another_state_is_refused_before_the_code_is_used(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], desktop: None
) -> None:
    def forged(url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        query = {**query_of(url), "state": "forged-state"}
        return parts._replace(query=urllib.parse.urlencode(query)).geturl()

    use(monkeypatch, Browser(setup.gmail.ca_file, redirect=forged))
    assert setup.run("--user", ALICE) == 2
    assert "state does not match" in capsys.readouterr().err
    assert setup.token_requests() == []  # the code was never exchanged
    assert_nothing_stored(setup)


def test_the_token_endpoint_checks_the_pkce_verifier(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], desktop: None
) -> None:
    honest = authorize.authorization_request

    def wrong_verifier(*args: Any) -> authorize.AuthorizationRequest:
        return dataclasses.replace(honest(*args), verifier="x" * 64)

    monkeypatch.setattr(authorize, "authorization_request", wrong_verifier)
    use(monkeypatch, Browser(setup.gmail.ca_file))
    assert setup.run("--user", ALICE) == 2
    err = capsys.readouterr().err
    assert "refused the authorization code: invalid_grant: Invalid code verifier." in err
    assert "Traceback" not in err
    assert_nothing_stored(setup)


def test_consent_refused_on_the_page(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], desktop: None
) -> None:
    setup.gmail.tokens.sign_in(ALICE, deny=True)
    use(monkeypatch, Browser(setup.gmail.ca_file))
    assert setup.run("--user", ALICE) == 2
    assert "the consent was refused on Google's page (access_denied)" in capsys.readouterr().err
    assert setup.token_requests() == []
    assert_nothing_stored(setup)


def test_boxes_left_unticked_are_named(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], desktop: None
) -> None:
    setup.gmail.tokens.sign_in(ALICE, grant=[INSERT])
    use(monkeypatch, Browser(setup.gmail.ca_file))
    assert setup.run("--user", ALICE) == 2
    err = capsys.readouterr().err
    assert "does not cover https://www.googleapis.com/auth/gmail.labels" in err and "tick every box" in err
    assert_nothing_stored(setup)


def test_no_redirect_within_the_timeout(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], desktop: None
) -> None:
    # The browser shows the page, and the person never comes back.
    use(monkeypatch, Browser(setup.gmail.ca_file, follow=False))
    assert setup.run("--user", ALICE, "--timeout", "0.2") == 2
    assert "no answer from the browser within 0 seconds" in capsys.readouterr().err
    assert_nothing_stored(setup)


# --- without a browser: the address pasted back -----------------------------------------------------------


class PastedAddress:
    """stdin: the person opens the printed address elsewhere, consents, and pastes the address the
    browser ended on (a 127.0.0.1 page that did not load: nothing listens there)."""

    def __init__(self, browser: Browser, capsys: pytest.CaptureFixture[str]) -> None:
        self.browser = browser
        self.capsys = capsys
        self.printed = ""
        self.pasted = ""

    def readline(self) -> str:
        self.printed = self.capsys.readouterr().out
        # The last address printed: the one this prompt is about.
        url = [line for line in self.printed.splitlines() if line.startswith("https://")][-1]
        self.pasted = self.browser.consent(url)
        return self.pasted + "\n"


def test_no_browser_reads_the_address_the_browser_ended_on(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("webbrowser.open", lambda *a, **k: pytest.fail("no browser is to be opened"))
    stdin = PastedAddress(Browser(setup.gmail.ca_file), capsys)
    monkeypatch.setattr("sys.stdin", stdin)
    assert setup.run("--user", ALICE, "--no-browser") == 0
    assert "Copy the whole address" in stdin.printed
    assert read_token(token_file(setup.tokens, ALICE)).address == ALICE
    out, err = capsys.readouterr()
    assert_no_secret_in(stdin.printed + out + err, setup)


def test_no_display_means_no_browser(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("webbrowser.open", lambda *a, **k: pytest.fail("no browser is to be opened"))
    monkeypatch.setattr("sys.stdin", PastedAddress(Browser(setup.gmail.ca_file), capsys))
    assert setup.run("--user", ALICE) == 0
    assert token_file(setup.tokens, ALICE).is_file()


def test_a_browser_that_cannot_be_opened_falls_back_to_pasting(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], desktop: None
) -> None:
    monkeypatch.setattr("webbrowser.open", lambda *a, **k: False)
    stdin = PastedAddress(Browser(setup.gmail.ca_file), capsys)
    monkeypatch.setattr("sys.stdin", stdin)
    assert setup.run("--user", ALICE) == 0
    assert "No browser could be opened here." in stdin.printed
    assert token_file(setup.tokens, ALICE).is_file()


def test_a_pasted_address_of_an_earlier_attempt_is_refused(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = PastedAddress(Browser(setup.gmail.ca_file), capsys)
    monkeypatch.setattr("sys.stdin", first)
    assert setup.run("--user", ALICE, "--no-browser") == 0
    exchanges = len(setup.token_requests())
    monkeypatch.setattr("sys.stdin", _Lines(first.pasted))
    assert setup.run("--user", ALICE, "--no-browser") == 2
    assert "state does not match" in capsys.readouterr().err
    assert len(setup.token_requests()) == exchanges


class _Lines:
    def __init__(self, *lines: str) -> None:
        self._lines = list(lines)

    def readline(self) -> str:
        return self._lines.pop(0) + "\n" if self._lines else ""


def test_the_command_itself_without_a_browser(setup: Setup, tmp_path: Path) -> None:
    """``pop-connector authorize --no-browser`` as a person runs it: the address read from its output, the
    consent given elsewhere, the address the browser ended on typed back; no token in any output."""
    stderr = tmp_path / "stderr"
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    command = ["--log-level", "DEBUG", "--config", str(setup.config), "authorize", "gmail"]
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "connector", *command, "--user", ALICE, "--no-browser"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert process.stdout is not None and process.stdin is not None
        timer = threading.Timer(60, process.kill)
        timer.start()
        try:
            printed = []
            while not (line := process.stdout.readline()).startswith("https://"):
                assert line, "the command ended without printing the address to open"
                printed.append(line)
            process.stdin.write(Browser(setup.gmail.ca_file).consent(line.strip()) + "\n")
            process.stdin.flush()
            rest, _ = process.communicate(timeout=60)
        finally:
            timer.cancel()
    output = "".join(printed) + line + rest + stderr.read_text()
    assert process.returncode == 0, output
    assert "stored in" in rest and "check" in rest
    stored = read_token(token_file(setup.tokens, ALICE))
    assert stored.refresh_token and stored.refresh_token not in output
    assert_no_secret_in(output, setup)


# --- Workspace: no consent --------------------------------------------------------------------------------


def test_a_workspace_destination_gets_the_admin_console_steps(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account = setup.gmail.tokens.add_service_account(scopes=GMAIL_SCOPES)
    key = account.write_key(tmp_path / "key.json")
    config = tmp_path / "workspace.toml"
    config.write_text(
        f'[[destinations]]\nname = "workspace"\ntype = "gmail"\nservice_account_key = {{ file = "{key}" }}\n'
    )
    assert main(["--config", str(config), "authorize", "workspace"]) == 0
    out, err = capsys.readouterr()
    assert account.client_id in out and account.client_email in out
    assert ",".join(GMAIL_SCOPES) in out
    private_key = json.loads(key.read_text())["private_key"]
    for line in private_key.splitlines()[1:-1]:
        assert line not in out + err
