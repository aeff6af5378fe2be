"""EWS destination (exchangelib): each message goes in as its raw MIME with CreateItem, as received mail.

Exchange turns ``CreateItem`` with ``MimeContent`` into an item, but on its own the item looks like an
unsent draft dated at import time. Three MAPI properties are set at creation so that Outlook shows it as
received mail: PidTagMessageFlags (0x0E07: the read flag per ``mark_seen``, never MSGFLAG_UNSENT),
PidTagMessageDeliveryTime (0x0E06, the received time: newest ``Received:``, else ``Date:``) and
PidTagClientSubmitTime (0x0039, the sent time: ``Date:``).

``open_ews`` is the only place a session is built. Everything exchangelib, requests and oauthlib raise is
translated (``ews_errors``) into the project's ``DestinationError`` types, naming the endpoint, mailbox
and folder, never a secret; ``ews_connection`` shares one connection pool per endpoint and login.
Throttling (``ErrorServerBusy`` with BackOffMilliseconds, HTTP 503 with Retry-After) is waited out and
counted here; when the server stays busy the session gives up with a temporary error, so the account
backs off instead of failing its messages.

Several messages may go in one ``CreateItem`` (``deliver_many``, up to the destination's
``create_batch``): Exchange answers one response message per item, in order, so each item is created,
stamped and referenced on its own, and the ledger keeps one row per message as for single deliveries.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zoneinfo
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from exchangelib import DELEGATE, IMPERSONATION, Account, Message
from exchangelib import errors as ews_errors
from exchangelib.ewsdatetime import EWSDateTime, EWSTimeZone
from exchangelib.extended_properties import ExtendedProperty
from exchangelib.folders import Messages
from exchangelib.items import SAVE_ONLY, SEND_TO_NONE
from exchangelib.services import CreateFolder, CreateItem

from connector.config import DEFAULT_EWS_CREATE_BATCH, EwsDestination
from connector.destinations.base import clip_server_text
from connector.destinations.ews_connection import CONFIGURATIONS, describe, secret_of
from connector.destinations.ews_errors import DRIVER_ERRORS, FOLDER_GONE, Where, translate
from connector.errors import (
    DestinationConnectError,
    DestinationRejectedError,
    DestinationTempError,
    DestinationTooLargeError,
)
from connector.message import FetchedMessage
from connector.policies.reconcile import StoredCopy

# Items per FindItem page of an inventory (``reconcile``).
INVENTORY_BATCH = 1000
log = logging.getLogger("connector.destinations.ews")
# One line per EWS request and its outcome, for protocol logs (connector.ops.protocol_log); not the SOAP
# itself:
# exchangelib's own DEBUG output carries request headers, which hold credentials with Basic auth.
wire = logging.getLogger("connector.ews.wire")

FOLDER_SEPARATOR = "/"
# How often one request is retried after ErrorServerBusy / 503 before the session gives up (temporary).
BUSY_RETRIES = 4
# A back-off longer than this is not waited out inside a poll: the account backs off instead.
MAX_BUSY_WAIT = 300.0
_UTC = zoneinfo.ZoneInfo("UTC")
# Dates are sent in UTC whatever the host's zone is (containers often have none exchangelib can map).
_EWS_UTC = EWSTimeZone("UTC")
# PidTagMessageFlags bit: MSGFLAG_READ. MSGFLAG_UNSENT (0x8) is never set, so the item is not a draft.
MSGFLAG_READ = 0x1
# MIME bytes one batched CreateItem may carry. The request carries them in base64 (4/3 of the size) plus
# the item XML, and Exchange 2013-2019 take EWS requests of up to 64 MiB (maxAllowedContentLength and
# maxReceivedMessageSize in the EWS web.config, docs/exchange.md): 32 MiB of MIME stays well below that.
# The poll's batches are smaller still (connector/poll/pipeline.py BATCH_BYTES); a larger one goes one
# message per request.
BATCH_REQUEST_BYTES = 32 * 1024 * 1024

T = TypeVar("T")


# --- the properties set at creation ---------------------------------------------------------------------


class MessageFlags(ExtendedProperty):  # type: ignore[misc]
    property_tag = 0x0E07
    property_type = "Integer"


class MessageDeliveryTime(ExtendedProperty):  # type: ignore[misc]
    property_tag = 0x0E06
    property_type = "SystemTime"


class ClientSubmitTime(ExtendedProperty):  # type: ignore[misc]
    property_tag = 0x0039
    property_type = "SystemTime"


class ConnectorSha256(ExtendedProperty):  # type: ignore[misc]
    """Our own named property: the SHA-256 of the MIME bytes we sent, so ``find`` can compare content."""

    property_set_id = "6f2c6c2e-8f57-4a35-9b0e-5c1a3f0e7d41"
    property_name = "PopConnectorSha256"
    property_type = "String"


_PROPERTIES = {
    "pop_connector_flags": MessageFlags,
    "pop_connector_delivery_time": MessageDeliveryTime,
    "pop_connector_submit_time": ClientSubmitTime,
    "pop_connector_sha256": ConnectorSha256,
}
_register_lock = threading.Lock()


def _register_properties() -> None:
    """Register the properties on exchangelib's Message once per process (registration is class-wide)."""
    with _register_lock:
        registered = {field.name for field in Message.FIELDS}
        for name, cls in _PROPERTIES.items():
            if name not in registered:
                Message.register(name, cls)


_register_properties()

# Only these go into CreateItem: exchangelib would otherwise send its defaults for Importance,
# Sensitivity, IsReadReceiptRequested ..., overriding what the MIME headers say.
_CREATE_FIELDS = frozenset({"mime_content", "is_read", *_PROPERTIES})


class _MimeMessage(Message):  # type: ignore[misc]
    @classmethod
    def supported_fields(cls, version: Any) -> tuple[Any, ...]:
        return tuple(f for f in super().supported_fields(version) if f.name in _CREATE_FIELDS)


class _CreateEach(CreateItem):  # type: ignore[misc]
    """``CreateItem`` for a batch: every failed or warning response message comes back as an exception
    instance in its item's place. exchangelib's own ``CreateItem`` raises the first error it does not
    list in the middle of the answer, which would hide which of the other items were created (and its
    retry loop would then send the whole request again, creating them twice)."""

    ERRORS_TO_CATCH_IN_RESPONSE = ews_errors.EWSError
    WARNINGS_TO_CATCH_IN_RESPONSE = ews_errors.EWSError


# --- the session ----------------------------------------------------------------------------------------


def folder_levels(folder: str) -> list[str]:
    """``"Inbox/Hosted/2025"`` -> ``["Hosted", "2025"]``: the levels under the Inbox (checked by config)."""
    parts = [part for part in folder.split(FOLDER_SEPARATOR) if part]
    return parts[1:]


def _ews_time(value: datetime) -> EWSDateTime:
    return EWSDateTime.from_datetime(value.astimezone(_UTC))


class EwsSession:
    """Delivers into one folder of one mailbox (a ``DestinationSession``).

    ``throttled`` counts how often the server asked us to back off during this session.
    """

    def __init__(
        self,
        account: Any,
        *,
        where: Where,
        mark_seen: bool,
        max_message_size: int,
        create_batch: int = DEFAULT_EWS_CREATE_BATCH,
        secrets: tuple[str, ...] = (),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._account = account
        self._where = where
        self.mark_seen = mark_seen
        self.max_message_size = max_message_size
        self.create_batch = create_batch
        self._secrets = secrets
        self._sleep = sleep
        self._folder: Any = None
        self.throttled = 0

    # --- DestinationSession ---------------------------------------------------------------------------

    def max_batch(self) -> int:
        """Messages one ``CreateItem`` may carry: the destination's ``create_batch``."""
        return self.create_batch

    def deliver_many(self, messages: Sequence[FetchedMessage]) -> list[str] | None:
        """One ``CreateItem`` (SaveOnly) of every message, each its own item with its own SHA-256 stamp;
        returns their references in order when Exchange created all of them.

        Exchange answers one response message per item, in order, and creates the items it can: a batch is
        not atomic. So:

        * every item created: the references, in order;
        * nothing created (the request refused as a whole, or every item refused), or nothing sent (a
          message is over ``max_message_size``, or the batch over ``BATCH_REQUEST_BYTES``): None, and the
          poll delivers them one by one, so that the message at fault is refused alone and named, and its
          batch-mates go in;
        * some created and others not, or an answer that does not account for every item: a temporary
          ``DestinationTempError`` saying so. The poll then stops delivering and every message of the
          batch stays recorded as not delivered, with its row: the next poll looks each one up (``find``,
          by the SHA-256 stamp) before delivering it again, so the created ones are recorded as recovered
          and only the others are created. Exactly once holds without telling them apart here.

        Any other failure (no connection, login, TLS, a server that stays busy) raises as ``deliver``
        does; a request that was never answered leaves the batch to the same lookups.
        """
        if len(messages) == 1:
            return [self.deliver(messages[0])]
        if any(message.size > self.max_message_size for message in messages):
            return None  # nothing sent: one by one, the oversized one is refused alone
        if sum(message.size for message in messages) > BATCH_REQUEST_BYTES:
            return None
        uidls = f"{len(messages)} messages, {messages[0].uidl} to {messages[-1].uidl}"
        folder = self._call("find the folder", lambda: self._resolve_folder(create=True), messages[0].uidl)
        items = [self._item(folder, message) for message in messages]
        try:
            answer = self._call(f"CreateItem ({uidls})", lambda: self._create_each(folder, items), None)
        except DestinationRejectedError as exc:
            # Refused as a whole before anything was created (impersonation, access, the folder gone):
            # one by one, each message meets the refusal (or the folder is made again) on its own.
            log.info("%s", self._where.say(f"the batch was refused ({exc.message}); one message at a time"))
            return None
        results, broke_off = answer
        created = [result for result in results if not isinstance(result, Exception)]
        if broke_off is None and len(results) == len(messages) and len(created) == len(messages):
            return [self._reference(getattr(result, "id", None)) for result in results]
        if broke_off is None and not created and len(results) in (1, len(messages)):
            first = next(result for result in results if isinstance(result, Exception))
            refusal = self._redacted(f"{type(first).__name__}: {first}")
            log.info("%s", self._where.say(f"every item of the batch was refused ({refusal}); one at a time"))
            return None
        failures = [
            f"message {message.uidl}: {type(result).__name__}: {result}"
            for message, result in zip(messages, results, strict=False)
            if isinstance(result, Exception)
        ]
        if broke_off is not None:
            failures.append(f"the answer broke off: {type(broke_off).__name__}: {broke_off}")
        elif len(results) != len(messages):
            failures.append(f"the answer covered {len(results)} of {len(messages)} items")
        detail = clip_server_text(self._redacted("; ".join(failures)))
        raise DestinationTempError(
            self._where.say(
                f"CreateItem ({uidls}): {len(created)} of {len(messages)} items created, the others not "
                f"or not known ({detail}); every message of the batch stays pending and is looked up "
                "before it is delivered again"
            )
        )

    def deliver(self, message: FetchedMessage) -> str:
        """CreateItem (SaveOnly) with the raw MIME; returns ``ews:<mailbox>/<folder>;ItemId=<id>``."""
        if message.size > self.max_message_size:
            # Exchange would refuse it after we uploaded it all; the engine quarantines it at once and it
            # stays on the POP3 server.
            raise DestinationTooLargeError(
                self._where.say(
                    f"message is {message.size} bytes, larger than this destination's max_message_size of "
                    f"{self.max_message_size} bytes: not sent (raise max_message_size if the server takes it)"
                ),
                uidl=message.uidl,
            )
        try:
            return self._create(message)
        except DestinationRejectedError as exc:
            if not isinstance(exc.__cause__, FOLDER_GONE):
                raise
        # Someone deleted the folder since this session found it: find or make it again, once.
        log.info("%s", self._where.say("the folder is gone; creating it again"))
        self._folder = None
        return self._create(message)

    def _create(self, message: FetchedMessage) -> str:
        folder = self._call("find the folder", lambda: self._resolve_folder(create=True), message.uidl)
        item = self._item(folder, message)
        result = self._call(
            "CreateItem",
            lambda: CreateItem(account=self._account).get(
                items=[item],
                folder=folder,
                message_disposition=SAVE_ONLY,
                send_meeting_invitations=SEND_TO_NONE,
            ),
            message.uidl,
        )
        return self._reference(getattr(result, "id", None))

    def _create_each(self, folder: Any, items: Sequence[_MimeMessage]) -> tuple[list[Any], Exception | None]:
        """One CreateItem of ``items``: (one result per response message, an item or an exception
        instance; the error that cut the answer short after some results, if any).

        Every error response message is a result (``_CreateEach``), so an error raised before the first
        result is about the request as a whole (transport, SOAP fault, a busy server): it is raised, for
        ``_call`` to wait out (nothing was created) or translate. An error after a result is returned
        instead: items were created, so the request must never be sent again."""
        results: list[Any] = []
        answer = _CreateEach(account=self._account).call(
            items=items,
            folder=folder,
            message_disposition=SAVE_ONLY,
            send_meeting_invitations=SEND_TO_NONE,
        )
        try:
            for result in answer:
                results.append(result)
        except DRIVER_ERRORS as exc:
            if not results:
                raise
            return results, exc
        return results, None

    def find(self, message: FetchedMessage) -> str | None:
        """After a crash: an item in the folder with the same InternetMessageId and SHA-256, or None.

        What EWS can compare: InternetMessageId (a FindItem restriction). What it cannot: the item's Size is
        the store's size of the item (MAPI properties, converted body and attachments), not the size of the
        MIME we sent, and the MimeContent that GetItem returns is regenerated by Exchange's content
        conversion, never our bytes, so hashing it would never match. So ``deliver`` stamps each item with a
        named property holding the SHA-256 of what was sent, and that (which covers the size) is compared.
        Items not created by the connector have no stamp and never match. Should Exchange have parsed the
        Message-ID differently from us (odd characters, folding), a second FindItem looks for the stamp
        itself, so a recovery never creates a second copy. A FindItem that fails raises (a
        ``DestinationError``), never returns None: the engine then stops the poll (``base.look_up``).
        """
        folder = self._call("find the folder", lambda: self._resolve_folder(create=False), message.uidl)
        if folder is None:
            return None
        for criteria in ({"message_id": message.message_id}, {"pop_connector_sha256": message.sha256}):
            candidates = self._call("FindItem", _searcher(folder, criteria), message.uidl)
            for item in candidates:
                if getattr(item, "pop_connector_sha256", None) == message.sha256:
                    return self._reference(item.id)
        return None

    def inventory(self, batch: int = INVENTORY_BATCH) -> Iterator[StoredCopy]:
        """Every item in the folder with its Message-ID and the SHA-256 property ``deliver`` stamped it
        with (items not created by the connector have none), in FindItem pages of ``batch`` (for
        ``pop-connector reconcile``). Read-only."""
        folder = self._call("find the folder", lambda: self._resolve_folder(create=False), None)
        if folder is None:
            return
        offset = 0
        while True:
            page = self._call("FindItem", _page(folder, offset, batch), None)
            for item in page:
                yield StoredCopy(
                    message_id=getattr(item, "message_id", None),
                    sha256=getattr(item, "pop_connector_sha256", None),
                )
            if len(page) < batch:
                return
            offset += batch

    def check(self) -> str:
        """Log in, open the mailbox, look for the folder (writing nothing); says what it found."""
        missing: list[str] = []
        self._call("open the folder", lambda: self._resolve_folder(create=False, missing=missing), None)
        found = f"mailbox {self._where.mailbox!r}, folder {self._where.folder!r}"
        if not missing:
            return f"{found} exists"
        return f"{found} does not exist; the first delivery creates {', '.join(missing)}"

    def close(self) -> None:
        # The HTTP connections belong to the shared per-endpoint pool, which outlives this session.
        self._account = None
        self._folder = None

    def __enter__(self) -> EwsSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------------------

    def _item(self, folder: Any, message: FetchedMessage) -> _MimeMessage:
        flags = MSGFLAG_READ if self.mark_seen else 0
        submitted = message.headers.date or message.internal_date
        return _MimeMessage(
            account=self._account,
            folder=folder,
            mime_content=message.read_bytes(),
            is_read=self.mark_seen,
            pop_connector_flags=flags,
            pop_connector_delivery_time=_ews_time(message.internal_date),
            pop_connector_submit_time=_ews_time(submitted),
            pop_connector_sha256=message.sha256,
        )

    def _redacted(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _reference(self, item_id: object) -> str:
        base = f"ews:{self._where.mailbox}/{self._where.folder}"
        return f"{base};ItemId={item_id}" if item_id else base

    def _resolve_folder(self, *, create: bool, missing: list[str] | None = None) -> Any:
        """The target folder (``Inbox`` and levels under it, each found with one shallow FindFolder).

        With ``create`` missing levels are created; without, None is returned and ``missing`` lists them.
        """
        if self._folder is not None:
            return self._folder
        if self._account is None:
            raise DestinationConnectError(self._where.say("the session is closed"))
        folder = self._account.inbox
        levels = folder_levels(self._where.folder)
        for index, name in enumerate(levels):
            child = _child(folder, name)
            if child is None and not create:
                if missing is not None:
                    missing.extend(levels[index:])
                return None
            folder = child if child is not None else self._create_child(folder, name)
        self._folder = folder
        return folder

    def _create_child(self, parent: Any, name: str) -> Any:
        log.info("%s", self._where.say(f"creating folder {name!r}"))
        with contextlib.suppress(ews_errors.ErrorFolderExists):  # another account made it meanwhile
            CreateFolder(account=self._account).get(
                parent_folder=parent, folders=[Messages(parent=parent, name=name)]
            )
        created = _child(parent, name)
        if created is None:
            raise ews_errors.ErrorFolderNotFound(f"folder {name!r} is missing right after it was created")
        return created

    def _call(self, action: str, work: Callable[[], T], uidl: str | None) -> T:
        """Run ``work``, waiting out what the server asks (ErrorServerBusy, 503 + Retry-After), translating
        every failure into a ``DestinationError``."""
        for attempt in range(BUSY_RETRIES + 1):
            wire.debug("%s", self._where.say(f"> {action}" + (f" (message {uidl})" if uidl else "")))
            try:
                result = work()
                wire.debug("%s", self._where.say(f"< {action}: success"))
                return result
            except ews_errors.ErrorServerBusy as exc:
                wait = exc.back_off
                if wait is None or wait > MAX_BUSY_WAIT or attempt == BUSY_RETRIES:
                    raise self._busy(action, exc, uidl) from exc
                self.throttled += 1
                log.warning(
                    "%s",
                    self._where.say(
                        f"{action}: server busy, waiting {wait:g}s as it asks (throttled "
                        f"{self.throttled} times in this session)"
                    ),
                )
                self._sleep(wait)
            except DRIVER_ERRORS as exc:
                error = translate(exc, self._where, action, self._secrets)
                error.uidl = uidl
                wire.debug("%s", self._where.say(f"< {action}: {error.message}"))
                raise error from exc
        raise AssertionError("unreachable")

    def _busy(self, action: str, exc: ews_errors.ErrorServerBusy, uidl: str | None) -> DestinationTempError:
        wait = f"; it asked for {exc.back_off:g}s more" if exc.back_off else ""
        return DestinationTempError(
            self._where.say(
                f"{action}: server still busy after {self.throttled} back-offs{wait}; the account backs off"
            ),
            uidl=uidl,
        )


def _searcher(folder: Any, criteria: dict[str, str]) -> Callable[[], list[Any]]:
    """A FindItem in ``folder`` (equality on ``criteria``) fetching only what ``find`` compares.

    exchangelib hands some failed response messages over as exception instances among the results
    instead of raising them: those are raised here, so that a lookup that failed is never read as "no
    such item" (which would create the item a second time)."""

    def search() -> list[Any]:
        found = list(folder.filter(**criteria).only("id", "message_id", "pop_connector_sha256"))
        for item in found:
            if isinstance(item, Exception):
                raise item
        return found

    return search


def _page(folder: Any, offset: int, size: int) -> Callable[[], list[Any]]:
    """One page of a FindItem over the whole folder, fetching only what an inventory reads (raising the
    failed response messages that exchangelib hands over among the results, as ``_searcher`` does)."""

    def page() -> list[Any]:
        query = folder.all().only("message_id", "pop_connector_sha256")
        found = list(query[offset : offset + size])
        for item in found:
            if isinstance(item, Exception):
                raise item
        return found

    return page


def _child(parent: Any, name: str) -> Any:
    """A direct child by name, with one shallow FindFolder (``/`` would walk the whole tree first)."""
    try:
        return parent // name
    except ews_errors.ErrorFolderNotFound:
        return None


def open_ews(
    destination: EwsDestination,
    *,
    mailbox: str,
    folder: str,
    mark_seen: bool,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> EwsSession:
    """Build a session for ``mailbox``; the server is first contacted by the first deliver/find/check.

    ``destination`` carries the login (connections.py puts an account's own login in it). With
    ``version`` set no version probe is sent.
    """
    where = Where(describe(destination), mailbox, folder)
    secrets = tuple(s for s in (secret_of(destination.password), secret_of(destination.client_secret)) if s)
    try:
        config = CONFIGURATIONS.get(destination)
        account = Account(
            primary_smtp_address=mailbox,
            config=config,
            autodiscover=destination.autodiscover,
            credentials=config.credentials if destination.autodiscover else None,
            access_type=IMPERSONATION if destination.impersonation else DELEGATE,
            default_timezone=_EWS_UTC,
            locale="en_US",
        )
        # Requests of this endpoint wait this long for an answer (the Protocol is shared; the last set wins).
        account.protocol.TIMEOUT = timeout
    except DRIVER_ERRORS as exc:
        raise translate(exc, where, "connect", secrets) from exc
    return EwsSession(
        account,
        where=where,
        mark_seen=mark_seen,
        max_message_size=destination.max_message_size,
        create_batch=destination.create_batch,
        secrets=secrets,
        sleep=sleep,
    )
