"""The POST of a grant to a token endpoint, with the standard library. Apart from ``connector.oauth``, which
every poll loads (its XOAUTH2 helpers and token cache): urllib.request and http.client load at the first
token fetched from an endpoint, not in every process that polls (issue 16's start-up goal)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from connector.tls import shared_ssl_context


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A token endpoint has no business redirecting, and urllib would carry the Authorization header
    along (even to http://): a redirect is answered as the error it is."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post(
    url: str, body: bytes, headers: Mapping[str, str], *, ca_file: Path | None, timeout: float, limit: int
) -> tuple[int, bytes]:
    """The HTTP status and at most ``limit`` bytes of the answer, an HTTP error's too (TLS verified, no
    redirect followed). Raises OSError (urllib's URLError is one) when no answer came."""
    handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
    if url.startswith("https:"):
        handlers.append(urllib.request.HTTPSHandler(context=shared_ssl_context(ca_file=ca_file)))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read(limit)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(limit)
