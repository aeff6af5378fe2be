"""A wire-faithful Exchange Web Services test server (HTTPS on 127.0.0.1), answering as Exchange 2016 would.

No Exchange can run here, so this speaks the part of EWS SOAP that the connector's flows use, closely
enough for the real exchangelib client: it dispatches on the first child element of the SOAP Body (EWS
clients send no SOAPAction header), puts ``t:ServerVersionInfo`` in every answer's header, and answers
``GetFolder``, ``FindFolder``, ``CreateFolder``, ``FindItem``, ``GetItem``, ``CreateItem``,
``ResolveNames`` and ``ConvertId`` (exchangelib's version probe). Logins are HTTP Basic (``users``) or
OAuth 2.0 bearer tokens issued by its own ``/token`` endpoint (client credentials).

It keeps what it was given so that tests can assert it: each created item with its decoded MIME content,
target mailbox (from the ``ExchangeImpersonation`` header or the login), folder path and extended
properties. Faults can be queued: ErrorServerBusy with BackOffMilliseconds, any HTTP status (503 with
Retry-After, 401), "drop the connection after doing the work" (a timeout after the item was created), and
one failed item in a CreateItem of several (the others are created, or, as with ErrorBatchProcessingStopped,
not processed). A CreateItem of several items is answered as Exchange does: one response message per item,
in order, each item created or refused on its own. ``delays`` slows an operation down (a far server).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import secrets
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

import spnego
import spnego.exceptions

from tests.delivery import without_stamp
from tests.servers.dovecot import make_test_ca

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
EWS_PATH = "/EWS/Exchange.asmx"
TOKEN_PATH = "/token"
# Exchange 2016 CU23 as it introduces itself.
SERVER_VERSION = (
    f'<h:ServerVersionInfo xmlns:h="{T}" MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507" '
    'MinorBuildNumber="6" Version="V2017_07_11"/>'
)


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


@dataclass
class Folder:
    id: str
    name: str
    mailbox: str
    parent: Folder | None
    folder_class: str = "IPF.Note"
    children: list[Folder] = field(default_factory=list)

    @property
    def path(self) -> str:
        """Path from the Inbox's level, e.g. ``Inbox/Hosted`` (root and top of the store left out)."""
        parts: list[str] = []
        folder: Folder | None = self
        while folder is not None and folder.parent is not None and folder.parent.parent is not None:
            parts.append(folder.name)
            folder = folder.parent
        return "/".join(reversed(parts))


@dataclass
class StoredItem:
    """One created item. ``mime`` is its MIME content less the connector's ``X-Pop-Connector-Id`` stamp
    line (README, "What changes in a delivered message"), for comparing with what was sent; ``stored_mime``
    is every byte."""

    id: str
    mailbox: str
    folder: Folder
    mime: bytes
    is_read: bool | None
    # Tagged properties by tag (0x0E07 -> "1"), named ones by (property set id, name).
    properties: dict[object, str]
    created_by: str
    stored_mime: bytes = b""

    @property
    def message_id(self) -> str | None:
        value = BytesHeaderParser(policy=compat32).parsebytes(self.mime).get("Message-ID")
        return None if value is None else " ".join(str(value).split())

    def tag(self, tag: int) -> str | None:
        return self.properties.get(tag)


@dataclass
class Request:
    op: str
    login: str
    impersonated: str | None
    xml: bytes


@dataclass
class Fault:
    """One queued failure for the next request of ``op`` ("*" for any)."""

    op: str
    kind: str  # busy | http | drop_after | error | item_error
    back_off_ms: int = 0
    status: int = 500
    retry_after: int | None = None
    # kind "error": the operation answers one response message with ResponseClass="Error" and this code.
    code: str = "ErrorInternalServerTransientError"
    text: str = "An internal server error occurred. Try again later."
    # kind "item_error" (CreateItem only): the request's item at this position (from 1) answers an error
    # response message with ``code`` and ``text``; with ``stop`` the items after it are not processed
    # (ErrorBatchProcessingStopped), else they are created. Left queued for requests with fewer items.
    item: int = 0
    stop: bool = False


class EwsError(Exception):
    """An EWS error answered in the response message (ResponseClass="Error")."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class SoapFault(EwsError):
    """An EWS error answered as a SOAP fault with HTTP 500 (impersonation and throttling errors)."""


class _DropConnection(Exception):
    pass


class EwsServer:
    """``with EwsServer() as ews:`` ... ``ews.service_endpoint``, ``ews.ca_file``, ``ews.items(...)``."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="ews-test-")
        self.ca_file, cert, key = make_test_ca(Path(self._dir.name))
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(cert), str(key))
        self.users: dict[str, str] = {}
        self.impersonators: set[str] = set()
        self.clients: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        self.mailboxes: dict[str, Folder] = {}
        self.folders: dict[str, Folder] = {}
        self.stored: list[StoredItem] = []
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.max_item_size: int | None = None
        # Seconds each request of an operation waits before it is answered ("CreateItem" -> 0.1).
        self.delays: dict[str, float] = {}
        self._ntlm_file = Path(self._dir.name) / "ntlm-users"
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.socket = self._context.wrap_socket(self._httpd.socket, server_side=True)
        # serve_forever notices shutdown() only between polls: its default of 0.5 s made every stop (one per
        # test) wait that long.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="ews-test", daemon=True
        )

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> EwsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._dir.cleanup()

    def __enter__(self) -> EwsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def service_endpoint(self) -> str:
        return self.base_url + EWS_PATH

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    # --- set-up -------------------------------------------------------------------------------------------

    def add_user(self, login: str, password: str, *, impersonation: bool = False) -> None:
        """A login (an address gets its own mailbox); ``impersonation``: the ApplicationImpersonation role.

        ``DOMAIN\\user`` or ``user@domain`` logins work with Basic and with NTLM.
        """
        self.users[login] = password
        if impersonation:
            self.impersonators.add(login)
        if "@" in login:
            self.add_mailbox(login)
        self._write_ntlm_users()

    def _write_ntlm_users(self) -> None:
        # pyspnego's NTLM acceptor reads its users from the file NTLM_USER_FILE names (DOMAIN:USER:PASSWORD).
        lines = []
        for login, password in self.users.items():
            domain, _, user = login.rpartition("\\")
            lines.append(f"{domain}:{user}:{password}\n")
        self._ntlm_file.write_text("".join(lines))
        os.environ["NTLM_USER_FILE"] = str(self._ntlm_file)

    def add_client(self, client_id: str, secret: str) -> None:
        """An application (client credentials) allowed to impersonate every mailbox, as Exchange grants it."""
        self.clients[client_id] = secret
        self.impersonators.add(client_id)

    def add_mailbox(self, address: str) -> None:
        with self._lock:
            if address.lower() in self.mailboxes:
                return
            root = self._new_folder("", address.lower(), None, "")
            top = self._new_folder("Top of Information Store", address.lower(), root, "IPF.Note")
            self._new_folder("Inbox", address.lower(), top, "IPF.Note")
            self.mailboxes[address.lower()] = root

    def delete_folder(self, mailbox: str, path: str) -> None:
        """Remove a folder (and what is in it), as a user would in Outlook."""
        with self._lock:
            folder = next(f for f in self.folders.values() if f.mailbox == mailbox.lower() and f.path == path)
            assert folder.parent is not None
            folder.parent.children.remove(folder)
            del self.folders[folder.id]
            self.stored = [item for item in self.stored if item.folder is not folder]

    def fail(self, op: str, kind: str, *, times: int = 1, **kwargs: Any) -> None:
        """Queue ``times`` failures for ``op``: ``busy`` (back_off_ms), ``http`` (status, retry_after),
        ``drop_after`` (do the work, then close the connection without answering), ``error`` (an error
        response message with ``code`` and ``text``, HTTP 200, as Exchange answers a failed FindItem),
        ``item_error`` (CreateItem: the item at position ``item`` of the next request carrying that many
        fails with ``code``; ``stop``: the items after it are not processed)."""
        with self._lock:
            self.faults.extend(Fault(op, kind, **kwargs) for _ in range(times))

    # --- what tests assert ----------------------------------------------------------------------------------

    def items(self, mailbox: str | None = None, folder: str | None = None) -> list[StoredItem]:
        with self._lock:
            return [
                item
                for item in self.stored
                if (mailbox is None or item.mailbox == mailbox.lower())
                and (folder is None or item.folder.path.lower() == folder.lower())
            ]

    def folder_paths(self, mailbox: str) -> list[str]:
        return sorted(f.path for f in self.folders.values() if f.mailbox == mailbox.lower() and f.path)

    def ops(self) -> list[str]:
        return [request.op for request in self.requests]

    def batches(self) -> list[int]:
        """How many items each CreateItem request carried, in order."""
        with self._lock:
            requests = [request for request in self.requests if request.op == "CreateItem"]
        return [len(_children(_operation(request.xml), "Items")) for request in requests]

    # --- internals ------------------------------------------------------------------------------------------

    def _new_id(self, kind: str) -> str:
        raw = f"{kind}:{next(self._ids)}:{secrets.token_hex(8)}".encode()
        return base64.b64encode(raw).decode()

    def _new_folder(self, name: str, mailbox: str, parent: Folder | None, folder_class: str) -> Folder:
        folder = Folder(self._new_id("folder"), name, mailbox, parent, folder_class)
        self.folders[folder.id] = folder
        if parent is not None:
            parent.children.append(folder)
        return folder

    def _take_fault(self, op: str, items: int) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self.faults):
                if fault.kind == "item_error" and (op != "CreateItem" or fault.item > items):
                    continue
                if fault.op in (op, "*"):
                    return self.faults.pop(index)
        return None

    def _issue_token(self, form: dict[str, list[str]]) -> dict[str, Any] | None:
        client_id = (form.get("client_id") or [""])[0]
        secret = (form.get("client_secret") or [""])[0]
        if (form.get("grant_type") or [""])[0] != "client_credentials":
            return None
        if client_id not in self.clients or self.clients[client_id] != secret:
            return None
        token = secrets.token_urlsafe(24)
        self.tokens[token] = client_id
        return {"access_token": token, "token_type": "Bearer", "expires_in": 3600}

    def login_of(self, principal: str) -> str:
        """The configured login for an NTLM principal (``DOMAIN\\user``, or ``\\user@domain``)."""
        for login in self.users:
            if login.lower() == principal.lower().lstrip("\\"):
                return login
        return principal

    def _login(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return self.tokens.get(value.strip())
        if scheme.lower() != "basic":
            return None
        try:
            login, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        return login if self.users.get(login) == password else None

    def handle_soap(self, login: str, body: bytes) -> tuple[int, bytes, dict[str, str], bool]:
        """(status, response body, extra headers, drop the connection after the work)."""
        envelope = ET.fromstring(body)
        header = envelope.find(_q(SOAP, "Header"))
        operation = _operation(body, envelope)
        op = operation.tag.rpartition("}")[2]
        impersonated = _impersonated(header)
        with self._lock:
            self.requests.append(Request(op, login, impersonated, body))
        time.sleep(self.delays.get(op, 0.0))
        fault = self._take_fault(op, len(_children(operation, "Items")))
        if fault is not None and fault.kind == "http":
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            if fault.status == 401:
                headers["WWW-Authenticate"] = 'Basic realm="127.0.0.1"'
            return fault.status, b"", headers, False
        if fault is not None and fault.kind == "busy":
            return 500, _busy_fault(fault.back_off_ms), {}, False
        if fault is not None and fault.kind == "error":
            error = _error(op, EwsError(fault.code, fault.text), "")
            return (
                200,
                _envelope(
                    f"<m:{op}Response><m:ResponseMessages>{error}</m:ResponseMessages></m:{op}Response>"
                ),
                {},
                False,
            )
        try:
            principal = self._principal(login, impersonated)
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                raise SoapFault("ErrorInvalidRequest", f"The request is invalid: {op} is not served here.")
            with self._lock:
                if fault is not None and fault.kind == "item_error":
                    messages = self._op_CreateItem(operation, principal, fault)
                else:
                    messages = handler(operation, principal)
        except SoapFault as exc:
            return 500, _fault(exc.code, exc.text), {}, False
        except EwsError as exc:
            # The request's one target (a folder id) is unusable: one error response message.
            messages = _error(op, exc, "")
        answer = _envelope(
            f"<m:{op}Response><m:ResponseMessages>{messages}</m:ResponseMessages></m:{op}Response>"
        )
        return 200, answer, {}, fault is not None and fault.kind == "drop_after"

    def _principal(self, login: str, impersonated: str | None) -> str:
        if impersonated is None:
            return login.lower()
        if login not in self.impersonators:
            raise SoapFault(
                "ErrorImpersonateUserDenied",
                "The account does not have permission to impersonate the requested user.",
            )
        if impersonated.lower() not in self.mailboxes:
            raise SoapFault("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it.")
        return impersonated.lower()

    # --- folder resolution ----------------------------------------------------------------------------------

    def _resolve(self, element: ET.Element, principal: str) -> Folder:
        """A t:FolderId or t:DistinguishedFolderId (optional t:Mailbox) -> the folder, access checked."""
        if element.tag == _q(T, "FolderId"):
            folder = self.folders.get(element.get("Id", ""))
            if folder is None:
                raise EwsError("ErrorItemNotFound", "The specified object was not found in the store.")
        else:
            address = element.findtext(f"{_q(T, 'Mailbox')}/{_q(T, 'EmailAddress')}") or principal
            root = self.mailboxes.get(address.lower())
            if root is None:
                raise EwsError(
                    "ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it."
                )
            folder = _distinguished(root, element.get("Id", ""))
        if folder.mailbox != principal:
            raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return folder

    def _parents(self, operation: ET.Element, container: str, principal: str) -> list[Folder]:
        return [self._resolve(child, principal) for child in _children(operation, container)]

    # --- operations: each returns the m:*ResponseMessage elements -------------------------------------------

    def _op_GetFolder(self, operation: ET.Element, principal: str) -> str:
        out = []
        for element in _children(operation, "FolderIds"):
            try:
                folder = self._resolve(element, principal)
            except EwsError as exc:
                out.append(_error("GetFolder", exc, "<m:Folders/>"))
                continue
            out.append(_success("GetFolder", f"<m:Folders>{self._folder_xml(folder)}</m:Folders>"))
        return "".join(out)

    def _op_FindFolder(self, operation: ET.Element, principal: str) -> str:
        out = []
        wanted = _restriction_value(operation, "folder:DisplayName")
        for parent in self._parents(operation, "ParentFolderIds", principal):
            found = [f for f in parent.children if wanted is None or f.name.lower() == wanted.lower()]
            out.append(_found("FindFolder", "Folders", [self._folder_xml(f) for f in found]))
        return "".join(out)

    def _op_CreateFolder(self, operation: ET.Element, principal: str) -> str:
        (parent,) = self._parents(operation, "ParentFolderId", principal)
        out = []
        for element in _children(operation, "Folders"):
            name = element.findtext(_q(T, "DisplayName")) or ""
            if any(child.name.lower() == name.lower() for child in parent.children):
                out.append(
                    _error(
                        "CreateFolder",
                        EwsError("ErrorFolderExists", "A folder with the specified name already exists."),
                        "<m:Folders/>",
                    )
                )
                continue
            folder_class = element.findtext(_q(T, "FolderClass")) or "IPF.Note"
            folder = self._new_folder(name, parent.mailbox, parent, folder_class)
            out.append(
                _success(
                    "CreateFolder",
                    f"<m:Folders><t:Folder>{_id_xml('FolderId', folder.id)}</t:Folder></m:Folders>",
                )
            )
        return "".join(out)

    def _op_CreateItem(self, operation: ET.Element, principal: str, fault: Fault | None = None) -> str:
        """One response message per item, in order; each item is created or refused on its own."""
        if operation.get("MessageDisposition") != "SaveOnly":
            raise SoapFault("ErrorInvalidRequest", "Only SaveOnly is served here.")
        (folder,) = self._parents(operation, "SavedItemFolderId", principal)
        out = []
        for position, element in enumerate(_children(operation, "Items"), start=1):
            if fault is not None and position == fault.item:
                out.append(_error("CreateItem", EwsError(fault.code, fault.text), "<m:Items/>"))
                continue
            if fault is not None and fault.stop and position > fault.item:
                out.append(_batch_stopped())
                continue
            mime_text = element.findtext(_q(T, "MimeContent"))
            if mime_text is None:
                raise SoapFault("ErrorInvalidRequest", "this server only takes items as MimeContent")
            mime = base64.b64decode(mime_text)
            if self.max_item_size is not None and len(mime) > self.max_item_size:
                out.append(
                    _error(
                        "CreateItem",
                        EwsError(
                            "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size."
                        ),
                        "<m:Items/>",
                    )
                )
                continue
            is_read = element.findtext(_q(T, "IsRead"))
            item = StoredItem(
                id=self._new_id("item"),
                mailbox=folder.mailbox,
                folder=folder,
                mime=without_stamp(mime),
                is_read=None if is_read is None else is_read in ("true", "1"),
                properties=_extended_properties(element),
                created_by=principal,
                stored_mime=mime,
            )
            self.stored.append(item)
            out.append(
                _success(
                    "CreateItem", f"<m:Items><t:Message>{_id_xml('ItemId', item.id)}</t:Message></m:Items>"
                )
            )
        return "".join(out)

    def _op_FindItem(self, operation: ET.Element, principal: str) -> str:
        restriction = _restriction(operation)
        out = []
        for folder in self._parents(operation, "ParentFolderIds", principal):
            found = [item for item in self.stored if item.folder is folder and _matches(item, restriction)]
            shape = operation.find(_q(M, "ItemShape"))
            out.append(_found("FindItem", "Items", [_item_xml(item, shape) for item in found]))
        return "".join(out)

    def _op_GetItem(self, operation: ET.Element, principal: str) -> str:
        shape = operation.find(_q(M, "ItemShape"))
        out = []
        for element in _children(operation, "ItemIds"):
            item = next((i for i in self.stored if i.id == element.get("Id")), None)
            if item is None or item.mailbox != principal:
                error = EwsError("ErrorItemNotFound", "The specified object was not found in the store.")
                out.append(_error("GetItem", error, "<m:Items/>"))
                continue
            out.append(_success("GetItem", f"<m:Items>{_item_xml(item, shape)}</m:Items>"))
        return "".join(out)

    def _op_ResolveNames(self, operation: ET.Element, principal: str) -> str:
        entry = (operation.findtext(_q(M, "UnresolvedEntry")) or "").removeprefix("smtp:").lower()
        if entry not in self.mailboxes:
            error = EwsError("ErrorNameResolutionNoResults", "No results were found.")
            return _error("ResolveNames", error, "")
        return _success(
            "ResolveNames",
            '<m:ResolutionSet TotalItemsInView="1" IncludesLastItemInRange="true"><t:Resolution><t:Mailbox>'
            f"<t:Name>{escape(entry)}</t:Name><t:EmailAddress>{escape(entry)}</t:EmailAddress>"
            "<t:RoutingType>SMTP</t:RoutingType><t:MailboxType>Mailbox</t:MailboxType>"
            "</t:Mailbox></t:Resolution></m:ResolutionSet>",
        )

    def _op_ConvertId(self, operation: ET.Element, principal: str) -> str:
        # exchangelib's version probe converts a dummy id; Exchange answers with an error and its version.
        error = EwsError("ErrorInvalidIdMalformed", "Id is malformed.")
        return _error("ConvertId", error, "")

    def _folder_xml(self, folder: Folder) -> str:
        parent = _id_xml("ParentFolderId", folder.parent.id) if folder.parent else ""
        total = sum(1 for item in self.stored if item.folder is folder)
        unread = sum(1 for item in self.stored if item.folder is folder and not item.is_read)
        return (
            f"<t:Folder>{_id_xml('FolderId', folder.id)}{parent}"
            f"<t:FolderClass>{folder.folder_class}</t:FolderClass>"
            f"<t:DisplayName>{escape(folder.name)}</t:DisplayName><t:TotalCount>{total}</t:TotalCount>"
            f"<t:ChildFolderCount>{len(folder.children)}</t:ChildFolderCount>"
            f"<t:UnreadCount>{unread}</t:UnreadCount></t:Folder>"
        )


# --- XML helpers ------------------------------------------------------------------------------------------


def _operation(body: bytes, envelope: ET.Element | None = None) -> ET.Element:
    """The operation element of a SOAP request (the first child of its Body)."""
    envelope = ET.fromstring(body) if envelope is None else envelope
    request = envelope.find(_q(SOAP, "Body"))
    assert request is not None and len(request), "SOAP request without a Body element"
    return request[0]


def _children(operation: ET.Element, container: str) -> list[ET.Element]:
    found = operation.find(_q(M, container))
    return [] if found is None else list(found)


def _impersonated(header: ET.Element | None) -> str | None:
    if header is None:
        return None
    sid = header.find(f"{_q(T, 'ExchangeImpersonation')}/{_q(T, 'ConnectingSID')}")
    if sid is None:
        return None
    for tag in ("PrimarySmtpAddress", "SmtpAddress", "PrincipalName"):
        value = sid.findtext(_q(T, tag))
        if value:
            return value
    return None


def _distinguished(root: Folder, name: str) -> Folder:
    top = root.children[0]
    if name == "root":
        return root
    if name == "msgfolderroot":
        return top
    if name == "inbox":
        return top.children[0]
    raise EwsError("ErrorFolderNotFound", f"The distinguished folder {name!r} is not served here.")


def _restriction(operation: ET.Element) -> tuple[object, str] | None:
    """(field, constant) of the request's ``IsEqualTo`` restriction: the field is a FieldURI's name or an
    extended property's key (see ``_property_key``). The connector's flows use no other restriction."""
    restriction = operation.find(_q(M, "Restriction"))
    if restriction is None:
        return None
    equal = restriction.find(_q(T, "IsEqualTo"))
    constant = None if equal is None else equal.find(f"{_q(T, 'FieldURIOrConstant')}/{_q(T, 'Constant')}")
    assert equal is not None and constant is not None, ET.tostring(restriction).decode()
    uri = equal.find(_q(T, "FieldURI"))
    if uri is not None:
        return uri.get("FieldURI"), constant.get("Value", "")
    extended = equal.find(_q(T, "ExtendedFieldURI"))
    assert extended is not None, ET.tostring(restriction).decode()
    return _property_key(extended), constant.get("Value", "")


def _restriction_value(operation: ET.Element, field_uri: str) -> str | None:
    found = _restriction(operation)
    if found is None:
        return None
    assert found[0] == field_uri, f"unexpected restriction on {found[0]}"
    return found[1]


def _matches(item: StoredItem, restriction: tuple[object, str] | None) -> bool:
    if restriction is None:
        return True
    field, value = restriction
    if field == "message:InternetMessageId":
        return item.message_id == value
    return item.properties.get(field) == value


def _property_key(uri: ET.Element) -> object:
    tag = uri.get("PropertyTag")
    if tag is not None:
        return int(tag, 0)
    return (uri.get("PropertySetId", "").lower(), uri.get("PropertyName"))


def _extended_properties(element: ET.Element) -> dict[object, str]:
    found: dict[object, str] = {}
    for prop in element.findall(_q(T, "ExtendedProperty")):
        uri = prop.find(_q(T, "ExtendedFieldURI"))
        assert uri is not None
        found[_property_key(uri)] = prop.findtext(_q(T, "Value")) or ""
    return found


def _item_xml(item: StoredItem, shape: ET.Element | None) -> str:
    """A t:Message with the ItemId and whichever requested properties the item has."""
    parts = [_id_xml("ItemId", item.id)]
    extended = []
    for uri in shape.iter() if shape is not None else []:
        if uri.tag == _q(T, "FieldURI") and uri.get("FieldURI") == "message:InternetMessageId":
            if item.message_id is not None:
                parts.append(f"<t:InternetMessageId>{escape(item.message_id)}</t:InternetMessageId>")
        elif uri.tag == _q(T, "FieldURI") and uri.get("FieldURI") == "item:Size":
            parts.append(f"<t:Size>{len(item.stored_mime)}</t:Size>")
        elif uri.tag == _q(T, "ExtendedFieldURI"):
            value = item.properties.get(_property_key(uri))
            if value is not None:
                attrs = "".join(f" {name}={quoteattr(text)}" for name, text in uri.attrib.items())
                extended.append(
                    f"<t:ExtendedProperty><t:ExtendedFieldURI{attrs}/>"
                    f"<t:Value>{escape(value)}</t:Value></t:ExtendedProperty>"
                )
    # Schema order: ItemId, ..., Size, ..., ExtendedProperty, ..., InternetMessageId (MessageType).
    size = [p for p in parts if p.startswith("<t:Size>")]
    message_id = [p for p in parts if p.startswith("<t:InternetMessageId>")]
    return f"<t:Message>{parts[0]}{''.join(size)}{''.join(extended)}{''.join(message_id)}</t:Message>"


def _id_xml(tag: str, value: str) -> str:
    change_key = base64.b64encode(b"ck:" + value.encode()[:12]).decode()
    return f"<t:{tag} Id={quoteattr(value)} ChangeKey={quoteattr(change_key)}/>"


def _success(op: str, content: str) -> str:
    return (
        f'<m:{op}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
        f"{content}</m:{op}ResponseMessage>"
    )


def _found(op: str, container: str, elements: list[str]) -> str:
    """A Find* answer: every match in one page."""
    return _success(
        op,
        f'<m:RootFolder IndexedPagingOffset="{len(elements)}" TotalItemsInView="{len(elements)}" '
        f'IncludesLastItemInRange="true"><t:{container}>{"".join(elements)}</t:{container}></m:RootFolder>',
    )


def _error(op: str, exc: EwsError, empty: str) -> str:
    return (
        f'<m:{op}ResponseMessage ResponseClass="Error"><m:MessageText>{escape(exc.text)}</m:MessageText>'
        f"<m:ResponseCode>{exc.code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
        f"{empty}</m:{op}ResponseMessage>"
    )


def _batch_stopped() -> str:
    """What Exchange answers for the items of a batch it did not process after an earlier one failed."""
    return (
        '<m:CreateItemResponseMessage ResponseClass="Warning"><m:MessageText>The batch processing was '
        "stopped.</m:MessageText><m:ResponseCode>ErrorBatchProcessingStopped</m:ResponseCode>"
        "<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey><m:Items/></m:CreateItemResponseMessage>"
    )


def _envelope(body: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Header>{SERVER_VERSION}'
        f'</s:Header><s:Body xmlns:m="{M}" xmlns:t="{T}">{body}</s:Body></s:Envelope>'
    ).encode()


def _fault(code: str, text: str, extra: str = "") -> bytes:
    return (
        f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Body><s:Fault>'
        f'<faultcode xmlns:a="{T}">a:{code}</faultcode>'
        f'<faultstring xml:lang="en-US">{escape(text)}</faultstring>'
        f'<detail><e:ResponseCode xmlns:e="{E}">{code}</e:ResponseCode><e:Message xmlns:e="{E}">'
        f"{escape(text)}</e:Message>{extra}</detail></s:Fault></s:Body></s:Envelope>"
    ).encode()


def _busy_fault(back_off_ms: int) -> bytes:
    return _fault(
        "ErrorServerBusy",
        "The server cannot service this request right now. Try again later.",
        f'<t:MessageXml xmlns:t="{T}"><t:Value Name="BackOffMilliseconds">{back_off_ms}</t:Value>'
        "</t:MessageXml>",
    )


# --- HTTP ---------------------------------------------------------------------------------------------------


def _handler(server: EwsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Answers go out at once: with Nagle's algorithm and the client's delayed ACK each one waited ~40 ms.
        disable_nagle_algorithm = True
        protocol_version = "HTTP/1.1"
        ntlm: Any = None
        ntlm_login: str | None = None

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str], content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _authenticate(self) -> str | None:
            """The login of this request, or None after answering 401 (a challenge or a refusal).

            NTLM is connection-based as in IIS: a three-leg handshake (negotiate, challenge, authenticate)
            on one connection, after which that connection's requests need no Authorization header.
            """
            authorization = self.headers.get("Authorization") or ""
            if authorization.startswith("NTLM "):
                token = base64.b64decode(authorization[5:])
                if self.ntlm is None or self.ntlm.complete:
                    self.ntlm, self.ntlm_login = spnego.server(protocol="ntlm"), None
                try:
                    answer = self.ntlm.step(token)
                except spnego.exceptions.SpnegoError:
                    self.ntlm = None
                    self._send(401, b"", {"WWW-Authenticate": "NTLM"}, "text/html")
                    return None
                if not self.ntlm.complete:
                    challenge = "NTLM " + base64.b64encode(answer or b"").decode()
                    self._send(401, b"", {"WWW-Authenticate": challenge}, "text/html")
                    return None
                self.ntlm_login = server.login_of(str(self.ntlm.client_principal))
                return self.ntlm_login
            if not authorization and self.ntlm_login is not None:
                return self.ntlm_login
            login = server._login(authorization)
            if login is None:
                challenges = {"WWW-Authenticate": 'NTLM, Basic realm="127.0.0.1"'}
                self._send(401, b"", challenges, "text/html")
            return login

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path == TOKEN_PATH:
                token = server._issue_token(urllib.parse.parse_qs(body.decode()))
                answer = token or {"error": "invalid_client", "error_description": "bad client credentials"}
                self._send(200 if token else 401, json.dumps(answer).encode(), {}, "application/json")
                return
            if self.path != EWS_PATH:
                self._send(404, b"not found", {}, "text/plain")
                return
            login = self._authenticate()
            if login is None:
                return
            status, answer, headers, drop = server.handle_soap(login, body)
            if drop:
                # The work is done (e.g. the item exists) but the client never hears of it.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                return
            self._send(status, answer, headers, "text/xml; charset=utf-8")

    return Handler


@contextlib.contextmanager
def running_ews() -> Iterator[EwsServer]:
    server = EwsServer().start()
    try:
        yield server
    finally:
        server.stop()
