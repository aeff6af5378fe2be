"""What the configuration needs of OAuth 2.0 to validate itself: the Microsoft endpoints' defaults and the
check of a token URL. Apart from ``connector.oauth`` (the token providers and fetchers, urllib.request, the
Gmail token files), which a command that gets no token, ``status`` among them, does not load (issue 16's
start-up goal: about 50 M instructions of each command that reads the configuration)."""

from __future__ import annotations

import ipaddress
import urllib.parse

EXCHANGE_ONLINE_SCOPE = "https://outlook.office365.com/.default"
ENTRA_AUTHORITY_HOST = "https://login.microsoftonline.com"


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_url(url: str) -> str:
    """https, or http to a loopback address only (a secret must not cross a network in clear text)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return url
    raise ValueError("must be an https:// URL (http:// only for a loopback address such as 127.0.0.1)")
