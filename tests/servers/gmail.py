"""A Gmail API test server (HTTPS on 127.0.0.1), answering as ``gmail.googleapis.com`` documents it.

No Gmail can run here, so this speaks the part of the Gmail API v1 that the Gmail destination and the
``authorize`` command use, closely enough for a real client:

* ``users.messages.import`` at the upload URI (``uploadType`` ``media``, ``multipart`` and ``resumable``,
  the last with its session URL, chunked PUTs, ``Content-Range`` and ``308 Resume Incomplete``) and at the
  metadata URI (a JSON ``Message`` with ``raw``), with ``internalDateSource``, ``neverMarkSpam``,
  ``processForCalendar`` and ``deleted``;
* ``users.messages.list`` (``q`` with ``rfc822msgid:``, ``label:``, ``in:``, ``is:`` and words;
  ``labelIds``, ``includeSpamTrash``, ``maxResults``, ``pageToken``) and ``users.messages.get``
  (``format`` raw, metadata with ``metadataHeaders``, minimal, full);
* ``users.labels`` list, get and create (409 on a name that exists, as Gmail answers), system labels
  included; ``users.getProfile``.

Every request carries a bearer token that the project's token server (tests/servers/token_server.py)
issued; the token's user is ``me``, and its scopes must allow the call (Gmail's scope lists per method,
including the gmail.metadata restrictions). Errors use Google's JSON error format.

Like Gmail, it keeps its own copy of each message, not the bytes as sent: ``Import.data`` records the exact
bytes received, while ``messages.get`` serves the stored copy, which has a ``Received:`` line and an
``X-Gm-Message-State:`` header Gmail adds and CRLF line ends. Tests queue faults per kind of request
(429 ``rateLimitExceeded`` with ``Retry-After``, 403 ``userRateLimitExceeded``, 5xx, a lost response after
the work was done, a connection dropped before), set a size limit (413 as Google's upload front end
answers), a spam classifier, and an optional per-user quota in Gmail's units.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import functools
import itertools
import json
import re
import secrets
import shlex
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.servers.dovecot import make_test_ca
from tests.servers.token_server import Token, TokenServer

GOOGLE = "https://www.googleapis.com/auth/"
FULL_ACCESS = "https://mail.google.com/"
MODIFY = GOOGLE + "gmail.modify"
INSERT = GOOGLE + "gmail.insert"
LABELS = GOOGLE + "gmail.labels"
READONLY = GOOGLE + "gmail.readonly"
METADATA = GOOGLE + "gmail.metadata"
COMPOSE = GOOGLE + "gmail.compose"

# The scopes each method accepts, from the method's "Authorization scopes" in Google's reference. The PUTs
# of a resumable upload ("upload") carry no token: the session URL is the authorization.
SCOPES_FOR: dict[str, frozenset[str]] = {
    "import": frozenset({FULL_ACCESS, MODIFY, INSERT}),
    "list": frozenset({FULL_ACCESS, MODIFY, READONLY, METADATA}),
    "get": frozenset({FULL_ACCESS, MODIFY, READONLY, METADATA}),
    "labels.list": frozenset({FULL_ACCESS, MODIFY, READONLY, LABELS, METADATA}),
    "labels.get": frozenset({FULL_ACCESS, MODIFY, READONLY, LABELS, METADATA}),
    "labels.create": frozenset({FULL_ACCESS, MODIFY, LABELS}),
    "profile": frozenset({FULL_ACCESS, MODIFY, COMPOSE, READONLY, METADATA}),
}
# Gmail's quota units per method (the per-user limit is 250 units a second).
QUOTA_COST = {
    "import": 25,
    "list": 5,
    "get": 5,
    "labels.list": 1,
    "labels.get": 1,
    "labels.create": 5,
    "profile": 1,
}
SYSTEM_LABELS = (
    "INBOX",
    "SPAM",
    "TRASH",
    "UNREAD",
    "STARRED",
    "IMPORTANT",
    "SENT",
    "DRAFT",
    "CHAT",
    "CATEGORY_PERSONAL",
    "CATEGORY_SOCIAL",
    "CATEGORY_PROMOTIONS",
    "CATEGORY_UPDATES",
    "CATEGORY_FORUMS",
)
# Labels Gmail shows in the label list and message list (the others are hidden system labels).
_SHOWN = {"INBOX", "SENT", "DRAFT", "SPAM", "TRASH", "STARRED", "IMPORTANT", "UNREAD"}
MAX_MESSAGE_SIZE = 150 * 1024 * 1024
# Resumable uploads: every chunk but the last must be a multiple of this; a server keeps whole units only.
UPLOAD_GRANULARITY = 256 * 1024
UPLOAD_PATH = re.compile(r"^/upload/gmail/v1/users/([^/]+)/messages/import$")
ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"^/gmail/v1/users/([^/]+)/messages/import$"), "import"),
    ("GET", re.compile(r"^/gmail/v1/users/([^/]+)/messages$"), "list"),
    ("GET", re.compile(r"^/gmail/v1/users/([^/]+)/messages/([^/]+)$"), "get"),
    ("GET", re.compile(r"^/gmail/v1/users/([^/]+)/labels$"), "labels.list"),
    ("POST", re.compile(r"^/gmail/v1/users/([^/]+)/labels$"), "labels.create"),
    ("GET", re.compile(r"^/gmail/v1/users/([^/]+)/labels/([^/]+)$"), "labels.get"),
    ("GET", re.compile(r"^/gmail/v1/users/([^/]+)/profile$"), "profile"),
)
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class GoogleError(Exception):
    """An error answered in Google's JSON error format."""

    def __init__(
        self,
        status: int,
        message: str,
        reason: str,
        *,
        domain: str = "global",
        headers: dict[str, str] | None = None,
        status_name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.domain = domain
        self.headers = headers or {}
        self.status_name = status_name or _STATUS_NAMES.get(status, "UNKNOWN")

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "domain": self.domain, "reason": self.reason}
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "errors": [error],
                "status": self.status_name,
            }
        }


def _invalid(message: str) -> GoogleError:
    return GoogleError(400, message, "invalidArgument")


@dataclass
class Label:
    id: str
    name: str
    type: str  # system | user
    message_list_visibility: str | None = None
    label_list_visibility: str | None = None

    def resource(self) -> dict[str, Any]:
        resource: dict[str, Any] = {"id": self.id, "name": self.name}
        if self.message_list_visibility is not None:
            resource["messageListVisibility"] = self.message_list_visibility
        if self.label_list_visibility is not None:
            resource["labelListVisibility"] = self.label_list_visibility
        resource["type"] = self.type
        return resource


@dataclass
class StoredMessage:
    """A message in a mailbox: ``received`` is the bytes as imported, ``raw`` Gmail's own copy (what
    ``messages.get`` serves), ``label_ids`` its labels now (spam classification applied)."""

    id: str
    thread_id: str
    user: str
    received: bytes
    raw: bytes
    label_ids: list[str]
    internal_date: int  # milliseconds since the epoch, as Gmail keeps it
    history_id: int
    deleted: bool = False

    def headers(self) -> list[tuple[str, str]]:
        """(name, value) in message order, values unfolded and as UTF-8 text (bytes that are not UTF-8
        come out as U+FFFD), as the API's JSON carries them."""
        parsed = BytesHeaderParser(policy=compat32).parsebytes(self.raw)
        return [(name, _text(_unfold(str(value)))) for name, value in parsed.items()]

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers() if key.lower() == name.lower()), None)

    @property
    def message_id(self) -> str | None:
        value = self.header("Message-ID")
        return None if value is None else value.strip()

    @property
    def unread(self) -> bool:
        return "UNREAD" in self.label_ids

    def snippet(self) -> str:
        _, _, body = self.raw.partition(b"\r\n\r\n")
        return " ".join(body.decode("latin-1").split())[:200]

    def resource(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "threadId": self.thread_id,
            "labelIds": list(self.label_ids),
            "snippet": self.snippet(),
            "sizeEstimate": len(self.raw),
            "historyId": str(self.history_id),
            "internalDate": str(self.internal_date),
        }


@dataclass
class Import:
    """One import as it reached the server: ``data`` the message bytes exactly as received, ``label_ids``
    as asked for, ``params`` the query parameters, ``upload_type`` media | multipart | resumable | json."""

    user: str
    data: bytes
    label_ids: list[str]
    params: dict[str, str]
    upload_type: str
    message: StoredMessage


@dataclass
class Request:
    method: str
    path: str
    kind: str
    user: str | None
    status: int = 0


@dataclass
class Fault:
    """One queued failure for the next request of ``kind`` ("*": any). ``status`` 0 means no answer:
    ``drop`` closes the connection before the work (``after`` False) or after it (the response is lost)."""

    kind: str
    status: int = 0
    reason: str = ""
    message: str = ""
    retry_after: int | None = None
    after: bool = False


@dataclass
class UploadSession:
    id: str
    user: str
    params: dict[str, str]
    label_ids: list[str]
    content_type: str
    total: int | None
    data: bytearray = field(default_factory=bytearray)
    done: StoredMessage | None = None
    expired: bool = False


@dataclass
class Mailbox:
    address: str
    labels: dict[str, Label]
    messages: list[StoredMessage] = field(default_factory=list)

    def label_named(self, name: str) -> Label | None:
        return next((label for label in self.labels.values() if label.name.lower() == name.lower()), None)

    def visible(self) -> list[StoredMessage]:
        return [message for message in self.messages if not message.deleted]


@dataclass(frozen=True)
class _Caller:
    """Whom a request acts for, after the token checks: the mailbox, and whether the token reads only
    through gmail.metadata (no ``q``, no raw or full format)."""

    user: str
    metadata_only: bool


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


class GmailServer:
    """``with GmailServer() as gmail:`` starts it (and a TokenServer of its own, ``gmail.tokens``, unless one
    is given) on 127.0.0.1 with a throwaway CA (``gmail.ca_file``, which verifies both). ``api_url`` is
    what the destination's ``api_url`` takes."""

    def __init__(
        self,
        tokens: TokenServer | None = None,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        quota: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        latency: float = 0.0,
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="gmail-test-")
        self.ca_file, cert, key = make_test_ca(Path(self._dir.name))
        self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls_context.load_cert_chain(str(cert), str(key))
        self._own_tokens = tokens is None
        self.tokens = tokens if tokens is not None else TokenServer(tls_context=self.tls_context)
        self.max_message_size = max_message_size
        self.mailboxes: dict[str, Mailbox] = {}
        self.imports: list[Import] = []
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.sessions: dict[str, UploadSession] = {}
        # Gmail's classifier: a message it returns True for goes to SPAM unless neverMarkSpam.
        self.spam: Callable[[bytes], bool] = lambda data: False
        # Per-user quota units a second (None: unlimited); Gmail's is 250. ``clock`` times the second.
        self.quota = quota
        self._clock = clock
        # Seconds each answer waits, as a round trip to Google would (for the benchmark, not for tests).
        self.latency = latency
        self._spent: dict[str, list[tuple[float, int]]] = {}
        self._ids = itertools.count(0x18F3A2B4C5D00000 + secrets.randbelow(1 << 40))
        self._label_ids = itertools.count(1)
        self._history = itertools.count(1000)
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.socket = self.tls_context.wrap_socket(self._httpd.socket, server_side=True)
        # serve_forever notices shutdown() only between polls: its default of 0.5 s made every stop (one per
        # test) wait that long.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="gmail-test", daemon=True
        )

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> GmailServer:
        if self._own_tokens:
            self.tokens.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._own_tokens:
            self.tokens.stop()
        self._dir.cleanup()

    def __enter__(self) -> GmailServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def api_url(self) -> str:
        """Stands for ``https://gmail.googleapis.com``."""
        return self.base_url

    # --- set-up --------------------------------------------------------------------------------------------

    def add_user(self, address: str) -> Mailbox:
        """A Gmail mailbox, with Gmail's system labels."""
        with self._lock:
            key = address.lower()
            if key not in self.mailboxes:
                labels = {
                    name: Label(
                        name,
                        name,
                        "system",
                        "show"
                        if name in ("INBOX", "SENT", "DRAFT")
                        else ("hide" if name in _SHOWN else None),
                        "labelShow" if name in _SHOWN else None,
                    )
                    for name in SYSTEM_LABELS
                }
                self.mailboxes[key] = Mailbox(address, labels)
            return self.mailboxes[key]

    def add_label(self, user: str, name: str) -> Label:
        with self._lock:
            return self._create_label(self.mailbox(user), {"name": name})

    def token(self, user: str, *scopes: str) -> str:
        """A token for ``user`` from the token server (default scopes: insert, labels, readonly)."""
        return self.tokens.issue_token(user, scopes or (INSERT, LABELS, READONLY))

    # --- faults --------------------------------------------------------------------------------------------

    def fail(
        self,
        kind: str = "*",
        *,
        status: int = 500,
        reason: str = "backendError",
        message: str = "Backend Error",
        retry_after: int | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests of ``kind`` (import, upload, list, get, labels.list,
        labels.get, labels.create, profile, or "*") with this error instead of doing the work."""
        with self._lock:
            self.faults.extend(Fault(kind, status, reason, message, retry_after) for _ in range(times))

    def rate_limit(self, kind: str = "import", *, retry_after: int | None = 1, times: int = 1) -> None:
        """429 ``rateLimitExceeded``, as Gmail answers a user over the per-user rate."""
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=retry_after or 1)
        message = f"User-rate limit exceeded.  Retry after {until.strftime('%Y-%m-%dT%H:%M:%S.000Z')}"
        self.fail(
            kind,
            status=429,
            reason="rateLimitExceeded",
            message=message,
            retry_after=retry_after,
            times=times,
        )

    def user_rate_limit(
        self, kind: str = "import", *, retry_after: int | None = None, times: int = 1
    ) -> None:
        """403 ``userRateLimitExceeded`` (domain usageLimits)."""
        self.fail(
            kind,
            status=403,
            reason="userRateLimitExceeded",
            message="User Rate Limit Exceeded",
            retry_after=retry_after,
            times=times,
        )

    def server_error(self, kind: str = "import", *, status: int = 500, times: int = 1) -> None:
        """500 ``backendError``, or 502/503/504."""
        message = "Backend Error" if status == 500 else "The service is currently unavailable."
        self.fail(kind, status=status, reason="backendError", message=message, times=times)

    def lose_response(self, kind: str = "import", *, times: int = 1) -> None:
        """Do the work (store the message), then close the connection without answering."""
        with self._lock:
            self.faults.extend(Fault(kind, after=True) for _ in range(times))

    def drop_request(self, kind: str = "import", *, times: int = 1) -> None:
        """Close the connection without doing anything."""
        with self._lock:
            self.faults.extend(Fault(kind) for _ in range(times))

    def expire_upload_sessions(self) -> None:
        """Every resumable upload session so far answers 404 from now on (they last a week at Google)."""
        with self._lock:
            for session in self.sessions.values():
                session.expired = True

    # --- what tests assert ---------------------------------------------------------------------------------

    def mailbox(self, user: str) -> Mailbox:
        with self._lock:
            return self.mailboxes[user.lower()]

    def messages(self, user: str) -> list[StoredMessage]:
        """The messages in ``user``'s mailbox (the permanently deleted ones too), oldest import first."""
        with self._lock:
            return list(self.mailbox(user).messages)

    def imports_for(self, user: str) -> list[Import]:
        with self._lock:
            return [record for record in self.imports if record.user.lower() == user.lower()]

    def label_names(self, user: str, message: StoredMessage) -> list[str]:
        labels = self.mailbox(user).labels
        return [labels[label].name for label in message.label_ids if label in labels]

    def kinds(self) -> list[str]:
        with self._lock:
            return [request.kind for request in self.requests]

    # --- dispatch ------------------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Message, body: bytes) -> _Answer:
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        params = {key: values[-1] for key, values in query.items()}
        request = Request(method, parts.path, "unknown", None)
        with self._lock:
            self.requests.append(request)
        try:
            answer = self._route(request, parts.path, query, params, headers, body)
        except GoogleError as error:
            answer = _json_answer(error.status, error.body(), error.headers)
        request.status = answer.status
        return answer

    def _route(
        self,
        request: Request,
        path: str,
        query: dict[str, list[str]],
        params: dict[str, str],
        headers: Message,
        body: bytes,
    ) -> _Answer:
        upload = UPLOAD_PATH.match(path)
        if upload is not None and "upload_id" in params and request.method in ("PUT", "POST"):
            request.kind = "upload"
            with self._lock:
                session = self.sessions.get(params["upload_id"])
            if session is None or session.expired:
                raise GoogleError(404, "Not Found", "notFound")
            request.user = session.user
            return self._faulted("upload", lambda: self._upload_chunk(session, headers, body))
        if upload is not None and request.method == "POST":
            request.kind = "import"
            caller = self._authorize(request, urllib.parse.unquote(upload.group(1)), headers)
            return self._faulted("import", lambda: self._upload_import(caller.user, params, headers, body))
        for method, pattern, kind in ROUTES:
            match = pattern.match(path)
            if match is None or method != request.method:
                continue
            request.kind = kind
            caller = self._authorize(request, urllib.parse.unquote(match.group(1)), headers)
            rest = [urllib.parse.unquote(group) for group in match.groups()[1:]]
            operation = functools.partial(self._operation, kind, caller, rest, query, params, body)
            return self._faulted(kind, operation)
        raise GoogleError(404, f"Method not found: {request.method} {path}", "notFound")

    def _faulted(self, kind: str, work: Callable[[], _Answer]) -> _Answer:
        fault = self._take_fault(kind)
        if fault is None:
            return work()
        if fault.status:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            domain = (
                "usageLimits"
                if fault.reason.endswith("RateLimitExceeded") or fault.status == 429
                else "global"
            )
            raise GoogleError(fault.status, fault.message, fault.reason, domain=domain, headers=headers)
        if fault.after:
            with contextlib.suppress(GoogleError):
                work()
        return _Answer(0, drop=True)

    def _take_fault(self, kind: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self.faults):
                if fault.kind in (kind, "*"):
                    return self.faults.pop(index)
        return None

    def _authorize(self, request: Request, user_id: str, headers: Message) -> _Caller:
        """The mailbox this request acts on, after Gmail's checks of the bearer token, its scopes and the
        userId; raises the error Gmail answers."""
        authorization = headers.get("Authorization") or ""
        challenge = {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'}
        if not authorization.lower().startswith("bearer "):
            raise GoogleError(
                401,
                "Request is missing required authentication credential. Expected OAuth 2 access token, login "
                "cookie or other valid authentication credential.",
                "required",
                headers=challenge,
            )
        token = self.tokens.lookup(authorization[7:].strip())
        if token is None or not token.active(time.time()) or token.user is None:
            raise GoogleError(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
                "or other valid authentication credential.",
                "authError",
                headers={
                    **challenge,
                    "WWW-Authenticate": challenge["WWW-Authenticate"] + ', error="invalid_token"',
                },
            )
        allowed = SCOPES_FOR[request.kind]
        if not allowed & token.scopes:
            raise GoogleError(
                403,
                "Request had insufficient authentication scopes.",
                "insufficientPermissions",
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", '
                    f'error="insufficient_scope", scope="{" ".join(sorted(allowed))}"'
                },
            )
        if user_id != "me" and user_id.lower() != token.user.lower():
            raise GoogleError(403, f"Delegation denied for {token.user}", "forbidden")
        request.user = token.user
        with self._lock:
            mailbox = self.mailboxes.get(token.user.lower())
        if mailbox is None:
            # A service account's own identity, or a user without Gmail.
            raise GoogleError(
                400, "Precondition check failed.", "failedPrecondition", status_name="FAILED_PRECONDITION"
            )
        self._spend(mailbox.address, request.kind)
        return _Caller(mailbox.address, _metadata_only(token))

    def _spend(self, user: str, kind: str) -> None:
        if self.quota is None:
            return
        now = self._clock()
        with self._lock:
            spent = [(at, units) for at, units in self._spent.get(user, []) if now - at < 1.0]
            cost = QUOTA_COST.get(kind, 1)
            if sum(units for _, units in spent) + cost > self.quota:
                self._spent[user] = spent
                until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)
                raise GoogleError(
                    429,
                    f"User-rate limit exceeded.  Retry after {until.strftime('%Y-%m-%dT%H:%M:%S.000Z')}",
                    "rateLimitExceeded",
                    domain="usageLimits",
                    headers={"Retry-After": "1"},
                )
            self._spent[user] = [*spent, (now, cost)]

    def _operation(
        self,
        kind: str,
        caller: _Caller,
        rest: list[str],
        query: dict[str, list[str]],
        params: dict[str, str],
        body: bytes,
    ) -> _Answer:
        with self._lock:
            mailbox = self.mailbox(caller.user)
            if kind == "import":
                return self._json_import(caller.user, params, body)
            if kind == "list":
                return _json_answer(200, self._list(mailbox, query, params, caller.metadata_only))
            if kind == "get":
                return _json_answer(200, self._get(mailbox, rest[0], query, params, caller.metadata_only))
            if kind == "labels.list":
                return _json_answer(200, {"labels": [label.resource() for label in mailbox.labels.values()]})
            if kind == "labels.get":
                return _json_answer(200, self._label_resource(mailbox, rest[0]))
            if kind == "labels.create":
                return _json_answer(200, self._create_label(mailbox, _json_body(body)).resource())
            if kind == "profile":
                return _json_answer(
                    200,
                    {
                        "emailAddress": mailbox.address,
                        "messagesTotal": len(mailbox.visible()),
                        "threadsTotal": len({m.thread_id for m in mailbox.visible()}),
                        "historyId": str(max((m.history_id for m in mailbox.messages), default=1)),
                    },
                )
        raise GoogleError(404, "Not Found", "notFound")

    # --- import --------------------------------------------------------------------------------------------

    def _upload_import(self, user: str, params: dict[str, str], headers: Message, body: bytes) -> _Answer:
        upload_type = params.get("uploadType")
        if upload_type == "media":
            _check_media_type(headers.get("Content-Type", ""))
            return self._imported(self._import(user, body, [], params, "media"))
        if upload_type == "multipart":
            metadata, data = _multipart_related(headers.get("Content-Type", ""), body)
            if "raw" in metadata:
                raise _invalid(
                    "'raw' RFC822 payload message string or uploading message via /upload/* URL required"
                )
            return self._imported(self._import(user, data, _label_ids(metadata), params, "multipart"))
        if upload_type == "resumable":
            return self._start_session(user, params, headers, body)
        raise _invalid(f"Invalid upload type: {upload_type!r}. Valid values: media, multipart, resumable")

    def _json_import(self, user: str, params: dict[str, str], body: bytes) -> _Answer:
        metadata = _json_body(body)
        raw = metadata.get("raw")
        if not isinstance(raw, str):
            raise _invalid(
                "'raw' RFC822 payload message string or uploading message via /upload/* URL required"
            )
        try:
            data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except ValueError:
            raise _invalid("Invalid value for ByteString: raw") from None
        return self._imported(self._import(user, data, _label_ids(metadata), params, "json"))

    def _imported(self, record: Import) -> _Answer:
        message = record.message
        return _json_answer(
            200, {"id": message.id, "threadId": message.thread_id, "labelIds": list(message.label_ids)}
        )

    def _import(
        self, user: str, data: bytes, label_ids: list[str], params: dict[str, str], upload_type: str
    ) -> Import:
        if len(data) > self.max_message_size:
            raise _too_large(self.max_message_size)
        if not data.strip():
            raise _invalid(
                "'raw' RFC822 payload message string or uploading message via /upload/* URL required"
            )
        never_spam = _bool_param(params, "neverMarkSpam")
        deleted = _bool_param(params, "deleted")
        _bool_param(params, "processForCalendar")
        date_source = params.get("internalDateSource", "dateHeader")
        if date_source not in ("dateHeader", "receivedTime"):
            raise _invalid(f"Invalid value at 'internal_date_source' (TYPE_ENUM), \"{date_source}\"")
        with self._lock:
            mailbox = self.mailbox(user)
            for label in label_ids:
                if label not in mailbox.labels:
                    raise _invalid(f"Invalid label: {label}")
            labels = list(dict.fromkeys(label_ids))
            if self.spam(data) and not never_spam:
                labels = [label for label in labels if label != "INBOX"] + ["SPAM"]
            now = time.time()
            received = _received_date(data) if date_source == "dateHeader" else None
            message_id = f"{next(self._ids):x}"
            message = StoredMessage(
                id=message_id,
                thread_id=self._thread_of(mailbox, data) or message_id,
                user=mailbox.address,
                received=bytes(data),
                raw=_gmail_copy(data, now),
                label_ids=labels,
                internal_date=int((received if received is not None else now) * 1000),
                history_id=next(self._history),
                deleted=deleted,
            )
            mailbox.messages.append(message)
            record = Import(mailbox.address, bytes(data), list(label_ids), dict(params), upload_type, message)
            self.imports.append(record)
            return record

    def _thread_of(self, mailbox: Mailbox, data: bytes) -> str | None:
        parsed = BytesHeaderParser(policy=compat32).parsebytes(data)
        references = " ".join(str(parsed.get(name, "")) for name in ("References", "In-Reply-To")).split()
        for message in mailbox.messages:
            if message.message_id is not None and message.message_id in references:
                return message.thread_id
        return None

    # --- resumable uploads ---------------------------------------------------------------------------------

    def _start_session(self, user: str, params: dict[str, str], headers: Message, body: bytes) -> _Answer:
        content_type = headers.get("X-Upload-Content-Type") or "message/rfc822"
        _check_media_type(content_type)
        length = headers.get("X-Upload-Content-Length")
        total = int(length) if length is not None and length.isdigit() else None
        if total is not None and total > self.max_message_size:
            raise _too_large(self.max_message_size)
        metadata = _json_body(body) if body.strip() else {}
        session = UploadSession(
            f"ADPycd{secrets.token_urlsafe(48)}",
            user,
            dict(params),
            _label_ids(metadata),
            content_type,
            total,
        )
        with self._lock:
            self.sessions[session.id] = session
        query = urllib.parse.urlencode({**params, "upload_id": session.id})
        location = f"{self.base_url}/upload/gmail/v1/users/{urllib.parse.quote(user)}/messages/import?{query}"
        return _Answer(200, b"", {"Location": location, "X-GUploader-UploadID": session.id})

    def _upload_chunk(self, session: UploadSession, headers: Message, body: bytes) -> _Answer:
        """One PUT to a session URL: a chunk (``Content-Range: bytes a-b/total``, total may be ``*``), the
        whole content (no Content-Range), or a status query (``bytes */total``, empty body)."""
        with self._lock:
            if session.done is not None:
                # A finished upload answers every later request with its result, and imports nothing again.
                return self._imported_message(session.done)
            content_range = headers.get("Content-Range")
            first: int = 0
            total: int | None = len(body)
            if content_range is not None:
                start, last, total_text = _content_range(content_range)
                total = None if total_text == "*" else int(total_text)
                if start is None or last is None:  # a status query
                    if body:
                        raise _invalid("Failed to parse Content-Range header.")
                    return self._resume_incomplete(session)
                if last - start + 1 != len(body):
                    raise _invalid("Failed to parse Content-Range header.")
                first = start
            if total is not None:
                if session.total is not None and total != session.total:
                    raise _invalid("Invalid request. The total size of the upload changed.")
                session.total = total
            if session.total is not None and session.total > self.max_message_size:
                raise _too_large(self.max_message_size)
            have = len(session.data)
            if first > have:
                raise _invalid(
                    f"Invalid request.  According to the Content-Range header, the upload offset is {first} "
                    f"byte(s), which exceeds already uploaded size of {have} byte(s)."
                )
            session.data += body[have - first :]  # bytes it already has are not taken twice
            if session.total is not None and len(session.data) > session.total:
                raise _invalid("Invalid request. The upload is larger than its declared size.")
            if session.total is not None and len(session.data) == session.total:
                record = self._import(
                    session.user, bytes(session.data), session.label_ids, session.params, "resumable"
                )
                session.done = record.message
                return self._imported_message(record.message)
            # Only whole units of 256 KiB are kept from a chunk that does not end the upload.
            del session.data[len(session.data) - len(session.data) % UPLOAD_GRANULARITY :]
            return self._resume_incomplete(session)

    def _resume_incomplete(self, session: UploadSession) -> _Answer:
        headers = {"X-GUploader-UploadID": session.id}
        if session.data:
            headers["Range"] = f"bytes=0-{len(session.data) - 1}"
        return _Answer(308, b"", headers)

    def _imported_message(self, message: StoredMessage) -> _Answer:
        return _json_answer(
            200, {"id": message.id, "threadId": message.thread_id, "labelIds": list(message.label_ids)}
        )

    # --- list and get --------------------------------------------------------------------------------------

    def _list(
        self, mailbox: Mailbox, query: dict[str, list[str]], params: dict[str, str], metadata_only: bool
    ) -> dict[str, Any]:
        q = params.get("q", "")
        if q and metadata_only:
            raise GoogleError(403, "Metadata scope does not support 'q' parameter", "forbidden")
        try:
            terms = shlex.split(q)
        except ValueError:
            raise _invalid("Invalid query") from None
        include_spam_trash = _bool_param(params, "includeSpamTrash") or any(
            term.lower() in ("in:spam", "in:trash", "in:anywhere", "label:spam", "label:trash")
            for term in terms
        )
        wanted = query.get("labelIds", [])
        found = [
            message
            for message in mailbox.visible()
            if all(label in message.label_ids for label in wanted)
            and (include_spam_trash or not {"SPAM", "TRASH"} & set(message.label_ids))
            and all(_matches(mailbox, message, term) for term in terms)
        ]
        found.sort(key=lambda message: (message.internal_date, message.id), reverse=True)
        max_results = _int_param(params, "maxResults", 100)
        if not 1 <= max_results <= 500:
            raise _invalid("Invalid maxResults")
        offset = _page_offset(params.get("pageToken"))
        page = found[offset : offset + max_results]
        answer: dict[str, Any] = {}
        if page:
            answer["messages"] = [{"id": message.id, "threadId": message.thread_id} for message in page]
        if offset + max_results < len(found):
            answer["nextPageToken"] = _page_token(offset + max_results)
        answer["resultSizeEstimate"] = len(found)
        return answer

    def _get(
        self,
        mailbox: Mailbox,
        message_id: str,
        query: dict[str, list[str]],
        params: dict[str, str],
        metadata_only: bool,
    ) -> dict[str, Any]:
        message = next((m for m in mailbox.visible() if m.id == message_id), None)
        if message is None:
            raise GoogleError(404, "Requested entity was not found.", "notFound")
        form = params.get("format", "full")
        if form not in ("full", "metadata", "minimal", "raw"):
            raise _invalid(f"Invalid value at 'format' (type.googleapis.com/gmail.v1.Format), \"{form}\"")
        if form in ("full", "raw") and metadata_only:
            raise GoogleError(403, f"Metadata scope doesn't allow format {form.upper()}", "forbidden")
        resource = message.resource()
        if form == "raw":
            resource["raw"] = base64.urlsafe_b64encode(message.raw).decode("ascii")
        elif form in ("metadata", "full"):
            names = (
                {name.lower() for name in query.get("metadataHeaders", [])} if form == "metadata" else set()
            )
            headers = [
                {"name": name, "value": value}
                for name, value in message.headers()
                if not names or name.lower() in names
            ]
            parsed = BytesHeaderParser(policy=compat32).parsebytes(message.raw)
            payload: dict[str, Any] = {"mimeType": parsed.get_content_type(), "headers": headers}
            if form == "full":
                # Simplified: the top part only, its body's size (no parts tree, no body data).
                _, _, body = message.raw.partition(b"\r\n\r\n")
                payload.update({"partId": "", "filename": "", "body": {"size": len(body)}})
            resource["payload"] = payload
        return resource

    # --- labels --------------------------------------------------------------------------------------------

    def _create_label(self, mailbox: Mailbox, body: dict[str, Any]) -> Label:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _invalid("Invalid label name")
        name = name.strip()
        if name.upper() in SYSTEM_LABELS or name.lower() in (
            "inbox",
            "sent",
            "drafts",
            "spam",
            "trash",
            "chats",
        ):
            raise _invalid("Invalid label name")
        if mailbox.label_named(name) is not None:
            raise GoogleError(409, "Label name exists or conflicts", "duplicate")
        label = Label(
            f"Label_{next(self._label_ids)}",
            name,
            "user",
            body.get("messageListVisibility", "show"),
            body.get("labelListVisibility", "labelShow"),
        )
        mailbox.labels[label.id] = label
        return label

    def _label_resource(self, mailbox: Mailbox, label_id: str) -> dict[str, Any]:
        label = mailbox.labels.get(label_id)
        if label is None:
            raise GoogleError(404, "Requested entity was not found.", "notFound")
        tagged = [m for m in mailbox.visible() if label_id in m.label_ids]
        unread = [m for m in tagged if m.unread]
        return {
            **label.resource(),
            "messagesTotal": len(tagged),
            "messagesUnread": len(unread),
            "threadsTotal": len({m.thread_id for m in tagged}),
            "threadsUnread": len({m.thread_id for m in unread}),
        }


# --- helpers ----------------------------------------------------------------------------------------------


def _metadata_only(token: Token) -> bool:
    """The token reads mail only through gmail.metadata (no q, no raw or full format)."""
    return METADATA in token.scopes and not {FULL_ACCESS, MODIFY, READONLY} & token.scopes


def _json_answer(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> _Answer:
    body = json.dumps(payload, indent=2).encode()
    return _Answer(status, body, {"Content-Type": "application/json; charset=UTF-8", **(headers or {})})


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise _invalid("Invalid JSON payload received.") from None
    if not isinstance(value, dict):
        raise _invalid("Invalid JSON payload received.")
    return value


def _label_ids(metadata: dict[str, Any]) -> list[str]:
    labels = metadata.get("labelIds", [])
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise _invalid("Invalid value at 'message.label_ids'")
    return labels


def _bool_param(params: dict[str, str], name: str) -> bool:
    value = params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise _invalid(f"Invalid value at '{name}' (TYPE_BOOL), \"{params[name]}\"")
    return value in ("true", "1")


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise _invalid(f"Invalid value at '{name}' (TYPE_UINT32), \"{value}\"") from None


def _page_token(offset: int) -> str:
    return f"{offset:020d}"


def _page_offset(token: str | None) -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise _invalid("Invalid pageToken")
    return int(token)


def _check_media_type(content_type: str) -> None:
    media_type = content_type.split(";")[0].strip().lower()
    if not media_type.startswith("message/"):
        raise _invalid(f"Media type '{media_type}' is not supported. Valid media types: [message/*]")


def _too_large(limit: int) -> GoogleError:
    return GoogleError(413, f"Request too large. Media larger than: {limit}", "uploadTooLarge")


def _content_range(value: str) -> tuple[int | None, int | None, str]:
    """(first, last, total) of ``bytes a-b/N``; first and last None for ``bytes */N``."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value)
    if match is None:
        raise _invalid("Failed to parse Content-Range header.")
    first, last, total = match.groups()
    return (None if first is None else int(first)), (None if last is None else int(last)), total


def _multipart_related(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes]:
    """(metadata, media) of a multipart/related upload: a JSON part, then the message (binary, or with a
    Content-Transfer-Encoding of base64)."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/related" or not isinstance(boundary, str):
        raise _invalid("Invalid multipart request with 0 mime parts.")
    parts = _split_parts(body, boundary.encode())
    if len(parts) != 2:
        raise _invalid(f"Invalid multipart request with {len(parts)} mime parts.")
    (_, meta), (media_headers, media) = parts
    _check_media_type(media_headers.get("content-type", ""))
    if media_headers.get("content-transfer-encoding", "").lower() == "base64":
        media = base64.b64decode(media)
    return _json_body(meta), media


def _split_parts(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0:
        raise _invalid("Invalid multipart request with 0 mime parts.")
    parts = []
    position = start + len(delimiter)
    while not body.startswith(b"--", position):
        line_end = body.find(b"\n", position)
        if line_end < 0:
            raise _invalid("Invalid multipart request: no closing delimiter.")
        content_start = line_end + 1
        following = body.find(b"\n" + delimiter, content_start)
        if following < 0:
            raise _invalid("Invalid multipart request: no closing delimiter.")
        # The line break before a delimiter belongs to the delimiter (RFC 2046).
        content_end = (
            following - 1 if following > 0 and body[following - 1 : following] == b"\r" else following
        )
        part = body[content_start:content_end]
        head, content = _split_head(part)
        parsed = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n")
        parts.append(({name.lower(): str(value) for name, value in parsed.items()}, content))
        position = following + 1 + len(delimiter)
    return parts


def _split_head(part: bytes) -> tuple[bytes, bytes]:
    """(headers, content) of a body part: the first blank line ends the headers, whichever line ends they
    use (the content, a message, has its own blank line further on)."""
    if part.startswith((b"\r\n", b"\n")):
        return b"", part[2:] if part.startswith(b"\r\n") else part[1:]
    found = [(index, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (index := part.find(sep)) >= 0]
    if not found:
        return part, b""
    index, length = min(found)
    return part[:index], part[index + length :]


def _matches(mailbox: Mailbox, message: StoredMessage, term: str) -> bool:
    """One search term of Gmail's query language (the operators the connector needs, and plain words)."""
    operator, colon, value = term.partition(":")
    operator = operator.lower()
    if colon and operator == "rfc822msgid":
        own = (message.message_id or "").strip().strip("<>")
        return own.lower() == value.strip().strip("<>").lower()
    if colon and operator == "label":
        label = mailbox.labels.get(value) or mailbox.label_named(value)
        return label is not None and label.id in message.label_ids
    if colon and operator == "in":
        where = value.upper()
        return where == "ANYWHERE" or where in message.label_ids
    if colon and operator == "is":
        state = value.lower()
        if state == "read":
            return not message.unread
        return state.upper() in message.label_ids
    if colon and operator in ("from", "to", "cc", "subject"):
        header = message.header(operator) or ""
        return value.lower() in header.lower()
    return term.lower() in message.raw.decode("latin-1").lower()


def _text(value: str) -> str:
    # The parser keeps undecodable bytes as surrogate escapes; JSON has no place for those.
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]", " ", value).strip()


def _received_date(data: bytes) -> float | None:
    """The Date header's time, when it parses (else Gmail falls back to the time of receipt)."""
    value = BytesHeaderParser(policy=compat32).parsebytes(data).get("Date")
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def _gmail_copy(data: bytes, now: float) -> bytes:
    """What Gmail stores for an imported message: its own trace lines on top, every line ending in CRLF."""
    stamp = email.utils.formatdate(now, localtime=False)
    state = base64.b64encode(secrets.token_bytes(45)).decode("ascii")
    added = (
        f"Received: from 127.0.0.1 named unknown by gmailapi.google.com with HTTPREST; {stamp}\r\n"
        f"X-Gm-Message-State: {state}\r\n"
    ).encode("ascii")
    return added + re.sub(rb"\r?\n", b"\r\n", data)


# --- HTTP -------------------------------------------------------------------------------------------------


def _handler(server: GmailServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Answers go out at once: with Nagle's algorithm and the client's delayed ACK each one waited ~40 ms.
        disable_nagle_algorithm = True
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # bearer tokens travel in headers; keep test output quiet

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            body = self._body()
            answer = server.handle(self.command, self.path, self.headers, body)
            if server.latency:
                time.sleep(server.latency)
            if answer.drop:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                return
            self.send_response(answer.status, "Resume Incomplete" if answer.status == 308 else None)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        do_GET = _serve
        do_POST = _serve
        do_PUT = _serve

    return Handler


@contextlib.contextmanager
def running_gmail(**kwargs: Any) -> Iterator[GmailServer]:
    with GmailServer(**kwargs) as server:
        yield server
