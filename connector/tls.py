"""TLS settings shared by every client: verified by default, an extra CA on request."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import Literal

TlsMode = Literal["implicit", "starttls", "none"]


def make_ssl_context(*, verify: bool = True, ca_file: Path | None = None) -> ssl.SSLContext:
    """A client context that checks the certificate chain and host name unless ``verify`` is false.

    ``ca_file`` is trusted in addition to the system store, so that a private CA works without
    turning verification off.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# Contexts shared by every connection with the same settings (see ``shared_ssl_context``).
_shared: dict[tuple[bool, str | None, int, int], ssl.SSLContext] = {}
_shared_lock = threading.Lock()
_SHARED_MAX = 64


def shared_ssl_context(*, verify: bool = True, ca_file: Path | None = None) -> ssl.SSLContext:
    """``make_ssl_context``, built once per setting and shared by every connection that uses it: building
    one loads the system's CA store, about 15 ms of CPU, more than all the rest of an idle poll. A
    configured context is safe to share between threads (connections only wrap sockets with it). A
    ``ca_file`` is read again once it changes (its mtime or size); the system store at a restart."""
    stamp = (0, 0)
    if ca_file is not None:
        try:
            stat = ca_file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            pass  # make_ssl_context says what is wrong with it
    key = (verify, None if ca_file is None else str(ca_file), *stamp)
    with _shared_lock:
        context = _shared.get(key)
    if context is None:
        context = make_ssl_context(verify=verify, ca_file=ca_file)
        with _shared_lock:
            if len(_shared) >= _SHARED_MAX:  # ca_files edited again and again: start afresh
                _shared.clear()
            context = _shared.setdefault(key, context)
    return context


def check_ca_file(path: Path) -> Path:
    """A ``ca_file`` must be a readable PEM file when the configuration is loaded, not a traceback at the
    first connection. Raises ValueError saying what is wrong with it."""
    try:
        path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError):
        raise ValueError(f"{path} holds no certificate (a PEM file of CA certificates is expected)") from None
    return path


# What OpenSSL says when the other side answered a TLS hello in plain text (a POP3 "+OK", an IMAP "* OK").
_PLAIN_TEXT_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)


def plain_text_hint(exc: BaseException | None, port: int, *, tls_port: int) -> str:
    """For a TLS handshake (tls = "implicit") that met a server answering in plain text, what to change;
    "" for any other failure. OpenSSL's own words (``WRONG_VERSION_NUMBER``) say nothing of the cause."""
    if not isinstance(exc, ssl.SSLError) or exc.reason not in _PLAIN_TEXT_REASONS:
        return ""
    return (
        f"; the server on port {port} answered without TLS: for a port without TLS set tls = "
        f'"starttls" (or "none"), or use the TLS port ({tls_port})'
    )
