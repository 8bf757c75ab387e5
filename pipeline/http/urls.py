"""What the fetcher reads from a URL and from a response's headers: scheme, host, port and the URL
as sent (`parse_url`), and how long a `Retry-After` asks to wait (`retry_after_s`)."""

from __future__ import annotations

import email.utils
import re
import urllib.parse
from typing import Optional

from pipeline.http.exchange import Headers


class BadURL(Exception):
    """A URL the fetcher will not request: `reason` is `unsupported_scheme` or `invalid_url`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


_BAD_HOST = re.compile(r"[^A-Za-z0-9._~:%!$&'()*+,;=-]")  # what may stand in a host (IPv6: no brackets)
_NEEDS_QUOTING = re.compile(r'[^\x21-\x7e]|["<>\\^`{|}]')


def request_target(parts: urllib.parse.SplitResult) -> str:
    """Path and query, percent-encoded where the URL list left spaces or non-ASCII characters."""
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if _NEEDS_QUOTING.search(target) is None:  # the common case: already a valid request target
        return target
    return urllib.parse.quote(target, safe="!#$%&'()*+,/:;=?@[]~")


def parse_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, the URL as sent: ASCII host, encoded path, no userinfo or fragment)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise BadURL("unsupported_scheme", f"{scheme or 'no'} scheme in {url[:200]!r}: only http and https")
        host = parts.hostname
        if not host:
            raise BadURL("invalid_url", f"no host in {url[:200]!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        if _BAD_HOST.search(host):
            raise BadURL("invalid_url", f"bad host {host[:100]!r} in {url[:200]!r}")
    except BadURL:
        raise
    except (ValueError, UnicodeError) as exc:
        raise BadURL("invalid_url", f"{url[:200]!r}: {exc}") from None
    name = f"[{host}]" if ":" in host else host
    return scheme, host, port, f"{scheme}://{name}:{port}{request_target(parts)}"


def retry_after_s(headers: Optional[Headers], now: float) -> Optional[float]:
    """Seconds a `Retry-After` header asks to wait (delta-seconds or an HTTP date), or None."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now) if when is not None and when.tzinfo is not None else None
