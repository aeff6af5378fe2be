"""IMAP destination: APPEND each message into one folder, and find it again after a crash.

``open_imap`` is the only place a connection is built (tests replace it). Everything imapclient, imaplib,
ssl and socket raise is translated here into the project's ``DestinationError`` types, with messages that
name the server, the folder and what the server said, and never the password.
"""

from __future__ import annotations

import contextlib
import hashlib
import imaplib
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from imapclient.imap_utf7 import encode as encode_utf7
from imapclient.tls import wrap_socket

from connector.destinations.base import clip_server_text
from connector.errors import (
    DestinationAuthError,
    DestinationConnectError,
    DestinationError,
    DestinationFullError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTLSError,
    DestinationTooLargeError,
    OAuthError,
    OAuthRefusedError,
)
from connector.message import FetchedMessage
from connector.oauth import TokenProvider, describe_sasl_json, login_with_token, xoauth2_response
from connector.policies.reconcile import StoredCopy
from connector.policies.recovery import (
    LOOKUP_FAILED,
    STAMP_HEADER,
    Stored,
    Verdict,
    Wanted,
    by_bytes,
    judge,
    stamps_in,
)
from connector.tls import TlsMode, make_ssl_context, plain_text_hint

log = logging.getLogger("connector.destinations.imap")

# The separator of folder levels in the configured folder name, whatever the server's delimiter is.
FOLDER_SEPARATOR = "/"
# find() hashes candidates in slices of this size so that a large message is never held whole.
# UIDs per FETCH of an inventory (``reconcile``): a few hundred KB of answer each.
INVENTORY_BATCH = 1000
_FETCH_SLICE = 1024 * 1024
# RFC 7888: with LITERAL- only literals up to this size may be non-synchronizing.
_LITERAL_MINUS_MAX = 4096
# A literal up to this size goes out in the same write as its command (one small copy, one segment).
_ONE_WRITE_MAX = 256 * 1024

_CODE_RE = re.compile(r"\[([A-Za-z0-9.-]+)[^\]]*\]")
# One UID after an APPEND, a set after a MULTIAPPEND (RFC 3502): "[APPENDUID 38505 3955:3957,3960]".
_APPENDUID_RE = re.compile(r"\[APPENDUID\s+(\d+)\s+([\d:,]+)\]", re.IGNORECASE)
# Messages per MULTIAPPEND: Dovecot stores a batch in one transaction, about three times faster per small
# message than one APPEND each (bench/, scenario 1); few enough that a refused batch is cheap to redo.
MULTIAPPEND_MESSAGES = 16
_BYTES_REPR_RE = re.compile(r"b(['\"])(.*)\1", re.DOTALL)
_FAILED_PREFIX_RE = re.compile(r"^\w+ failed: ")
# Codes that say "this message/folder can never go in" even if the text also mentions a quota.
_REJECT_CODES = frozenset({"TOOBIG", "CANNOT", "LIMIT"})
_TEMP_CODES = frozenset({"UNAVAILABLE", "INUSE", "SERVERBUG"})
_LOGIN_TEMP_CODES = frozenset({"UNAVAILABLE", "SERVERBUG"})
# Servers without RFC 5530 codes (Cyrus, some hosted ones) only say it in words.
_FULL_TEXTS = (
    "quota exceeded",
    "over quota",
    "exceeds quota",
    "quota exceed",
    "mailbox is full",
    "mailbox full",
)


@dataclass(frozen=True)
class Where:
    """What an error message says about where it happened."""

    host: str
    port: int
    folder: str

    def say(self, detail: str) -> str:
        return f"IMAP {self.host}:{self.port}, folder {self.folder!r}: {detail}"


# A way to turn a server's refusal (tagged NO or BAD) of one command into the project's error.
Refusal = Callable[[Where, str, str], DestinationError]


@dataclass(frozen=True)
class ImapCheck:
    """What ``ImapSession.check`` found: the server-side name and the folders a delivery would create."""

    folder: str
    mailbox: str
    exists: bool
    to_create: tuple[str, ...]

    def __str__(self) -> str:
        if self.exists:
            return f"folder {self.folder!r} exists as {self.mailbox!r}"
        created = ", ".join(self.to_create)
        return f"folder {self.folder!r} does not exist; the first delivery will create {created}"


def _server_text(exc: BaseException) -> str:
    """The server's words from an imaplib/imapclient error, without Python's ``b'...'`` wrapping."""
    raw = exc.args[0] if exc.args else exc
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    unwrapped = _BYTES_REPR_RE.fullmatch(text)
    if unwrapped:
        text = unwrapped.group(2)
    return clip_server_text(_FAILED_PREFIX_RE.sub("", text))


def _response_text(data: list[Any]) -> str:
    parts = [
        item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in data if item
    ]
    return clip_server_text(" ".join(parts))


def response_code(text: str) -> str | None:
    """The RFC 5530 response code at the start of a server's text, upper-cased (``OVERQUOTA``)."""
    match = _CODE_RE.match(text.lstrip())
    return match.group(1).upper() if match else None


def is_quota_text(text: str) -> bool:
    lowered = text.lower()
    return any(phrase in lowered for phrase in _FULL_TEXTS)


def command_refused(where: Where, action: str, text: str) -> DestinationError:
    """Classify a NO/BAD: over quota pauses the account, busy retries, anything else is permanent."""
    code = response_code(text)
    message = where.say(f"{action} refused: {text}")
    if code == "TOOBIG":
        return DestinationTooLargeError(message)
    if code in _REJECT_CODES:
        return DestinationRejectedError(message)
    if code == "OVERQUOTA" or is_quota_text(text):
        return DestinationFullError(message)
    if code in _TEMP_CODES:
        return DestinationTempError(message)
    return DestinationRejectedError(message)


def _lookup_refused(where: Where, action: str, text: str) -> DestinationError:
    """A NO/BAD while looking for an earlier delivery: whatever the code, the destination could not answer
    (destination trouble), which is never "not found"."""
    return DestinationTempError(where.say(f"{action} refused: {text}; {LOOKUP_FAILED}"))


def _login_refused(where: Where, action: str, text: str) -> DestinationError:
    if response_code(text) in _LOGIN_TEMP_CODES:
        return DestinationTempError(where.say(f"{action}: server cannot log in now: {text}"))
    return DestinationAuthError(where.say(f"{action} refused: {text}"))


def _connect_refused(where: Where, action: str, text: str) -> DestinationError:
    # A greeting other than OK (typically "* BYE too many connections") is a busy server, not a verdict.
    return DestinationConnectError(where.say(f"{action}: the server turned us away: {text}"))


def _tls_refused(where: Where, action: str, text: str) -> DestinationError:
    return DestinationTLSError(where.say(f"{action} refused, not continuing without TLS: {text}"))


@contextlib.contextmanager
def _driver_errors(
    where: Where,
    action: str,
    *,
    refused: Refusal = command_refused,
    secret: str | None = None,
    uidl: str | None = None,
) -> Iterator[None]:
    """Turn driver exceptions raised inside the block into ``DestinationError``s.

    ``secret`` is blanked out of every message, in case a server echoes what it was sent.
    """

    def clean(text: str) -> str:
        return text.replace(secret, "***") if secret else text

    try:
        yield
    except DestinationError:
        raise
    except ssl.SSLCertVerificationError as exc:
        detail = exc.verify_message or str(exc)
        raise DestinationTLSError(
            where.say(f"{action}: certificate not trusted: {clean(detail)}"), uidl=uidl
        ) from exc
    except ssl.SSLError as exc:
        raise DestinationConnectError(
            where.say(f"{action}: TLS failed: {clean(str(exc))}"), uidl=uidl
        ) from exc
    except TimeoutError as exc:
        raise DestinationConnectError(where.say(f"{action}: timed out"), uidl=uidl) from exc
    except OSError as exc:
        raise DestinationConnectError(
            where.say(f"{action}: {clean(str(exc) or type(exc).__name__)}"), uidl=uidl
        ) from exc
    except IMAPClientAbortError as exc:
        # BYE, a dropped connection or garbage from the server: the session is gone.
        raise DestinationConnectError(
            where.say(f"{action}: connection lost: {clean(_server_text(exc))}"), uidl=uidl
        ) from exc
    except IMAPClientError as exc:
        error = refused(where, action, clean(_server_text(exc)))
        error.uidl = uidl
        raise error from exc


def _quote_mailbox(name: str) -> bytes:
    """A mailbox name as an IMAP quoted string in modified UTF-7 (RFC 3501 §5.1.3)."""
    encoded = bytes(encode_utf7(name))
    return b'"' + encoded.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _quote_search_string(value: str) -> bytes:
    return b'"' + value.encode("ascii").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _searchable_part(message_id: str) -> str:
    """The longest run of printable ASCII in a Message-ID.

    SEARCH HEADER matches substrings, so a part finds the message too; this keeps odd (8-bit or control)
    characters out of the command, and ``policies.recovery`` weeds out any extra hits.
    """
    runs = re.findall(r"[\x21-\x7e]+", message_id)
    return max(runs, key=len) if runs else ""


class ImapSession:
    """One logged-in IMAP connection that delivers into one folder (a ``DestinationSession``).

    ``folder`` uses "/" between levels ("Imported/Hosted"); the server's own delimiter and personal
    namespace prefix (from NAMESPACE, else LIST) are applied when talking to it.
    """

    def __init__(
        self,
        client: Any,
        *,
        host: str,
        port: int,
        folder: str,
        mark_seen: bool,
        create_folder: bool,
        multiappend: bool = True,
    ) -> None:
        self._client = client
        self._multiappend = multiappend
        self._where = Where(host, port, folder)
        self.folder = folder
        self.mark_seen = mark_seen
        self.create_folder = create_folder
        self._levels: list[str] | None = None
        self._folder_ready = False
        self._literal_plus: bool | None = None
        self._literal_minus = False

    def __enter__(self) -> ImapSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- DestinationSession ---------------------------------------------------------------------------

    def deliver(self, message: FetchedMessage) -> str:
        """APPEND the message and return its reference.

        ``imap:<folder>;UIDVALIDITY=<v>;UID=<u>`` when the server answers with APPENDUID (UIDPLUS), else
        ``imap:<folder>``.
        """
        status, text = self._into_folder(message.uidl, lambda: self._append(message))
        if status != "OK":
            raise self._append_refused(text, message.uidl)
        return self._references(text, 1)[0]

    def max_batch(self) -> int:
        """MULTIAPPEND needs non-synchronizing literals here: imaplib waits for one "+" per command only."""
        if (
            not self._multiappend
            or self._client is None
            or not self._non_synchronizing(_LITERAL_MINUS_MAX + 1)
        ):
            return 1
        return MULTIAPPEND_MESSAGES if self._client.has_capability("MULTIAPPEND") else 1

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        """One MULTIAPPEND (RFC 3502) of all ``messages``: the server stores all of them or none.

        Returns their references in order, or None when the server refused the batch (nothing stored):
        the caller then delivers them one at a time, which tells which message was at fault.
        """
        status, text = self._into_folder(messages[0].uidl, lambda: self._append_batch(messages))
        return self._references(text, len(messages)) if status == "OK" else None

    def _into_folder(self, uidl: str, append: Callable[[], tuple[str, str]]) -> tuple[str, str]:
        """Run ``append`` with the folder made first when it may be; once more if the server says the folder
        is gone (someone deleted it since we looked)."""
        if self.create_folder:
            self._ensure_folder(uidl)
        status, text = append()
        if status != "OK" and response_code(text) == "TRYCREATE" and self.create_folder:
            self._folder_ready = False
            self._ensure_folder(uidl)
            status, text = append()
        return status, text

    def _references(self, text: str, count: int) -> list[str]:
        """The references of ``count`` appended messages, with UIDs when the server gave APPENDUID."""
        uids = _appended_uids(text, count)
        if uids is None:
            return [self._reference(None, None)] * count
        validity, numbers = uids
        return [self._reference(validity, uid) for uid in numbers]

    def find(self, message: FetchedMessage) -> str | None:
        """Look for a copy of ``message`` after a crash; ``policies.recovery`` says what counts as one.

        Read-only: EXAMINE and BODY.PEEK, so nothing is marked \\Seen. A lookup the server does not answer
        raises, never returns None: "could not look" must not be taken for "not there", which would deliver
        the message a second time (NO/BAD to EXAMINE, SEARCH, FETCH: ``DestinationTempError``; the engine
        calls this through ``base.look_up``, which makes any failure destination trouble).

        The folder the lookup examined is left unselected afterwards, whatever happened: Courier-IMAP
        refuses every APPEND to a folder its session has selected read-only, so one lookup would make
        every later delivery of the poll fail.
        """
        try:
            found = self._lookup(message)
        except BaseException:
            # The lookup's own error is the one to report; the connection may be gone by now.
            with contextlib.suppress(DestinationError):
                self._leave_folder(message.uidl)
            raise
        self._leave_folder(message.uidl)
        return found

    def _leave_folder(self, uidl: str) -> None:
        """UNSELECT (RFC 3691) when offered, else CLOSE, which expunges nothing in a folder opened with
        EXAMINE (read-only). A folder selected read-write is never CLOSEd here: that would expunge."""
        imap = self._client._imap if self._client is not None else None
        if imap is None or imap.state != "SELECTED":
            return
        if self._client.has_capability("UNSELECT"):
            action, leave = "UNSELECT", imap.unselect  # imaplib's: imapclient 3 keeps its state SELECTED
        elif imap.is_readonly:
            action, leave = "CLOSE", imap.close
        else:
            return
        with self._guard(action, uidl=uidl):
            status, data = leave()
        if status != "OK":
            # pymap refuses CLOSE in a folder opened with EXAMINE ("[READ-ONLY]"), against RFC 3501, and
            # takes APPENDs while it is selected: nothing is lost by staying there. A server that refused
            # the APPEND too would say so then, naming the message.
            log.info(
                "%s",
                self._where.say(
                    f"{action} after a lookup was refused ({_response_text(data)}); the folder "
                    "stays selected read-only"
                ),
            )

    def _lookup(self, message: FetchedMessage) -> str | None:
        """find() itself, without leaving the folder."""
        mailbox = self.mailbox
        if not self._folder_ready and not self._exists(mailbox, message.uidl):
            return None
        with self._guard("EXAMINE", uidl=message.uidl, refused=_lookup_refused):
            selected = self._client.select_folder(mailbox, readonly=True)
        uid = self._matching_copy(message)
        return None if uid is None else self._reference(selected.get(b"UIDVALIDITY"), uid)

    def inventory(self, batch: int = INVENTORY_BATCH) -> Iterator[StoredCopy]:
        """Every message in the folder, read-only (EXAMINE, BODY.PEEK): its stamps, Message-ID and size, in
        FETCHes of ``batch`` UIDs (for ``pop-connector reconcile``). The folder is left afterwards."""
        mailbox = self.mailbox
        if not self._exists(mailbox, None):
            return
        try:
            with self._guard("EXAMINE", refused=_lookup_refused):
                self._client.select_folder(mailbox, readonly=True)
            with self._guard("SEARCH", refused=_lookup_refused):
                uids: list[int] = sorted(self._client.search(b"ALL"))
            fields = f"BODY.PEEK[HEADER.FIELDS ({STAMP_HEADER} Message-ID)]"
            for start in range(0, len(uids), batch):
                with self._guard("FETCH", refused=_lookup_refused):
                    found = self._client.fetch(uids[start : start + batch], ["RFC822.SIZE", fields])
                for items in found.values():
                    yield _inventoried(items)
        finally:
            with contextlib.suppress(DestinationError):
                self._leave_folder("")

    def close(self) -> None:
        """LOGOUT; errors are swallowed because the connection is often already broken when we get here."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except (IMAPClientError, OSError, ValueError):
            with contextlib.suppress(IMAPClientError, OSError, ValueError):
                client.shutdown()

    # --- checks -----------------------------------------------------------------------------------------

    def check(self) -> ImapCheck:
        """Report whether the folder exists and what a delivery would create; writes nothing.

        Login was already verified by ``open_imap``. Raises ``DestinationRejectedError`` when the folder
        is missing and may not be created, or exists but cannot hold messages.
        """
        mailbox = self.mailbox
        flags = self._list_flags(mailbox, None)
        if _present(flags):
            self._require_selectable(flags, None)
            return ImapCheck(self.folder, mailbox, True, ())
        if not self.create_folder:
            raise DestinationRejectedError(
                self._where.say(f"folder {mailbox!r} does not exist and create_folder is off")
            )
        missing = tuple(level for level in self._mailbox_levels() if not self._exists(level, None))
        return ImapCheck(self.folder, mailbox, False, missing)

    # --- folder -------------------------------------------------------------------------------------------

    @property
    def mailbox(self) -> str:
        """The folder's name on the server: "Imported.Hosted" on Dovecot, "INBOX.Imported.Hosted" on Cyrus."""
        return self._mailbox_levels()[-1]

    def _mailbox_levels(self) -> list[str]:
        """Server names of the folder and each of its parents, outermost first."""
        if self._levels is None:
            parts = [part for part in self.folder.split(FOLDER_SEPARATOR) if part] or ["INBOX"]
            if len(parts) == 1 and parts[0].upper() == "INBOX":
                self._levels = ["INBOX"]
            else:
                prefix, delimiter = self._personal_namespace()
                names = [delimiter.join(parts[: i + 1]) for i in range(len(parts))]
                self._levels = [self._with_prefix(prefix, name) for name in names]
        return self._levels

    @staticmethod
    def _with_prefix(prefix: str, name: str) -> str:
        if not prefix or name.startswith(prefix) or name.upper() == "INBOX":
            return name
        return prefix + name

    def _personal_namespace(self) -> tuple[str, str]:
        """(prefix, delimiter) of the user's own folders; a flat server gets "/" (never used to split)."""
        with self._guard("NAMESPACE"):
            if self._client.has_capability("NAMESPACE"):
                personal = self._client.namespace().personal
                if personal:
                    prefix, delimiter = personal[0]
                    return _text(prefix), _text(delimiter) or FOLDER_SEPARATOR
            listing = self._client.list_folders("", "")
        delimiter = _text(listing[0][1]) if listing else ""
        return "", delimiter or FOLDER_SEPARATOR

    def _list_flags(self, mailbox: str, uidl: str | None) -> tuple[bytes, ...] | None:
        """LIST flags of exactly ``mailbox``, or None when the server has no such folder."""
        with self._guard("LIST", uidl=uidl):
            listing = self._client.list_folders("", mailbox)
        for flags, _delimiter, name in listing:
            if name == mailbox or (mailbox.upper() == "INBOX" and str(name).upper() == "INBOX"):
                return tuple(flag.lower() if isinstance(flag, bytes) else flag for flag in flags)
        return None

    def _exists(self, mailbox: str, uidl: str | None) -> bool:
        return _present(self._list_flags(mailbox, uidl))

    def _ensure_folder(self, uidl: str | None) -> None:
        """Create the folder and its missing parents, once per session."""
        if self._folder_ready:
            return
        levels = self._mailbox_levels()
        flags = self._list_flags(levels[-1], uidl)
        if not _present(flags):
            for level in levels:
                if not self._exists(level, uidl):
                    self._create(level, uidl)
            flags = self._list_flags(levels[-1], uidl)
        self._require_selectable(flags, uidl)
        self._folder_ready = True

    def _require_selectable(self, flags: tuple[bytes, ...] | None, uidl: str | None) -> None:
        if flags is not None and b"\\noselect" in flags:
            raise DestinationRejectedError(
                self._where.say(f"folder {self.mailbox!r} exists but cannot hold messages (\\Noselect)"),
                uidl=uidl,
            )

    def _create(self, mailbox: str, uidl: str | None) -> None:
        try:
            with self._guard(f"CREATE {mailbox!r}", uidl=uidl):
                self._client.create_folder(mailbox)
        except (DestinationRejectedError, DestinationTempError):
            # Another client (or a parallel poll) may have created it in between: that is success.
            if not self._exists(mailbox, uidl):
                raise
            return
        # Subscribing makes the folder show up in clients that only list subscribed folders; optional.
        with contextlib.suppress(IMAPClientError):
            self._client.subscribe_folder(mailbox)

    # --- APPEND -------------------------------------------------------------------------------------------

    def _append(self, message: FetchedMessage) -> tuple[str, str]:
        """Send APPEND; returns the tagged status ("OK"/"NO") and the server's text.

        imaplib's ``append()`` runs the whole message through a CRLF-normalising regex, which makes a
        second full copy (40 MB held for a 20 MB message). The spool is CRLF already, so the command
        is sent through imaplib's own literal machinery instead: ``.literal`` is handed to the socket
        as it is, and the message is only ever held once (the ``read_bytes()`` copy).
        """
        flags = self._flags()
        when = imaplib.Time2Internaldate(message.internal_date)
        mailbox = _quote_mailbox(self.mailbox)
        with self._guard("APPEND", uidl=message.uidl):
            imap = self._client._imap
            literal = _literal_safe(message.read_bytes())
            if self._non_synchronizing(len(literal)):
                status, data = _append_literal_plus(imap, mailbox, [_Appended(flags, when, literal)])
            else:
                imap.literal = literal
                try:
                    status, data = imap._simple_command("APPEND", mailbox, flags, when)
                finally:
                    imap.literal = None
        return str(status), _response_text(data)

    def _append_batch(self, messages: Sequence[FetchedMessage]) -> tuple[str, str]:
        flags = self._flags()
        mailbox = _quote_mailbox(self.mailbox)
        with self._guard("APPEND", uidl=messages[0].uidl):
            items = [
                _Appended(flags, imaplib.Time2Internaldate(m.internal_date), _literal_safe(m.read_bytes()))
                for m in messages
            ]
            status, data = _append_literal_plus(self._client._imap, mailbox, items)
        return str(status), _response_text(data)

    def _flags(self) -> str | None:
        return r"(\Seen)" if self.mark_seen else None

    def _non_synchronizing(self, size: int) -> bool:
        """RFC 7888: may the literal follow the command at once (no wait for the server's "+")?"""
        if self._literal_plus is None:
            self._literal_plus = bool(self._client.has_capability("LITERAL+"))
            self._literal_minus = bool(self._client.has_capability("LITERAL-"))
        return self._literal_plus or (self._literal_minus and size <= _LITERAL_MINUS_MAX)

    def _append_refused(self, text: str, uidl: str) -> DestinationError:
        if response_code(text) == "TRYCREATE":
            return DestinationRejectedError(
                self._where.say(f"APPEND refused, folder {self.mailbox!r} does not exist: {text}"), uidl=uidl
            )
        error = command_refused(self._where, "APPEND", text)
        error.uidl = uidl
        return error

    def _reference(self, validity: object, uid: object) -> str:
        if validity is None or uid is None:
            return f"imap:{self.folder}"
        return f"imap:{self.folder};UIDVALIDITY={validity};UID={uid}"

    # --- find ---------------------------------------------------------------------------------------------

    def _matching_copy(self, message: FetchedMessage) -> int | None:
        """The UID of our copy of ``message`` in the selected folder, or None: SEARCH by Message-ID or
        stamp, FETCH each candidate's size and stamps, then ``recovery.judge`` (the bytes only where no
        stamp decides)."""
        with self._guard("SEARCH", uidl=message.uidl, refused=_lookup_refused):
            uids: list[int] = sorted(self._client.search(_lookup_criteria(message)))
        if not uids:
            return None
        with self._guard("FETCH", uidl=message.uidl, refused=_lookup_refused):
            found = self._client.fetch(uids, ["RFC822.SIZE", f"BODY.PEEK[HEADER.FIELDS ({STAMP_HEADER})]"])
        start = len(message.stamp_line)
        wanted = Wanted(message.stamp, message.size - start)
        ours: str | None = None  # hashed only for an unstamped copy of the right size
        for uid in uids:
            stored = _stored(found.get(uid, {}))
            verdict = judge(wanted, stored)
            if verdict is Verdict.COMPARE_BYTES:
                assert stored.size is not None
                ours = ours or _stored_sha256(message, start)
                verdict = by_bytes(ours, self._sha256(uid, stored.size, message.uidl))
            if verdict is Verdict.SAME:
                return uid
        return None

    def _sha256(self, uid: int, size: int, uidl: str) -> str | None:
        """SHA-256 of one stored message, fetched in slices (BODY.PEEK leaves \\Seen alone)."""
        digest = hashlib.sha256()
        for offset in range(0, size, _FETCH_SLICE):
            with self._guard("FETCH", uidl=uidl, refused=_lookup_refused):
                response = self._client.fetch([uid], [f"BODY.PEEK[]<{offset}.{_FETCH_SLICE}>"])
            chunk = response.get(uid, {}).get(f"BODY[]<{offset}>".encode())
            if chunk is None:
                return None  # expunged meanwhile
            digest.update(chunk)
        return digest.hexdigest()

    def _guard(
        self, action: str, *, uidl: str | None = None, refused: Refusal = command_refused
    ) -> contextlib.AbstractContextManager[None]:
        if self._client is None:
            raise DestinationConnectError(self._where.say(f"{action}: the session is closed"), uidl=uidl)
        return _driver_errors(self._where, action, uidl=uidl, refused=refused)


def _literal_safe(data: bytes) -> bytes:
    """IMAP literals cannot carry NUL (RFC 3501 §4.3): it becomes 0x80, which is what Dovecot stores for
    it anyway, so the stored bytes (and find()'s hash of them) do not depend on the server."""
    return data.replace(b"\0", b"\x80") if b"\0" in data else data


def _stored_sha256(message: FetchedMessage, start: int = 0) -> str:
    """SHA-256 of the message as APPEND stores it (equal to ``message.sha256`` unless it has NUL bytes),
    from byte ``start`` on."""
    digest = hashlib.sha256()
    for chunk in message.chunks(start=start):
        digest.update(_literal_safe(chunk))
    return digest.hexdigest()


def _stored(items: dict[bytes, Any]) -> Stored:
    """One candidate from FETCH (RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-Pop-Connector-Id)])."""
    fields = next((value for key, value in items.items() if key.upper().startswith(b"BODY[HEADER")), b"")
    size = items.get(b"RFC822.SIZE")
    return Stored(stamps_in(fields or b""), size if isinstance(size, int) else None)


def _inventoried(items: dict[bytes, Any]) -> StoredCopy:
    """One message of an inventory FETCH (RFC822.SIZE, the stamp and Message-ID header fields)."""
    stored = _stored(items)
    fields = next((value for key, value in items.items() if key.upper().startswith(b"BODY[HEADER")), b"")
    found = _MESSAGE_ID_RE.search(fields or b"")
    message_id = found.group(1).decode("utf-8", "replace").strip() if found else None
    return StoredCopy(stamps=stored.stamps, message_id=message_id, size=stored.size)


_MESSAGE_ID_RE = re.compile(rb"^Message-ID:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def _lookup_criteria(message: FetchedMessage) -> bytes:
    """SEARCH for our Message-ID or our stamp: a server may have stored the Message-ID differently (odd
    characters, folding), never the stamp, which is plain ASCII and short."""
    part = _searchable_part(message.message_id)
    by_id = b"HEADER Message-ID " + _quote_search_string(part)
    if message.stamp is None:
        return by_id
    by_stamp = b"HEADER " + STAMP_HEADER.encode("ascii") + b" " + _quote_search_string(message.stamp)
    return by_stamp if not part else b"OR " + by_id + b" " + by_stamp


@dataclass(frozen=True)
class _Appended:
    """One message of an APPEND command: its flags, internal date and literal."""

    flags: str | None
    when: str
    literal: bytes


def _append_literal_plus(imap: Any, mailbox: bytes, items: Sequence[_Appended]) -> tuple[str, list[Any]]:
    """APPEND (several items: MULTIAPPEND) with non-synchronizing literals: command and messages in one
    write, one round trip in all instead of one per literal. imaplib has no API for it, so this uses the
    same internals its own ``_command`` does (tag, send, ``_command_complete``)."""
    for typ in ("OK", "NO", "BAD"):  # as imaplib's _command does, so old codes are not read as new
        imap.untagged_responses.pop(typ, None)
    tag = imap._new_tag()
    imap.tagged_commands[tag] = None
    pieces = [tag + b" APPEND " + mailbox]
    for item in items:
        flags = b" " + item.flags.encode("ascii") if item.flags else b""
        pieces.append(flags + b" " + item.when.encode("ascii") + b" {%d+}\r\n" % len(item.literal))
        pieces.append(item.literal)
    pieces.append(b"\r\n")
    if sum(len(item.literal) for item in items) <= _ONE_WRITE_MAX:
        imap.send(b"".join(pieces))
    else:  # no second copy of large messages; full segments, so no Nagle delay either
        for piece in pieces:
            imap.send(piece)
    typ, data = imap._command_complete("APPEND", tag)
    return str(typ), data


def _appended_uids(text: str, count: int) -> tuple[str, list[str]] | None:
    """UIDVALIDITY and the UIDs of ``count`` messages from a (MULTI)APPEND's APPENDUID code, in order."""
    match = _APPENDUID_RE.search(text)
    if match is None:
        return None
    uids: list[str] = []
    for part in match.group(2).split(","):
        low, _, high = part.partition(":")
        if not low.isdigit() or not (high or low).isdigit():
            return None
        first, last = sorted((int(low), int(high or low)))
        if last - first + 1 > count - len(uids):  # a server's slip must not make us count to 2**32
            return None
        uids += [str(uid) for uid in range(first, last + 1)]
    return (match.group(1), uids) if len(uids) == count else None


def _present(flags: tuple[bytes, ...] | None) -> bool:
    """LIST answered for the name, and not just because a child exists (\\NonExistent, RFC 5258)."""
    return flags is not None and b"\\nonexistent" not in flags


def _text(value: object) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class MasterUser:
    """Credentials of a master user (Dovecot master users, Cyrus proxy servers) who logs in as any user.

    ``style`` "sasl": AUTHENTICATE PLAIN with the target user as authorisation identity (RFC 4616);
    "separator": LOGIN "<user><separator><master>" (Dovecot's ``auth_master_user_separator``).
    """

    username: str
    password: str
    style: str = "sasl"
    separator: str = "*"


def open_imap(
    *,
    host: str,
    port: int,
    tls: TlsMode,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
    username: str,
    password: str | None,
    folder: str,
    mark_seen: bool,
    create_folder: bool = True,
    multiappend: bool = True,
    token_provider: TokenProvider | None = None,
    master: MasterUser | None = None,
) -> ImapSession:
    """Connect, secure and log in; the one place an IMAP destination connection is built.

    ``ssl_context`` defaults to a verifying context (``connector.tls.make_ssl_context``). With
    ``tls="starttls"`` a server that does not offer STARTTLS is refused, never used in clear text.
    With a ``token_provider`` the login is AUTHENTICATE XOAUTH2 as ``username`` instead of LOGIN; with a
    ``master`` user it is the master's login on behalf of ``username`` (``password`` is not used).
    """
    where = Where(host, port, folder)
    # Loading the system's CA store costs ~35 ms: not for a plain connection that never uses it.
    context = ssl_context if ssl_context is not None or tls == "none" else make_ssl_context()
    client = _connect(where, tls, context, timeout)
    try:
        if tls == "starttls":
            assert context is not None
            _starttls(client, where, context)
        if master is not None:
            _login_as(client, where, username, master)
        elif token_provider is not None:
            _login_oauth2(client, where, username, token_provider)
        else:
            assert password is not None, "a password or a token provider is needed"
            _login(client, where, username, password)
    except BaseException:
        _discard(client)
        raise
    return ImapSession(
        client,
        host=host,
        port=port,
        folder=folder,
        mark_seen=mark_seen,
        create_folder=create_folder,
        multiappend=multiappend,
    )


class _NotImapError(Exception):
    """The server's first line is no IMAP greeting (imaplib says only ``None`` for a POP3 "+OK ...")."""

    def __init__(self, line: bytes) -> None:
        super().__init__(line)
        self.line = line


class _Imap4(imaplib.IMAP4):
    """imaplib's connection (plain, or TLS from the start), keeping the server's first line so that a
    greeting that is not IMAP can be reported as what it is."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, timeout: float | None) -> None:
        self._context = context
        self._first_line: bytes | None = None
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        return sock if self._context is None else wrap_socket(sock, self._context, self.host)

    def _get_line(self) -> bytes:
        line: bytes = super()._get_line()  # type: ignore[misc]
        if self._first_line is None:
            self._first_line = line
        return line

    def _connect(self) -> None:
        try:
            super()._connect()  # type: ignore[misc]
        except imaplib.IMAP4.error as exc:
            # "* BYE ..." is an IMAP server turning us away (busy); anything else is no IMAP server.
            if self._first_line is not None and not self._first_line.startswith(b"* "):
                raise _NotImapError(self._first_line) from exc
            raise


class _Client(IMAPClient):  # type: ignore[misc]
    def _create_IMAP4(self) -> imaplib.IMAP4:  # imapclient builds its imaplib connection here
        connect_timeout = getattr(self._timeout, "connect", None)
        context = (self.ssl_context or make_ssl_context()) if self.ssl else None
        return _Imap4(self.host, self.port, context, connect_timeout)


def _not_imap(where: Where, line: bytes) -> DestinationError:
    text = clip_server_text(line.decode("utf-8", "replace").strip())
    hint = "a POP3 server's greeting: is this the POP3 port? " if text.startswith("+OK") else ""
    return DestinationConnectError(
        where.say(
            f"connect: the server's greeting {text!r} does not look like IMAP ({hint}IMAP is port 143, "
            "or 993 with TLS)"
        )
    )


def _connect(where: Where, tls: TlsMode, context: ssl.SSLContext | None, timeout: float) -> Any:
    implicit = tls == "implicit"
    try:
        with _driver_errors(where, "connect", refused=_connect_refused):
            return _Client(
                where.host,
                port=where.port,
                ssl=implicit,
                ssl_context=context if implicit else None,
                timeout=timeout,
            )
    except _NotImapError as exc:
        raise _not_imap(where, exc.line) from exc
    except DestinationConnectError as exc:
        if implicit:
            exc.message += plain_text_hint(exc.__cause__, where.port, tls_port=993)
        raise


def _starttls(client: Any, where: Where, context: ssl.SSLContext) -> None:
    with _driver_errors(where, "STARTTLS", refused=_tls_refused):
        offered = client.has_capability("STARTTLS")
    if not offered:
        raise DestinationTLSError(where.say("the server does not offer STARTTLS; not continuing without TLS"))
    with _driver_errors(where, "STARTTLS", refused=_tls_refused):
        client.starttls(context)


def _login(client: Any, where: Where, username: str, password: str) -> None:
    action = f"LOGIN as {username!r}"
    if not (username.isascii() and password.isascii()):
        # imaplib sends LOGIN arguments as ASCII quoted strings; it would fail with a bare UnicodeError.
        raise DestinationAuthError(where.say(f"{action}: user name and password must be ASCII for LOGIN"))
    with _driver_errors(where, action, refused=_login_refused, secret=password):
        client.login(username, password)


def _login_as(client: Any, where: Where, username: str, master: MasterUser) -> None:
    """Log in to ``username``'s mailbox with the master user's password."""
    if master.style == "separator":
        _login(client, where, f"{username}{master.separator}{master.username}", master.password)
        return
    action = f"AUTHENTICATE PLAIN as {master.username!r} for {username!r}"
    with _driver_errors(where, action, refused=_login_refused, secret=master.password):
        client.plain_login(master.username, master.password, authorization_identity=username)


class _XOAuth2:
    """The XOAUTH2 exchange as imaplib wants it: called with each decoded server challenge.

    The first (empty) challenge gets the response; a second one is the server's error JSON, which SASL
    says to answer with an empty response before the server sends its tagged NO.
    """

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._sent = False
        self.error: str | None = None

    def __call__(self, challenge: bytes) -> bytes:
        if not self._sent:
            self._sent = True
            return self._response
        self.error = describe_sasl_json(challenge)
        return b""


def _login_oauth2(client: Any, where: Where, username: str, provider: TokenProvider) -> None:
    action = f"AUTHENTICATE XOAUTH2 as {username!r}"

    def authenticate(token: str) -> None:
        try:
            mechanism = _XOAuth2(xoauth2_response(username, token))
        except ValueError as exc:
            raise DestinationAuthError(where.say(f"{action}: {exc}")) from None
        try:
            with _driver_errors(where, action, refused=_login_refused, secret=token):
                client.sasl_login("XOAUTH2", mechanism)
        except DestinationAuthError as exc:
            if mechanism.error:
                exc.message += f" (server said: {mechanism.error})"
            raise

    try:
        login_with_token(provider, authenticate, DestinationAuthError)
    except OAuthError as exc:
        error_type = DestinationAuthError if isinstance(exc, OAuthRefusedError) else DestinationConnectError
        raise error_type(where.say(f"{action}: no OAuth token: {exc.message}")) from exc


def _discard(client: Any) -> None:
    with contextlib.suppress(IMAPClientError, OSError, ValueError):
        client.shutdown()
