"""Gmail and Google Workspace through the Gmail API: each message goes in with ``users.messages.import``.

``messages.import`` is what Gmail's own POP fetcher did: the raw message, as received, gets Gmail's
normal delivery scanning and classification (spam, phishing, categories), as if it came by SMTP; it is
not sent anywhere. The bytes are those of the ``FetchedMessage`` (with the ``X-Pop-Connector-Id`` line the
spool put first, which is what the recovery lookup looks for). Parameters:

* ``labelIds``: the destination's ``labels`` (system labels by their id: INBOX, STARRED ...; other names
  are user labels), the account's label (``account_label``, e.g. ``Hosted/alice``; created when missing,
  each parent first, since Gmail nests labels by "/"), and UNREAD unless ``mark_seen``; the label ids are
  looked up once per session;
* ``internalDateSource=dateHeader``: Gmail files the message under its ``Date:`` (the IMAP path sets the
  newest ``Received:`` as INTERNALDATE instead; Gmail uses the import time when there is no usable
  ``Date:``);
* ``neverMarkSpam``, ``processForCalendar``: from the destination.

Messages up to ``SIMPLE_UPLOAD_LIMIT`` go in one multipart upload (the label ids and the message in one
request: a bare ``uploadType=media`` upload carries no labels); larger ones, up to ``max_message_size``
(Gmail's 150 MB), in a resumable upload, ``RESUMABLE_CHUNK`` bytes per request, read from the spool as
they are sent. Larger still: ``DestinationTooLargeError``, quarantined at once and left on the POP3 server.

Requests are paced per Gmail user (``QuotaPacer``) within Gmail's per-user quota (250 units a second; an
import costs 25), so one busy mailbox does not run into 429s; when Gmail still says to slow down, the
session raises a temporary error and the account backs off (``gmail_errors``). Authentication is
``gmail_auth``; the token file ``gmail_tokens``.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
from google.auth import exceptions as google_exceptions
from google.auth.transport.requests import AuthorizedSession

from connector.config import Account, GmailDestination
from connector.destinations.base import DestinationSession
from connector.destinations.gmail_auth import LOGINS, Login
from connector.destinations.gmail_errors import (
    Answer,
    GmailSetupError,
    Where,
    parse_answer,
    translate_answer,
    translate_refresh,
    translate_transport,
)
from connector.errors import DestinationError, DestinationTempError, DestinationTooLargeError
from connector.message import FetchedMessage
from connector.policies.recovery import (
    LOOKUP_FAILED,
    STAMP_HEADER,
    Stored,
    Verdict,
    Wanted,
    judge,
    stamps_in,
)

log = logging.getLogger("connector.destinations.gmail")
# One line per API request and its outcome (never a header or body: they carry the bearer token and mail).
wire = logging.getLogger("connector.gmail.wire")

# Up to this size a message goes in one multipart request; above it, a resumable upload (Google's advice:
# multipart for 5 MB or less).
SIMPLE_UPLOAD_LIMIT = 5 * 1024 * 1024
# Bytes per request of a resumable upload: a multiple of 256 KiB, as Google requires.
RESUMABLE_CHUNK = 8 * 1024 * 1024
# A resumable upload that makes no progress this many requests in a row is given up (temporary).
RESUMABLE_STALLS = 3
# At most this many candidates of one Message-ID are read in a lookup (a mailing list's duplicates).
MAX_CANDIDATES = 200
# Error bodies read for their reason, at most.
_ERROR_BODY_LIMIT = 64 * 1024

SYSTEM_LABELS = frozenset(
    {
        "INBOX",
        "UNREAD",
        "STARRED",
        "IMPORTANT",
        "SPAM",
        "TRASH",
        "SENT",
        "DRAFT",
        "CHAT",
        "CATEGORY_PERSONAL",
        "CATEGORY_SOCIAL",
        "CATEGORY_PROMOTIONS",
        "CATEGORY_UPDATES",
        "CATEGORY_FORUMS",
    }
)
LABEL_SEPARATOR = "/"

# Gmail's per-user quota: 250 units a second. The pacer spends at most that in any one second: a steady
# 225 units a second plus a burst of one import (25), so a mailbox runs at about nine imports a second.
USER_QUOTA_PER_SECOND = 225.0
USER_QUOTA_BURST = 25.0
COST_IMPORT = 25
COST_LIST = 5
COST_GET = 5
COST_LABELS_LIST = 1
COST_LABELS_CREATE = 5
COST_PROFILE = 1


# --- labels (pure) --------------------------------------------------------------------------------------


def label_name(name: str) -> str:
    """A label name as Gmail keeps it: levels separated by "/", without empty levels or blanks around."""
    return LABEL_SEPARATOR.join(part.strip() for part in name.split(LABEL_SEPARATOR) if part.strip())


def label_path(name: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b", "a/b/c"]``: the labels to exist, each parent before its child."""
    parts = label_name(name).split(LABEL_SEPARATOR)
    return [LABEL_SEPARATOR.join(parts[: depth + 1]) for depth in range(len(parts)) if parts[0]]


def wanted_labels(labels: Iterable[str], account_label: str | None, *, unread: bool) -> list[str]:
    """The labels of an import: the destination's, the account's, UNREAD unless seen; each once."""
    wanted: list[str] = []
    for name in [*labels, *([account_label] if account_label else []), *(["UNREAD"] if unread else [])]:
        name = name if name in SYSTEM_LABELS else label_name(name)
        if name and name.lower() not in {known.lower() for known in wanted}:
            wanted.append(name)
    return wanted


@dataclass
class LabelIndex:
    """The mailbox's labels as ``labels.list`` gives them: ids by lower-case name (Gmail's label names are
    case-insensitive), and every id."""

    by_name: dict[str, str] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, data: object) -> LabelIndex:
        index = cls()
        items = data.get("labels") if isinstance(data, dict) else None
        for item in items if isinstance(items, list) else []:
            if (
                isinstance(item, dict)
                and isinstance(item.get("id"), str)
                and isinstance(item.get("name"), str)
            ):
                index.add(item["name"], item["id"])
        return index

    def add(self, name: str, label_id: str) -> None:
        self.by_name[name.lower()] = label_id
        self.ids.add(label_id)

    def find(self, name: str) -> str | None:
        """The id of the label ``name`` (a system label's id is its name), or None when it is missing."""
        if name in SYSTEM_LABELS or name in self.ids:
            return name
        return self.by_name.get(name.lower())

    def missing(self, names: Iterable[str]) -> list[str]:
        """The labels a delivery would create for ``names`` (parents first)."""
        found: list[str] = []
        for name in names:
            if self.find(name) is None:
                found.extend(
                    path for path in label_path(name) if self.find(path) is None and path not in found
                )
        return found


# --- the per-user quota -----------------------------------------------------------------------------------


class QuotaPacer:
    """A token bucket per Gmail user, ``per_second`` units filling a bucket of ``burst``: in any one second
    no user is sent more than ``burst + per_second`` units of calls. Keeps a busy mailbox under Gmail's
    per-user rate limit instead of running into its 429s (and the account's back-off)."""

    def __init__(
        self,
        per_second: float = USER_QUOTA_PER_SECOND,
        *,
        burst: float = USER_QUOTA_BURST,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (units available, at)

    def spend(self, user: str, units: int) -> float:
        """Take ``units`` of ``user``'s quota, waiting until they are there; returns the seconds waited.
        A debt is kept, so callers on several threads queue up behind each other."""
        key = user.lower()
        with self._lock:
            now = self._clock()
            available, at = self._buckets.get(key, (self.burst, now))
            available = min(self.burst, available + (now - at) * self.per_second) - units
            self._buckets[key] = (available, now)
        wait = -available / self.per_second if available < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


PACER = QuotaPacer()


# --- the session ------------------------------------------------------------------------------------------


class GmailSession:
    """Imports into one Gmail user's mailbox (a ``DestinationSession``)."""

    def __init__(
        self,
        http: AuthorizedSession,
        login: Login,
        *,
        where: Where,
        destination: GmailDestination,
        labels: list[str],
        timeout: float,
        pacer: QuotaPacer = PACER,
    ) -> None:
        self._http: AuthorizedSession | None = http
        self._login = login
        self._where = where
        self._api = destination.api_url
        self._labels = labels
        self._max_size = int(destination.max_message_size)
        self._params = {
            "internalDateSource": "dateHeader",
            "neverMarkSpam": _flag(destination.never_mark_spam),
            "processForCalendar": _flag(destination.process_for_calendar),
        }
        self._timeout = timeout
        self._pacer = pacer
        self._label_ids: list[str] | None = None

    # --- DestinationSession ---------------------------------------------------------------------------

    def max_batch(self) -> int:
        return 1  # one import per message: Gmail has no atomic import of several

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        return [self.deliver(messages[0])] if len(messages) == 1 else None

    def deliver(self, message: FetchedMessage) -> str:
        """``messages.import`` of the message's bytes; returns ``gmail:<user>;id=<message id>``."""
        if message.size > self._max_size:
            raise DestinationTooLargeError(
                self._where.say(
                    f"message is {message.size} bytes, larger than this destination's max_message_size of "
                    f"{self._max_size} bytes (Gmail takes at most 150 MB): not imported"
                ),
                uidl=message.uidl,
            )
        try:
            return self._import(message)
        except _LabelGone:
            pass
        # Someone deleted one of our labels since this session looked them up: look again, once.
        log.info("%s", self._where.say("a label is gone; looking the labels up again"))
        self._label_ids = None
        try:
            return self._import(message)
        except _LabelGone as gone:
            raise self._refused(gone.answer, "import", importing=True, uidl=message.uidl) from None

    def find(self, message: FetchedMessage) -> str | None:
        """After a crash or a lost answer: the copy of ``message`` in the mailbox, or None.

        Gmail stores its own copy (its bytes are never ours to compare), so the stamp decides
        (``policies.recovery``): every candidate with our Message-ID (``rfc822msgid:`` search, Spam and
        Trash included) is read for its ``X-Pop-Connector-Id`` header, and the one with our stamp is
        ours. A copy without a stamp was not imported by the connector. Any failure raises: a lookup that
        got no answer must never read as "not there" (``base.look_up``).
        """
        try:
            candidates = self._search(message)
            wanted = Wanted(message.stamp, message.size - len(message.stamp_line))
            for message_id in candidates:
                stamps = self._stamps_of(message_id, message.uidl)
                if stamps is None:
                    continue  # deleted between the search and now
                if judge(wanted, Stored(stamps, None)) is Verdict.SAME:
                    return self._reference(message_id)
        except DestinationError as exc:
            exc.message = f"{exc.message}; {LOOKUP_FAILED}"
            raise
        return None

    def check(self) -> str:
        """The profile and the labels a delivery would use, writing nothing."""
        profile = self._json("read the profile", "GET", self._url("profile"), COST_PROFILE, uidl=None)
        address = profile.get("emailAddress") if isinstance(profile, dict) else None
        index = self._label_index(None)
        missing = index.missing(self._labels)
        found = [name for name in self._labels if index.find(name) is not None]
        said = f"Gmail user {address or self._where.mailbox}; labels {', '.join(self._labels) or '(none)'}"
        if missing:
            said += f" ({', '.join(found) or 'none'} exist; the first import creates {', '.join(missing)})"
        return said

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> GmailSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- import ---------------------------------------------------------------------------------------

    def _import(self, message: FetchedMessage) -> str:
        label_ids = self._resolve_labels(message.uidl)
        self._pacer.spend(self._where.mailbox, COST_IMPORT)
        if message.size <= SIMPLE_UPLOAD_LIMIT:
            response = self._multipart(message, label_ids)
        else:
            response = self._resumable(message, label_ids)
        return self._reference(_json_field(response, "id"))

    def _multipart(self, message: FetchedMessage, label_ids: list[str]) -> requests.Response:
        raw = message.read_bytes()
        boundary = _boundary(raw)
        metadata = json.dumps({"labelIds": label_ids}).encode()
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                metadata,
                f"\r\n--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n".encode(),
                raw,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        url = self._upload_url_for("multipart")
        headers = {"Content-Type": f'multipart/related; boundary="{boundary}"'}
        response = self._send("import", "POST", url, uidl=message.uidl, data=body, headers=headers)
        return self._expect_import(response, "import", message.uidl)

    def _resumable(self, message: FetchedMessage, label_ids: list[str]) -> requests.Response:
        url = self._upload_url_for("resumable")
        headers = {
            "Content-Type": "application/json; charset=UTF-8",
            "X-Upload-Content-Type": "message/rfc822",
            "X-Upload-Content-Length": str(message.size),
        }
        metadata = json.dumps({"labelIds": label_ids}).encode()
        started = self._send(
            "start the upload", "POST", url, uidl=message.uidl, data=metadata, headers=headers
        )
        self._expect_import(started, "start the upload", message.uidl)
        upload_url = self._upload_url(started.headers.get("Location"), message.uidl)
        offset, stalls = 0, 0
        while True:
            chunk = next(message.chunks(RESUMABLE_CHUNK, start=offset), b"")
            last = offset + len(chunk) - 1
            headers = {
                "Content-Range": f"bytes {offset}-{last}/{message.size}"
                if chunk
                else f"bytes */{message.size}"
            }
            response = self._send("upload", "PUT", upload_url, uidl=message.uidl, data=chunk, headers=headers)
            if response.status_code != 308:
                return self._expect_import(response, "upload", message.uidl)
            received = _received_through(response.headers.get("Range"))
            stalls = 0 if received > offset else stalls + 1
            if stalls >= RESUMABLE_STALLS:
                raise DestinationTempError(
                    self._where.say(
                        f"upload: no progress at byte {offset} of {message.size}; the account backs off"
                    ),
                    uidl=message.uidl,
                )
            offset = received

    def _expect_import(self, response: requests.Response, action: str, uidl: str) -> requests.Response:
        if response.status_code in (200, 201):
            return response
        answer = _answer(response)
        if answer.status in (400, 404) and "label" in answer.message.lower():
            raise _LabelGone(answer)
        raise self._refused(answer, action, importing=True, uidl=uidl)

    def _upload_url(self, location: str | None, uidl: str) -> str:
        """The upload's session URL, only on the API's own origin: it is sent the bearer token."""
        if not location:
            raise DestinationTempError(
                self._where.say("start the upload: Gmail gave no upload URL"), uidl=uidl
            )
        url = urllib.parse.urljoin(self._api + "/", location)
        if _origin(url) != _origin(self._api):
            raise GmailSetupError(
                self._where.say(f"start the upload: the upload URL is on another server ({_origin(url)})"),
                uidl=uidl,
            )
        return url

    # --- labels -----------------------------------------------------------------------------------------

    def _resolve_labels(self, uidl: str) -> list[str]:
        """The ids of the wanted labels, creating missing user labels (parents first); once per session."""
        if self._label_ids is not None:
            return self._label_ids
        index = self._label_index(uidl)
        for path in index.missing(self._labels):
            self._create_label(path, index, uidl)
        ids = [index.find(name) for name in self._labels]
        if any(label_id is None for label_id in ids):  # pragma: no cover - missing() covered each
            raise GmailSetupError(self._where.say("a label is missing right after it was created"), uidl=uidl)
        self._label_ids = [label_id for label_id in ids if label_id is not None]
        return self._label_ids

    def _label_index(self, uidl: str | None) -> LabelIndex:
        data = self._json("list the labels", "GET", self._url("labels"), COST_LABELS_LIST, uidl=uidl)
        return LabelIndex.parse(data)

    def _create_label(self, name: str, index: LabelIndex, uidl: str) -> None:
        log.info("%s", self._where.say(f"creating label {name!r}"))
        self._pacer.spend(self._where.mailbox, COST_LABELS_CREATE)
        body = {"name": name, "labelListVisibility": "labelShow", "messageListVisibility": "show"}
        response = self._send("create a label", "POST", self._url("labels"), uidl=uidl, json=body)
        if response.status_code in (200, 201):
            label_id = _json_field(response, "id")
            if label_id is not None:
                index.add(name, label_id)
                return
        elif response.status_code != 409:  # 409: it exists (another account made it meanwhile)
            raise self._refused(_answer(response), f"create label {name!r}", importing=False, uidl=uidl)
        again = self._label_index(uidl)
        label_id = again.find(name)
        if label_id is None:
            raise GmailSetupError(
                self._where.say(
                    f"create label {name!r}: Gmail says it exists or conflicts, yet it is not listed"
                ),
                uidl=uidl,
            )
        index.add(name, label_id)

    # --- lookup -----------------------------------------------------------------------------------------

    def _search(self, message: FetchedMessage) -> list[str]:
        """The ids of the messages whose Message-ID is ours (all pages, Spam and Trash included)."""
        ids: list[str] = []
        page: str | None = None
        while len(ids) < MAX_CANDIDATES:
            params = {
                "q": rfc822msgid_query(message.message_id),
                "includeSpamTrash": "true",
                "maxResults": "100",
            }
            if page:
                params["pageToken"] = page
            data = self._json("search", "GET", self._url("messages", params), COST_LIST, uidl=message.uidl)
            if not isinstance(data, dict):
                raise DestinationTempError(
                    self._where.say("search: the answer is not a JSON object"), uidl=message.uidl
                )
            for item in data.get("messages") or []:
                if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"] not in ids:
                    ids.append(item["id"])
            page = data.get("nextPageToken") if isinstance(data.get("nextPageToken"), str) else None
            if not page:
                break
        return ids[:MAX_CANDIDATES]

    def _stamps_of(self, message_id: str, uidl: str) -> tuple[str, ...] | None:
        """The stamps in one stored message's headers (None: it is gone)."""
        self._pacer.spend(self._where.mailbox, COST_GET)
        url = self._url(
            f"messages/{urllib.parse.quote(message_id, safe='')}",
            {"format": "metadata", "metadataHeaders": [STAMP_HEADER, "Message-ID"]},
        )
        response = self._send("read a candidate's headers", "GET", url, uidl=uidl)
        if response.status_code == 404:
            return None
        data = self._decoded(response, "read a candidate's headers", uidl)
        payload = data.get("payload") if isinstance(data, dict) else None
        headers = payload.get("headers") if isinstance(payload, dict) else None
        fields = [
            f"{item['name']}: {item.get('value', '')}\r\n"
            for item in (headers if isinstance(headers, list) else [])
            if isinstance(item, dict) and str(item.get("name", "")).lower() == STAMP_HEADER.lower()
        ]
        return stamps_in("".join(fields).encode("utf-8", "replace"))

    # --- requests -----------------------------------------------------------------------------------------

    def _url(self, path: str, query: Mapping[str, str | list[str]] | None = None) -> str:
        url = f"{self._api}/gmail/v1/users/me/{path}"
        return f"{url}?{urllib.parse.urlencode(query, doseq=True)}" if query else url

    def _upload_url_for(self, upload_type: str) -> str:
        query = {"uploadType": upload_type, **self._params}
        return f"{self._api}/upload/gmail/v1/users/me/messages/import?{urllib.parse.urlencode(query)}"

    def _json(self, action: str, method: str, url: str, cost: int, *, uidl: str | None) -> Any:
        self._pacer.spend(self._where.mailbox, cost)
        response = self._send(action, method, url, uidl=uidl)
        return self._decoded(response, action, uidl)

    def _decoded(self, response: requests.Response, action: str, uidl: str | None) -> Any:
        if response.status_code != 200:
            raise self._refused(_answer(response), action, importing=False, uidl=uidl)
        try:
            return response.json()
        except ValueError as exc:
            raise DestinationTempError(
                self._where.say(f"{action}: the answer is not JSON"), uidl=uidl
            ) from exc

    def _send(
        self, action: str, method: str, url: str, *, uidl: str | None, **kwargs: Any
    ) -> requests.Response:
        """One request with a valid access token; a 401 gets one new token and one more try. Every
        exception is translated; the answer's status is the caller's to judge."""
        if self._http is None:
            raise DestinationTempError(self._where.say(f"{action}: the session is closed"), uidl=uidl)
        about = f" (message {uidl})" if uidl else ""
        try:
            for attempt in range(2):
                self._login.fresh(self._where, self._timeout)
                used = self._login.credentials.token
                wire.debug("%s", self._where.say(f"> {action}{about}: {method} {_path_of(url)}"))
                response: requests.Response = self._http.request(
                    method, url, timeout=self._timeout, verify=self._login.verify, **kwargs
                )
                wire.debug("%s", self._where.say(f"< {action}: HTTP {response.status_code}"))
                if response.status_code != 401 or attempt:
                    return response
                self._login.refused(self._where, self._timeout, used)
        except DestinationError as exc:
            exc.uidl = uidl
            raise
        except google_exceptions.RefreshError as exc:
            error = translate_refresh(exc, self._where, auth_hint=self._login.auth_hint)
            error.uidl = uidl
            raise error from exc
        except (google_exceptions.TransportError, requests.RequestException) as exc:
            error = translate_transport(exc, self._where, action)
            error.uidl = uidl
            wire.debug("%s", self._where.say(f"< {action}: {error.message}"))
            raise error from exc
        raise AssertionError("unreachable")

    def _refused(self, answer: Answer, action: str, *, importing: bool, uidl: str | None) -> DestinationError:
        error = translate_answer(
            answer, self._where, action, importing=importing, auth_hint=self._login.auth_hint
        )
        error.uidl = uidl
        return error

    def _reference(self, message_id: str | None) -> str:
        base = f"gmail:{self._where.mailbox}"
        return f"{base};id={message_id}" if message_id else base


class _LabelGone(Exception):
    """An import refused for a label that no longer exists (the session looks the labels up again)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.describe())
        self.answer = answer


def rfc822msgid_query(message_id: str) -> str:
    """Gmail's search for a Message-ID: without its angle brackets, quoted when it holds characters that
    Gmail's query syntax would split on."""
    bare = message_id.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    if any(char.isspace() or char in '"(){}' for char in bare):
        return 'rfc822msgid:"' + bare.replace('"', "") + '"'
    return f"rfc822msgid:{bare}"


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _boundary(data: bytes) -> str:
    """A multipart boundary that does not occur in ``data``."""
    while True:
        boundary = f"pop-connector-{secrets.token_hex(16)}"
        if boundary.encode() not in data:
            return boundary


def _received_through(range_header: str | None) -> int:
    """The next offset after a 308: ``Range: bytes=0-N`` says bytes through N are kept (none: 0)."""
    if not range_header or "-" not in range_header:
        return 0
    try:
        return int(range_header.rsplit("-", 1)[1]) + 1
    except ValueError:
        return 0


def _answer(response: requests.Response) -> Answer:
    return parse_answer(response.status_code, response.content[:_ERROR_BODY_LIMIT], response.headers)


def _json_field(response: requests.Response, name: str) -> str | None:
    try:
        data = response.json()
    except ValueError:
        return None
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def _path_of(url: str) -> str:
    """The URL without its query (the query holds a Message-ID, which is the mailbox's business)."""
    return urllib.parse.urlsplit(url).path


# --- opening --------------------------------------------------------------------------------------------


def open_gmail(destination: GmailDestination, account: Account, mailbox: str | None) -> DestinationSession:
    """A session that imports into ``mailbox`` (None: the one user who gave consent). Signs in at once
    (an access token is obtained or reused), so that a refused consent is the destination's failure,
    not a message's."""
    where = Where(destination.name, account.name, mailbox or "(the user who gave consent)")
    login = LOGINS.get(destination, mailbox, where)
    where = Where(destination.name, account.name, mailbox or login.address)
    timeout = account.timeout.total_seconds()
    http = AuthorizedSession(
        login.credentials,
        refresh_status_codes=(),  # a 401 is handled by the session: one new token under the login's lock
        max_refresh_attempts=0,
        auth_request=login.token_request(timeout),
    )
    try:
        login.fresh(where, timeout)
    except BaseException:
        http.close()
        raise
    labels = wanted_labels(
        destination.labels,
        destination.label_for(account.name),
        unread=not (destination.mark_seen or account.mark_seen),
    )
    return GmailSession(
        http, login, where=where, destination=destination, labels=labels, timeout=timeout, pacer=PACER
    )
