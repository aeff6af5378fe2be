"""The bare loop the connector is measured against: poplib RETR, imaplib APPEND, DELE. No ledger, no
safety, no error handling: what a ten-line script does."""

from __future__ import annotations

import functools
import imaplib
import poplib
import ssl
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    password: str
    # POP3 over TLS (the POP3S port), verified against this CA; the context is built once, as a script
    # that polls in a loop would.
    ca_file: str | None = None


@functools.cache
def _context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def _pop(source: Endpoint) -> poplib.POP3:
    if source.ca_file is not None:
        pop: poplib.POP3 = poplib.POP3_SSL(
            source.host, source.port, timeout=120, context=_context(source.ca_file)
        )
    else:
        pop = poplib.POP3(source.host, source.port, timeout=120)
    pop.user(source.user)
    pop.pass_(source.password)
    return pop


def move_all(source: Endpoint, destination: Endpoint, *, delete: bool = True) -> int:
    """RETR, APPEND, DELE every message, one at a time; returns how many were moved."""
    pop = _pop(source)
    imap = imaplib.IMAP4(destination.host, destination.port, timeout=120)
    imap.login(destination.user, destination.password)
    count, _size = pop.stat()
    for number in range(1, count + 1):
        _reply, lines, _octets = pop.retr(number)
        imap.append("INBOX", None, None, b"\r\n".join(lines) + b"\r\n")
        if delete:
            pop.dele(number)
    pop.quit()
    imap.logout()
    return count


def move_new(source: Endpoint, destination: Endpoint, known: Collection[bytes]) -> int:
    """UIDL, then RETR and APPEND only what is not in ``known`` (kept on the server)."""
    pop = _pop(source)
    imap = imaplib.IMAP4(destination.host, destination.port, timeout=120)
    imap.login(destination.user, destination.password)
    _reply, entries, _octets = pop.uidl()
    moved = 0
    for entry in entries:
        number, uidl = entry.split()
        if uidl in known:
            continue
        _reply, lines, _octets = pop.retr(int(number))
        imap.append("INBOX", None, None, b"\r\n".join(lines) + b"\r\n")
        moved += 1
    pop.quit()
    imap.logout()
    return moved


def idle_poll(source: Endpoint) -> int:
    """Connect, log in, UIDL, QUIT: what an idle poll needs at the least."""
    pop = _pop(source)
    _reply, entries, _octets = pop.uidl()
    pop.quit()
    return len(entries)
