"""``pop-connector authorize DESTINATION [--user ADDRESS] [--no-browser]``: a Gmail user's consent.

For a Gmail destination with ``client_secrets`` (personal Gmail through the Gmail API) and for an IMAP
destination whose ``oauth`` table has ``client_secrets`` (Gmail over IMAP), this runs Google's flow for
desktop apps once: OAuth 2.0 authorization code with PKCE (RFC 7636, S256) and a loopback redirect on
``http://127.0.0.1:<free port>/`` (RFC 8252), ``access_type=offline`` and ``prompt=consent`` so that Google
hands out a refresh token, a random ``state`` checked on return. It learns which address consented (the
Gmail API's ``users.getProfile``; for IMAP, the ``email`` claim of the OpenID token), checks it against
``--user``, and keeps the refresh token in the destination's token directory
(``connector.destinations.gmail_tokens``: one file per address, mode 600, directory 700).

With a browser at hand (a desktop session: ``DISPLAY``/``WAYLAND_DISPLAY``, macOS, Windows) it opens the
consent page and waits for the redirect. Without one (or with ``--no-browser``) it prints the address to
open anywhere and asks for the address the browser ended on: on another machine that ``127.0.0.1`` page
fails to load, but its URL still carries the code and the state.

For a Workspace destination (``service_account_key``) there is no consent to give: the command prints the
Admin console steps of domain-wide delegation (client ID and scopes) and exits 0.

Every failure is a configuration error (exit 2, no traceback); a token endpoint that cannot be reached is a
temporary one (exit 1). No token, code or secret is ever printed or logged: each is registered with
``connector.redaction`` the moment it arrives.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import socket
import sys
import threading
import urllib.parse
import webbrowser
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, TextIO

from connector import redaction
from connector.cli.parser import AUTHORIZE_WAIT
from connector.config import Config, EwsDestination, GmailDestination, ImapDestination
from connector.destinations import gmail_tokens
from connector.destinations.gmail_tokens import GMAIL_SCOPES, DesktopClient, StoredToken, TokenFileError
from connector.errors import ConfigError, OAuthUnavailableError
from connector.oauth import GMAIL_IMAP_SCOPE
from connector.oauth_endpoints import check_token_url

log = logging.getLogger("connector.authorize")

EXIT_OK = 0
DEFAULT_WAIT = AUTHORIZE_WAIT
# The OpenID scopes that make the token endpoint name the consenting address (the IMAP path has no Gmail
# API to ask). Google reports "email" back as its long form.
OPENID_SCOPES = ("openid", "email")
ADMIN_CONSOLE_DELEGATION = "https://admin.google.com/ac/owl/domainwidedelegation"
_MAX_ANSWER = 1024 * 1024
_PAGE = (
    b"<!doctype html><html><head><meta charset='utf-8'><title>POP Connector</title></head><body>"
    b"<p>POP Connector has Google's answer. You can close this tab; the terminal says what happens next.</p>"
    b"</body></html>"
)


# --- what is authorized ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentTarget:
    """One destination's consent: its client, the scopes it needs, where the token goes and how the
    consenting address is learnt (``profile_url``: Gmail's users.getProfile; None: the OpenID token)."""

    destination: str
    client: DesktopClient
    scopes: tuple[str, ...]
    required: tuple[str, ...]
    token_dir: Path
    verify: bool | str
    profile_url: str | None
    timeout: float = 30.0


def consent_target(config: Config, name: str) -> ConsentTarget | GmailDestination:
    """The consent to give for destination ``name``, or the Workspace destination itself (no consent:
    delegation). Raises ``ConfigError`` for any other destination."""
    destination = next((d for d in config.destinations if d.name == name), None)
    if destination is None:
        known = ", ".join(d.name for d in config.destinations) or "none defined"
        raise ConfigError(
            f"no destination named {name!r} in {config.source or 'the configuration'} ({known})"
        )
    if isinstance(destination, GmailDestination):
        if destination.workspace:
            return destination
        assert destination.client_secrets is not None  # validated: one of the two
        return ConsentTarget(
            destination=name,
            client=_client(name, destination.client_secrets.get_secret_value()),
            scopes=GMAIL_SCOPES,
            required=GMAIL_SCOPES,
            token_dir=destination.tokens(),
            verify=_verify(destination),
            profile_url=f"{destination.api_url}/gmail/v1/users/me/profile",
        )
    if (
        isinstance(destination, ImapDestination)
        and destination.oauth is not None
        and destination.oauth.google
    ):
        oauth = destination.oauth
        assert oauth.client_secrets is not None
        return ConsentTarget(
            destination=name,
            client=_client(name, oauth.client_secrets.get_secret_value()),
            scopes=(GMAIL_IMAP_SCOPE, *OPENID_SCOPES),
            required=(GMAIL_IMAP_SCOPE,),
            token_dir=destination.google_tokens(),
            verify=str(oauth.ca_file) if oauth.ca_file else True,
            profile_url=None,
            timeout=oauth.timeout.total_seconds(),
        )
    kind = "ews" if isinstance(destination, EwsDestination) else "imap"
    raise ConfigError(
        f'destination {name!r} (type = "{kind}") takes no consent: authorize is for a destination of '
        'type = "gmail" with client_secrets, or an IMAP destination with auth = "oauth2" and '
        "oauth = { client_secrets = ... } (Gmail over IMAP); see docs/gmail.md"
    )


def _verify(destination: GmailDestination) -> bool | str:
    """requests' ``verify``, as the destination's own requests use it."""
    if not destination.tls_verify:
        return False
    return str(destination.ca_file) if destination.ca_file is not None else True


def _client(destination: str, client_secrets: str) -> DesktopClient:
    try:
        client = gmail_tokens.desktop_client(client_secrets)
    except TokenFileError as exc:
        raise ConfigError(f"destination {destination!r}: {exc}") from None
    for uri in (client.auth_uri, client.token_uri):
        try:
            check_token_url(uri)
        except ValueError as exc:
            raise ConfigError(f"destination {destination!r}: client_secrets: {uri}: {exc}") from None
    return client


# --- the authorization request --------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorizationRequest:
    """What the consent page is asked, and what its answer must carry back."""

    url: str
    redirect_uri: str
    state: str = field(repr=False)
    verifier: str = field(repr=False)


def authorization_request(target: ConsentTarget, redirect_uri: str, user: str | None) -> AuthorizationRequest:
    # RFC 7636 §4.1: 43 to 128 characters of [A-Za-z0-9-._~]; 64 random bytes make 86 of them.
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=")
    state = secrets.token_urlsafe(24)
    query = {
        "client_id": target.client.client_id,
        "redirect_uri": redirect_uri,
        "response_type": "code",
        "scope": " ".join(target.scopes),
        "state": state,
        "code_challenge": challenge.decode("ascii"),
        "code_challenge_method": "S256",
        # A refresh token, and a fresh one each time (without prompt=consent Google gives one only the
        # first time a user consents to a client).
        "access_type": "offline",
        "prompt": "consent",
    }
    if user:
        query["login_hint"] = user
    separator = "&" if "?" in target.client.auth_uri else "?"
    url = f"{target.client.auth_uri}{separator}{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"
    return AuthorizationRequest(url=url, redirect_uri=redirect_uri, state=state, verifier=verifier)


def code_from_redirect(request: AuthorizationRequest, answer: Mapping[str, str]) -> str:
    """The authorization code of the redirect's query, after checking its ``state``."""
    error = answer.get("error")
    if error:
        if error == "access_denied":
            raise ConfigError("the consent was refused on Google's page (access_denied): nothing stored")
        description = answer.get("error_description", "")
        raise ConfigError(
            f"Google's consent page answered {error}{': ' + description if description else ''}"
        )
    state = answer.get("state", "")
    if not hmac.compare_digest(state.encode(), request.state.encode()):
        # Another page's redirect, or a URL from an earlier run: never exchange a code we did not ask for.
        raise ConfigError(
            "the answer's state does not match this request (an address from another attempt?): nothing "
            "stored; run authorize again"
        )
    code = answer.get("code")
    if not code:
        raise ConfigError("the answer carries no authorization code: nothing stored")
    redaction.register(code)
    return code


def parse_pasted(text: str) -> dict[str, str]:
    """The query of the address a person pasted (the whole URL, or only what follows "?")."""
    text = text.strip()
    if not text:
        raise ConfigError("no address was pasted: nothing stored")
    query = urllib.parse.urlsplit(text).query if "://" in text or text.startswith("/") else text
    query = query.removeprefix("?")
    answer = {key: values[0] for key, values in urllib.parse.parse_qs(query).items()}
    if "code" not in answer and "error" not in answer:
        raise ConfigError(
            "that is not the address the browser ended on (it must contain ?state=...&code=...): "
            "nothing stored"
        )
    return answer


# --- the loopback redirect -------------------------------------------------------------------------------


class LoopbackReceiver:
    """An HTTP listener on 127.0.0.1 that takes the first redirect carrying ``code``, ``error`` or
    ``state`` (a browser also asks for /favicon.ico and the like: 404)."""

    def __init__(self, *, idle_timeout: float = 10.0) -> None:
        answers: queue.Queue[dict[str, str]] = queue.Queue()
        self._answers = answers

        class Handler(BaseHTTPRequestHandler):
            # One request at a time: a local program that connects and says nothing must not hold the
            # listener (and so the browser's redirect) for longer than this.
            timeout = idle_timeout

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the request line carries the code

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                query = {key: values[0] for key, values in urllib.parse.parse_qs(parts.query).items()}
                if parts.path != "/" or not {"code", "error", "state"} & query.keys():
                    self.send_error(404)
                    return
                answers.put(query)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(_PAGE)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(_PAGE)

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="authorize-redirect",
            daemon=True,
        )

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def start(self) -> LoopbackReceiver:
        self._thread.start()
        return self

    def wait(self, timeout: float) -> dict[str, str]:
        try:
            return self._answers.get(timeout=timeout)
        except queue.Empty:
            raise ConfigError(
                f"no answer from the browser within {timeout:.0f} seconds: nothing stored; run authorize "
                "again (with --no-browser to paste the address instead)"
            ) from None

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _free_loopback_port() -> int:
    """A port for the redirect address when nothing listens on it (the pasted-address path)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def browser_at_hand() -> bool:
    """A desktop session in which ``webbrowser`` can open a page for the person running this."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


# --- the token endpoint and the address -------------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    scopes: tuple[str, ...]
    id_token: str | None = field(default=None, repr=False)


def exchange_code(target: ConsentTarget, request: AuthorizationRequest, code: str) -> Granted:
    """The authorization code (with the PKCE verifier) for tokens at the client's token endpoint."""
    import requests

    client = target.client
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": request.redirect_uri,
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        "code_verifier": request.verifier,
    }
    try:
        response = requests.post(
            client.token_uri,
            data=form,
            headers={"Accept": "application/json"},
            timeout=target.timeout,
            verify=target.verify,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise OAuthUnavailableError(
            f"cannot reach the token endpoint {client.token_uri}: {_reason(exc)}"
        ) from None
    answer = _json(response)
    # First thing: whatever happens next, none of these reaches a line of output.
    redaction.register(*(_text(answer.get(key)) for key in ("access_token", "refresh_token", "id_token")))
    if response.status_code != 200 or "error" in answer:
        code_name = _text(answer.get("error")) or f"HTTP {response.status_code}"
        description = _text(answer.get("error_description"))
        detail = f"{code_name}: {description}" if description else code_name
        if response.status_code >= 500 or response.status_code == 429:
            raise OAuthUnavailableError(f"the token endpoint {client.token_uri} failed: {detail}")
        raise ConfigError(f"the token endpoint {client.token_uri} refused the authorization code: {detail}")
    access_token, refresh_token = _text(answer.get("access_token")), _text(answer.get("refresh_token"))
    if not access_token:
        raise ConfigError(f"the token endpoint {client.token_uri} answered without an access token")
    if not refresh_token:
        raise ConfigError(
            "Google gave no refresh token: remove the app's access at "
            "https://myaccount.google.com/permissions and run authorize again"
        )
    scope = answer.get("scope")
    granted = tuple(scope.split()) if isinstance(scope, str) else target.scopes
    missing = [s for s in target.required if s not in granted]
    if missing:
        raise ConfigError(
            f"the consent does not cover {', '.join(missing)}: on Google's page, tick every box of the "
            "access asked for, then run authorize again (nothing stored)"
        )
    return Granted(access_token, refresh_token, granted, _text(answer.get("id_token")) or None)


def consenting_address(target: ConsentTarget, granted: Granted) -> str:
    """Who gave the consent: Gmail's ``users.getProfile``, or the OpenID token's ``email`` claim."""
    if target.profile_url is None:
        return _address_in_id_token(granted.id_token)
    import requests

    try:
        response = requests.get(
            target.profile_url,
            headers={"Authorization": f"Bearer {granted.access_token}", "Accept": "application/json"},
            timeout=target.timeout,
            verify=target.verify,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise OAuthUnavailableError(
            f"cannot reach the Gmail API ({target.profile_url}): {_reason(exc)}"
        ) from None
    answer = _json(response)
    address = _text(answer.get("emailAddress"))
    if response.status_code != 200 or not address:
        error = answer.get("error")
        message = _text(error.get("message")) if isinstance(error, Mapping) else _text(error)
        raise ConfigError(
            f"the Gmail API refused users.getProfile (HTTP {response.status_code}): "
            f"{message or 'no emailAddress in the answer'} (is the Gmail API enabled in the Google Cloud "
            "project of this client?)"
        )
    return address


def _address_in_id_token(id_token: str | None) -> str:
    """The ``email`` claim of the OpenID token. Its signature is not checked: the token came straight from
    the token endpoint over the connection we opened (OpenID Connect Core §3.1.3.7)."""
    claims: Any = None
    if id_token and id_token.count(".") == 2:
        payload = id_token.split(".")[1]
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (binascii.Error, ValueError):
            claims = None
    email = claims.get("email") if isinstance(claims, Mapping) else None
    if not isinstance(email, str) or not email.strip():
        raise ConfigError(
            "the token endpoint did not say which address consented (no OpenID token with an email)"
        )
    if isinstance(claims, Mapping) and claims.get("email_verified") is False:
        raise ConfigError(f"Google has not verified {email} for this account: nothing stored")
    return email


def _json(response: Any) -> Mapping[str, Any]:
    try:
        answer = json.loads(response.content[:_MAX_ANSWER])
    except ValueError:
        return {}
    return answer if isinstance(answer, Mapping) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


# --- the command ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, config: Config, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    target = consent_target(config, args.destination)
    if isinstance(target, GmailDestination):
        print_delegation_steps(target, out)
        return EXIT_OK
    try:
        request, answer = _consent(target, args, out)
    except KeyboardInterrupt:
        raise ConfigError("interrupted: nothing stored") from None
    code = code_from_redirect(request, answer)
    granted = exchange_code(target, request, code)
    address = consenting_address(target, granted)
    if args.user and address.casefold() != args.user.strip().casefold():
        raise ConfigError(
            f"the consent was given by {address}, not by {args.user}: nothing stored. Run authorize again "
            f"and choose {args.user} on Google's page (or sign out of {address} there first)"
        )
    path = _store(target, address, granted)
    command = "pop-connector" + (f" --config {args.config}" if args.config else "")
    print(
        f"Consent of {address} for destination {target.destination!r} stored in {path} (mode 600).", file=out
    )
    print(f"Next: {command} check", file=out)
    return EXIT_OK


def _consent(
    target: ConsentTarget, args: argparse.Namespace, out: TextIO
) -> tuple[AuthorizationRequest, dict[str, str]]:
    """Send the person to the consent page; return the request and the query of its redirect."""
    if not args.no_browser and browser_at_hand():
        receiver = LoopbackReceiver().start()
        try:
            request = authorization_request(target, receiver.redirect_uri, args.user)
            print(
                "Opening Google's consent page in your browser. If it does not open, go to:\n\n"
                f"{request.url}\n",
                file=out,
            )
            out.flush()
            if webbrowser.open(request.url):
                return request, receiver.wait(args.timeout)
            print("No browser could be opened here.", file=out)
        finally:
            receiver.close()
    request = authorization_request(target, f"http://127.0.0.1:{_free_loopback_port()}/", args.user)
    print(
        "Open this address in a browser on any machine and give the consent:\n\n"
        f"{request.url}\n\n"
        'The browser then goes to a 127.0.0.1 address that may fail to load ("unable to connect"): that '
        "is expected. Copy the whole address from its address bar and paste it here.",
        file=out,
    )
    print("Address the browser ended on: ", end="", file=out)
    out.flush()
    return request, parse_pasted(sys.stdin.readline())


def _store(target: ConsentTarget, address: str, granted: Granted) -> Path:
    client = target.client
    token = StoredToken(
        address=address,
        client_id=client.client_id,
        client_secret=client.client_secret,
        refresh_token=granted.refresh_token,
        token_uri=client.token_uri,
        scopes=granted.scopes,
    )
    try:
        path = gmail_tokens.token_file(target.token_dir, address)
        gmail_tokens.write_token(path, token)
    except TokenFileError as exc:
        raise ConfigError(f"cannot keep the consent of {address}: {exc}") from None
    log.info("consent of %s for destination %r kept in %s", address, target.destination, path)
    return path


def print_delegation_steps(destination: GmailDestination, out: TextIO) -> None:
    """What a Workspace admin does instead of a consent: domain-wide delegation to the service account."""
    assert destination.service_account_key is not None
    client_id, email = _service_account(destination)
    print(
        f"Destination {destination.name!r} signs in as the service account {email} with domain-wide "
        "delegation: there is no consent to give here. A Google Workspace super admin allows it once:\n\n"
        f"  1. Open the Admin console: {ADMIN_CONSOLE_DELEGATION}\n"
        "     (Security > Access and data control > API controls > Manage domain wide delegation)\n"
        "  2. Add new. Client ID:\n"
        f"       {client_id}\n"
        "     OAuth scopes (comma-delimited):\n"
        f"       {','.join(GMAIL_SCOPES)}\n"
        "  3. Authorize. It can take a few minutes (rarely up to 24 hours) to take effect.\n\n"
        "Then run: pop-connector check",
        file=out,
    )


def _service_account(destination: GmailDestination) -> tuple[str, str]:
    assert destination.service_account_key is not None
    try:
        key = json.loads(destination.service_account_key.get_secret_value())
    except ValueError:
        key = None
    if isinstance(key, Mapping):
        redaction.register(_text(key.get("private_key")) or None)
    client_id = _text(key.get("client_id")) if isinstance(key, Mapping) else ""
    email = _text(key.get("client_email")) if isinstance(key, Mapping) else ""
    if not client_id or not email:
        raise ConfigError(
            f"destination {destination.name!r}: service_account_key is not a service account's JSON key "
            "(client_id and client_email are missing)"
        )
    return client_id, email
