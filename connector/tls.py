"""TLS settings shared by every client: verified by default, an extra CA on request."""

from __future__ import annotations

import ssl
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
