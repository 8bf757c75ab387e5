"""Proxies from the standard environment variables, read once by the download actor.

`http_proxy`/`HTTP_PROXY`, `https_proxy`/`HTTPS_PROXY` and `no_proxy`/`NO_PROXY`, as Python's
`urllib.request` reads them (lower case first; `HTTP_PROXY` is ignored inside a CGI request, where
a client could set it). libcurl is told the proxy of each request explicitly (and "no proxy"
explicitly), so it never reads the variables itself: its rules differ (it ignores upper-case
`HTTP_PROXY`).
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from typing import Mapping, Optional


@dataclass(frozen=True)
class ProxySettings:
    """proxies: {scheme: proxy URL} for `http` and `https`; `no` is the NO_PROXY list."""

    proxies: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> "ProxySettings":
        """The proxies this process's environment variables name."""
        found = urllib.request.getproxies_environment()
        return cls({k: v for k, v in found.items() if k in ("http", "https", "no") and v})

    def for_url(self, scheme: str, host: str) -> Optional[str]:
        """The proxy URL for a request to `host` over `scheme`, or None to connect directly."""
        proxy = self.proxies.get(scheme)
        if not proxy:
            return None
        if "no" in self.proxies and urllib.request.proxy_bypass_environment(host, self.proxies):
            return None
        return proxy

    def __bool__(self) -> bool:
        return bool(self.proxies.get("http") or self.proxies.get("https"))
