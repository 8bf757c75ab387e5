"""Refuse URLs whose host is, or resolves to, an address the pipeline must never contact.

A URL list is untrusted input: a row can point at `http://169.254.169.254/` (cloud metadata), at a
service on the worker's loopback or at the private network. The guard resolves the host once,
checks every address, and hands back the checked addresses that the connection then uses (the
HTTP client connects to one of them and sends the original Host header), so a DNS answer that
changes between check and connect (DNS rebinding) cannot reach a refused address.

The decision is the explicit table below (`DENIED_V4`, `DENIED_V6`, `EMBEDDED_V4`), not the
`is_private` / `is_global` tables of Python's `ipaddress`, which change between patch releases.
It holds IANA's IPv4 and IPv6 special-purpose registries (RFC 6890 and its updates, every entry,
also the few the registry calls globally reachable: no image host lives on an anycast DNS sink or
a relay), multicast, the reserved 240.0.0.0/4, Azure's host endpoint 168.63.129.16, the deprecated
site-local fec0::/10, and everything in IPv6 outside global unicast 2000::/3. IPv6 addresses that
embed an IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4, Teredo) are judged by the IPv4
addresses they carry.

Hosts written as numbers are read the way the C resolver reads them (`2130706433`, `0x7f000001`,
`127.1` and `0177.0.0.1` are all 127.0.0.1), so they cannot slip past as "names".

Answers are cached per guard: addresses and refusals for `cache_s`, a failed look-up only for
`dns_error_cache_s` (a DNS blip must not become a verdict on every URL of the host).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

if TYPE_CHECKING:
    from pipeline.config import DataConfig

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
# resolver(host, port) -> list of address strings; the default uses getaddrinfo.
Resolver = Callable[[str, int], Sequence[str]]


class AddressRefused(Exception):
    """The host is or resolves to a refused address (reason `blocked_address`)."""


class ResolveError(Exception):
    """The host name does not resolve (reason `dns_error`)."""


@dataclass(frozen=True)
class DeniedRange:
    """A range the guard refuses: `kind` is what the message calls it, `source` the RFC."""

    network: IPNetwork
    kind: str
    source: str

    def describe(self) -> str:
        return f"{self.kind} ({self.network}, {self.source})"


def _table(*rows: tuple[str, str, str]) -> tuple[DeniedRange, ...]:
    return tuple(DeniedRange(ipaddress.ip_network(cidr), kind, source) for cidr, kind, source in rows)


DENIED_V4 = _table(
    ("0.0.0.0/8", "'this network'", "RFC 791"),
    ("10.0.0.0/8", "private", "RFC 1918"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT)", "RFC 6598"),
    ("127.0.0.0/8", "loopback", "RFC 1122"),
    ("169.254.0.0/16", "link-local (cloud metadata)", "RFC 3927"),
    ("172.16.0.0/12", "private", "RFC 1918"),
    ("192.0.0.0/24", "IETF protocol assignments", "RFC 6890"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)", "RFC 5737"),
    ("192.31.196.0/24", "AS112-v4", "RFC 7535"),
    ("192.52.193.0/24", "AMT", "RFC 7450"),
    ("192.88.99.0/24", "6to4 relay anycast", "RFC 7526"),
    ("192.168.0.0/16", "private", "RFC 1918"),
    ("192.175.48.0/24", "AS112 direct delegation", "RFC 7534"),
    ("198.18.0.0/15", "benchmarking", "RFC 2544"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)", "RFC 5737"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)", "RFC 5737"),
    ("224.0.0.0/4", "multicast", "RFC 5771"),
    ("240.0.0.0/4", "reserved (and broadcast)", "RFC 1112"),
    ("168.63.129.16/32", "Azure's host endpoint", "Azure wireserver"),
)

# Checked in order: the first match decides (so ::1 is "loopback", not "IPv4-compatible").
DENIED_V6 = _table(
    ("::/128", "unspecified", "RFC 4291"),
    ("::1/128", "loopback", "RFC 4291"),
    ("::/96", "IPv4-compatible (deprecated)", "RFC 4291"),
    ("64:ff9b:1::/48", "local-use NAT64", "RFC 8215"),
    ("100::/64", "discard-only", "RFC 6666"),
    ("100:0:0:1::/64", "dummy prefix", "RFC 9780"),
    ("2001::/23", "IETF protocol assignments", "RFC 2928"),
    ("2001:db8::/32", "documentation", "RFC 3849"),
    ("2620:4f:8000::/48", "AS112 direct delegation", "RFC 7534"),
    ("3fff::/20", "documentation", "RFC 9637"),
    ("5f00::/16", "SRv6 SIDs", "RFC 9602"),
    ("fc00::/7", "unique-local", "RFC 4193"),
    ("fe80::/10", "link-local", "RFC 4291"),
    ("fec0::/10", "site-local (deprecated)", "RFC 3879"),
    ("ff00::/8", "multicast", "RFC 4291"),
)
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")


def _low32(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]


def _sixtofour(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)]


def _teredo(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    server = ipaddress.IPv4Address((int(ip) >> 64) & 0xFFFFFFFF)
    client = ipaddress.IPv4Address(~int(ip) & 0xFFFFFFFF)  # stored inverted (RFC 4380)
    return [server, client]


# IPv6 prefixes that carry IPv4 addresses: judged by what they carry. Checked before DENIED_V6
# (Teredo 2001::/32 lies inside 2001::/23; IPv4-mapped and NAT64 lie outside 2000::/3).
EMBEDDED_V4: tuple[tuple[ipaddress.IPv6Network, str, Callable[[ipaddress.IPv6Address], list]], ...] = (
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped", _low32),
    (ipaddress.IPv6Network("64:ff9b::/96"), "NAT64", _low32),
    (ipaddress.IPv6Network("2002::/16"), "6to4", _sixtofour),
    (ipaddress.IPv6Network("2001::/32"), "Teredo", _teredo),
)


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


def denied_range(ip: IPAddress) -> Optional[DeniedRange]:
    """The table entry that refuses `ip` directly (embedded IPv4 addresses not considered)."""
    table = DENIED_V4 if ip.version == 4 else DENIED_V6
    for entry in table:
        if ip in entry.network:
            return entry
    return None


def refusal(ip: IPAddress) -> Optional[str]:
    """Why `ip` must not be contacted ('private (10.0.0.0/8, RFC 1918)', ...), or None."""
    if ip.version == 6:
        for prefix, name, embedded in EMBEDDED_V4:
            if ip in prefix:
                for v4 in embedded(ip):
                    why = refusal(v4)
                    if why:
                        return f"{why} (embedded in the {name} address {ip})"
                return None
    entry = denied_range(ip)
    if entry is not None:
        return entry.describe()
    if ip.version == 6 and ip not in GLOBAL_UNICAST_V6:
        return f"not global unicast (outside {GLOBAL_UNICAST_V6}, RFC 4291)"
    return None


# A cached answer: the checked addresses, or (exception class, message) to raise again.
_Answer = Union[tuple[str, ...], tuple[type, str]]


@dataclass
class AddressGuard:
    """Resolve a host and return the checked addresses to connect to, or raise.

    allow_private: skip the refusal checks (tests and the local demo serve on 127.0.0.1).
    resolver: injectable for tests (a stub that answers without DNS).
    cache_s: addresses and refusals are reused this long (per guard, i.e. per download actor).
    dns_error_cache_s: a failed look-up is reused only this long, so a burst of URLs of a host that
        does not resolve asks the resolver once, while a DNS blip heals within seconds.
    """

    allow_private: bool = False
    resolver: Resolver = system_resolver
    cache_s: float = 300.0
    dns_error_cache_s: float = 5.0

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[float, _Answer]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_data(cls, data: "DataConfig", resolver: Resolver = system_resolver) -> "AddressGuard":
        """The guard the `data` config asks for (`allow_private_addresses`, `dns_error_cache_s`)."""
        return cls(
            allow_private=data.allow_private_addresses, resolver=resolver, dns_error_cache_s=data.dns_error_cache_s
        )

    def check_ip(self, ip: IPAddress, host: str) -> None:
        if self.allow_private:
            return
        why = refusal(ip)
        if why:
            shown = host if host == str(ip) else f"{host} -> {ip}"
            raise AddressRefused(f"{shown} is {why}; set data.allow_private_addresses=true to allow it")

    def resolve(self, host: str, port: int, fresh: bool = False) -> str:
        """The checked address to connect to for `host:port` (IPv4 preferred); see `resolve_all`."""
        return self.resolve_all(host, port, fresh)[0]

    def resolve_all(self, host: str, port: int, fresh: bool = False) -> list[str]:
        """Every checked address of `host:port`, IPv4 first, each once, in the resolver's order
        within a family (connect to them in turn for IPv4/IPv6 fallback). Raises AddressRefused
        when ANY answer is refused, ResolveError when the name does not resolve.

        fresh: ask the resolver again instead of reusing a cached look-up failure (a retry after
        `dns_error`); cached addresses and refusals are still used."""
        key = (host.lower(), port)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now < hit[0] and not (fresh and hit[1][0] is ResolveError):
            answer = hit[1]
        else:
            answer = self._answer(host, port)
            ttl = self.dns_error_cache_s if answer[0] is ResolveError else self.cache_s
            with self._lock:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[key] = (now + ttl, answer)
        if isinstance(answer[0], type):  # a cached refusal or failure: raise a fresh exception each time
            error_class, message = answer
            raise error_class(message)
        return list(answer)

    def _answer(self, host: str, port: int) -> _Answer:
        """The checked addresses of `host`, or (exception class, message): a numeric host is
        checked as it is (never sent to a resolver), a name is looked up."""
        numeric = parse_numeric_host(host)
        if numeric is None:
            return self._lookup(host, port)
        try:
            self.check_ip(numeric, host)
        except AddressRefused as exc:
            return (AddressRefused, str(exc))
        return (str(numeric),)

    def _lookup(self, host: str, port: int) -> _Answer:
        try:
            addresses = list(self.resolver(host, port))
        except (OSError, UnicodeError) as exc:
            return (ResolveError, f"{host}: {exc}")
        if not addresses:
            return (ResolveError, f"{host}: no addresses")
        parsed: list[IPAddress] = []
        for text in addresses:
            try:
                ip = ipaddress.ip_address(str(text).split("%", 1)[0])
            except ValueError:
                return (ResolveError, f"{host}: resolver returned {text!r}, not an address")
            if ip not in parsed:
                parsed.append(ip)
        try:
            # Refuse the host if ANY answer is refused: a name that mixes public and private
            # answers is how rebinding attacks look.
            for ip in parsed:
                self.check_ip(ip, host)
        except AddressRefused as exc:
            return (AddressRefused, str(exc))
        # IPv4 first (loopback servers in tests and most image hosts listen there); stable sort.
        parsed.sort(key=lambda ip: ip.version)
        return tuple(str(ip) for ip in parsed)
