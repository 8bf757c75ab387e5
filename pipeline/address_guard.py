"""Refuse URLs whose host is, or resolves to, an address the pipeline must never contact.

A URL list is untrusted input: a row can point at `http://169.254.169.254/` (cloud metadata), at a
service on the worker's loopback or at the private network. The guard resolves the host once,
checks every address, and hands back ONE checked address that the connection then uses (the HTTP
client connects to that address and sends the original Host header), so a DNS answer that changes
between check and connect (DNS rebinding) cannot reach a refused address.

Hosts written as numbers are read the way the C resolver reads them (`2130706433`, `0x7f000001`,
`127.1` and `0177.0.0.1` are all 127.0.0.1), so they cannot slip past as "names".
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
# resolver(host, port) -> list of address strings; the default uses getaddrinfo.
Resolver = Callable[[str, int], Sequence[str]]


class AddressRefused(Exception):
    """The host is or resolves to a refused address (reason `blocked_address`)."""


class ResolveError(Exception):
    """The host name does not resolve (reason `dns_error`)."""


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses `getaddrinfo` gives for `host` (TCP)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def parse_numeric_host(host: str) -> Optional[IPAddress]:
    """The address a numeric host denotes (IPv4 in any inet_aton form, IPv6), or None for a name."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefxABCDEFX." for c in text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def refusal(ip: IPAddress) -> Optional[str]:
    """Why `ip` must not be contacted ('loopback', 'private', ...), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            why = refusal(embedded)
            return f"{why} (embedded in {ip})" if why else None
        # NAT64 well-known prefix: the last 32 bits are an IPv4 address.
        if ip in ipaddress.IPv6Network("64:ff9b::/96"):
            why = refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"{why} (NAT64 {ip})" if why else None
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    for name, hit in checks:
        if hit:
            return name
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "not globally routable"
    return None


@dataclass
class AddressGuard:
    """Resolve a host and return the one address to connect to, or raise.

    allow_private: skip the refusal checks (tests and the local demo serve on 127.0.0.1).
    resolver: injectable for tests (a stub that answers without DNS).
    cache_s: resolved answers are reused this long (per guard, i.e. per download actor).
    """

    allow_private: bool = False
    resolver: Resolver = system_resolver
    cache_s: float = 300.0

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[float, Union[str, tuple[type, str]]]] = {}
        self._lock = threading.Lock()

    def check_ip(self, ip: IPAddress, host: str) -> None:
        if self.allow_private:
            return
        why = refusal(ip)
        if why:
            shown = host if host == str(ip) else f"{host} -> {ip}"
            raise AddressRefused(f"{shown} is {why}; set data.allow_private_addresses=true to allow it")

    def resolve(self, host: str, port: int) -> str:
        """The checked address to connect to for `host:port` (answers cached, numeric hosts too)."""
        key = (host.lower(), port)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.cache_s:
            answer = hit[1]
        else:
            answer = self._answer(host, port)
            with self._lock:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[key] = (now, answer)
        if isinstance(answer, tuple):  # a cached refusal: raise a fresh exception each time
            error_class, message = answer
            raise error_class(message)
        return answer

    def _answer(self, host: str, port: int) -> Union[str, tuple[type, str]]:
        """The address for `host`, or (exception class, message): a numeric host is checked as it
        is (never sent to a resolver), a name is looked up."""
        numeric = parse_numeric_host(host)
        if numeric is None:
            return self._lookup(host, port)
        try:
            self.check_ip(numeric, host)
        except AddressRefused as exc:
            return (AddressRefused, str(exc))
        return str(numeric)

    def _lookup(self, host: str, port: int) -> Union[str, tuple[type, str]]:
        try:
            addresses = list(self.resolver(host, port))
        except (OSError, UnicodeError) as exc:
            return (ResolveError, f"{host}: {exc}")
        if not addresses:
            return (ResolveError, f"{host}: no addresses")
        parsed: list[IPAddress] = []
        for text in addresses:
            try:
                parsed.append(ipaddress.ip_address(str(text).split("%", 1)[0]))
            except ValueError:
                return (ResolveError, f"{host}: resolver returned {text!r}, not an address")
        try:
            # Refuse the host if ANY answer is refused: a name that mixes public and private
            # answers is how rebinding attacks look.
            for ip in parsed:
                self.check_ip(ip, host)
        except AddressRefused as exc:
            return (AddressRefused, str(exc))
        # Prefer IPv4 (loopback servers in tests and most image hosts listen there).
        parsed.sort(key=lambda ip: ip.version)
        return str(parsed[0])
