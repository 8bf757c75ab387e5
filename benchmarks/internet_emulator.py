"""An internet-like image web on loopback for `benchmarks/download_internet.py`: many virtual hosts,
each with its own latency, bandwidth and manners, served by one asyncio process from prebuilt bytes.

Hosts: `hosts` virtual hosts on consecutive loopback addresses from `first_address` (127.0.0.2 ...
127.0.0.201 for 200; every 127/8 address is loopback on Linux), one listening socket per address,
all on one port. URL i lives on host i % hosts and serves image i % len(images):
`http://127.0.0.57:PORT/img/i.jpg`. Kinds are given to hosts by a seeded shuffle (same seed, same
assignment; `Web.describe()` prints it):

    ok         200 with the image, keep-alive honoured
    never      accepts the connection and reads the request, never answers (holds until the client leaves)
    not_found  404 to every request
    reset      waits its time to first byte, then resets the connection (TCP RST)
    redirect   302 to the same path on one ok host of the emulator
    trickle    200, the headers and one body byte, then one byte every `trickle_gap_s`: longer than
               the tools' 10 s timeout, so a per-read timeout (img2dataset's urllib) fires as surely as
               a per-attempt one; any faster trickle would hold a per-read client for the whole body

Time to first byte (TTFB, from the end of the request to the first byte of the answer):
ln(TTFB) = ln(median) + sigma_host * z_host + sigma_request * z_request with z standard normal,
sigma_host^2 + sigma_request^2 = sigma^2 and sigma = ln(p95 / median) / 1.645, so over many hosts and
requests TTFB is log-normal with the configured median and p95. The hosts' z_host are the normal
quantiles at (k + 0.5) / hosts in seeded order (the hosts' spread is exactly the model's); z_request
is drawn from (seed, host, URL index, attempt), the attempt counting requests for that URL at that
host, so a retry gets a fresh draw and a rerun the same one. Capped at `max_ttfb_s` (below the tools'
10 s timeout: a healthy host stays healthy, so both tools see the same dead hosts).

Bandwidth: per host log-uniform in [low, high] bytes/s, per connection: the head and the body's first
piece leave together, each later piece when the bytes before it would have left at the host's rate;
pieces are rate x 10 ms, at least 32 KiB (a send and a timer each: the server shares the tools'
CPUs), so the last byte leaves at most one piece early (<= 32 ms at 1 MB/s, <= 10 ms from 3.3 MB/s).
Connection set-up (TCP/TLS handshakes, 1-3 round trips on the internet) is not emulated; it would
favour clients that keep connections alive over those that open one per request.

`latency=False` keeps the same web (the same hosts, kinds, redirects, trickles and URLs) and takes
only the latency away: every answer at once (TTFB 0) and whole (no bandwidth cap). Against that
web a tool's throughput differs from the latency run's by what latency alone costs, where
`benchmarks/download.py`'s zero-latency server also takes away the dead, 404, resetting and
redirecting hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import math
import random
import socket
import struct
from collections import Counter, deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterator, Optional

OK, NEVER, NOT_FOUND, RESET, REDIRECT, TRICKLE = "ok", "never", "not_found", "reset", "redirect", "trickle"
# What a correct client reports for a URL on each kind of host (clipray's reason codes).
EXPECTED_REASON = {
    OK: None,
    REDIRECT: None,
    NEVER: "timeout",
    TRICKLE: "timeout",
    NOT_FOUND: "http_404",
    RESET: "connection_error",
}
TICK_S = 0.01  # a bandwidth-capped body leaves in pieces of rate x TICK_S bytes,
MIN_PIECE_BYTES = 32 * 1024  # but no smaller than this (fewer sends: the server shares the tools' CPUs)
_STANDARD_NORMAL = NormalDist()
_Z95 = _STANDARD_NORMAL.inv_cdf(0.95)
_MASK64 = (1 << 64) - 1


def _uniform(*keys: int) -> float:
    """A uniform draw in (0, 1) fixed by the integer keys: splitmix64's finaliser chained over them
    (a few microseconds, where seeding a `random.Random` per request costs ~30)."""
    x = 0
    for key in keys:
        x = (x ^ (key & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return ((x >> 11) + 0.5) / (1 << 53)


@dataclass(frozen=True)
class EmulatorConfig:
    """The web's shape. Fractions are of hosts (hence of URLs: each host holds every hosts-th URL)."""

    hosts: int = 200
    first_address: str = "127.0.0.2"
    seed: int = 0
    median_ttfb_s: float = 0.15
    p95_ttfb_s: float = 1.5
    host_variance_share: float = 0.5  # of ln(TTFB)'s variance, the part fixed per host
    max_ttfb_s: float = 6.0
    bandwidth_bytes_per_s: tuple[float, float] = (1e6, 20e6)
    never: float = 0.02
    not_found: float = 0.05
    reset: float = 0.02
    redirect: float = 0.03
    trickle: float = 0.01
    trickle_gap_s: float = 15.0
    latency: bool = True  # False: the same web answering at once and at full speed (see the module doc)

    def __post_init__(self) -> None:
        first = ipaddress.IPv4Address(self.first_address)
        last = first + (self.hosts - 1) if self.hosts > 0 else first
        if self.hosts < 2 or not (first.is_loopback and last.is_loopback):
            raise ValueError(
                f"hosts={self.hosts} from {self.first_address}: need at least 2 addresses, all inside 127.0.0.0/8"
            )
        if not 0 < self.median_ttfb_s < self.p95_ttfb_s <= self.max_ttfb_s:
            raise ValueError(
                f"need 0 < median_ttfb_s ({self.median_ttfb_s}) < p95_ttfb_s ({self.p95_ttfb_s}) "
                f"<= max_ttfb_s ({self.max_ttfb_s})"
            )
        if not 0 <= self.host_variance_share <= 1:
            raise ValueError(f"host_variance_share={self.host_variance_share} must be within [0, 1]")
        low, high = self.bandwidth_bytes_per_s
        if not 0 < low <= high:
            raise ValueError(f"bandwidth_bytes_per_s={self.bandwidth_bytes_per_s}: need 0 < low <= high")
        if self.kind_counts()[OK] < 1:
            raise ValueError(f"the fractions of {self} leave no ok host (redirects need one to point at)")

    def kind_counts(self) -> dict[str, int]:
        counts = {
            kind: round(getattr(self, kind) * self.hosts) for kind in (NEVER, NOT_FOUND, RESET, REDIRECT, TRICKLE)
        }
        return {OK: self.hosts - sum(counts.values()), **counts}


@dataclass(frozen=True)
class Host:
    index: int
    address: str
    kind: str
    base_ttfb_s: float  # the host's median TTFB: median * exp(sigma_host * z_host)
    bandwidth_bytes_per_s: float
    redirect_to: Optional[str] = None  # the ok host's address a redirect host points at


class Web:
    """The emulated web as data: hosts, URLs and the latency model. The server process and the
    benchmark's parent both build it from the same config, so they agree on every host and draw."""

    def __init__(self, config: EmulatorConfig = EmulatorConfig()):
        self.config = config
        rng = random.Random(config.seed)
        kinds = [kind for kind, n in config.kind_counts().items() for _ in range(n)]
        rng.shuffle(kinds)
        sigma = math.log(config.p95_ttfb_s / config.median_ttfb_s) / _Z95
        self.sigma_host = sigma * math.sqrt(config.host_variance_share)
        self.sigma_request = sigma * math.sqrt(1 - config.host_variance_share)
        z_hosts = [_STANDARD_NORMAL.inv_cdf((k + 0.5) / config.hosts) for k in range(config.hosts)]
        rng.shuffle(z_hosts)
        first = ipaddress.IPv4Address(config.first_address)
        addresses = [str(first + k) for k in range(config.hosts)]
        ok_addresses = [a for a, kind in zip(addresses, kinds) if kind == OK]
        low, high = config.bandwidth_bytes_per_s
        self.hosts = [
            Host(
                index=k,
                address=addresses[k],
                kind=kinds[k],
                base_ttfb_s=config.median_ttfb_s * math.exp(self.sigma_host * z_hosts[k]),
                bandwidth_bytes_per_s=math.exp(rng.uniform(math.log(low), math.log(high))),
                redirect_to=rng.choice(ok_addresses) if kinds[k] == REDIRECT else None,
            )
            for k in range(config.hosts)
        ]

    def host_of(self, url_index: int) -> Host:
        return self.hosts[url_index % len(self.hosts)]

    def url(self, url_index: int, port: int) -> str:
        return f"http://{self.host_of(url_index).address}:{port}/img/{url_index}.jpg"

    def ttfb_s(self, host: Host, url_index: int, attempt: int) -> float:
        """Seconds from the end of request number `attempt` (0 first) for `url_index` at `host` to
        the first byte of its answer."""
        if not self.config.latency:
            return 0.0
        z = _STANDARD_NORMAL.inv_cdf(_uniform(self.config.seed, host.index, url_index, attempt))
        return min(self.config.max_ttfb_s, host.base_ttfb_s * math.exp(self.sigma_request * z))

    def expected(self, urls: int) -> dict[str, int]:
        """{"accepted": n, reason: n} that a correct client reports for URLs 0 .. urls-1."""
        counts = Counter(EXPECTED_REASON[self.host_of(i).kind] or "accepted" for i in range(urls))
        return dict(sorted(counts.items()))

    def describe(self) -> str:
        c = self.config
        lines = [
            f"emulated web: {c.hosts} hosts on {self.hosts[0].address} - {self.hosts[-1].address} "
            f"(seed {c.seed}); TTFB log-normal median {c.median_ttfb_s * 1000:.0f} ms, p95 {c.p95_ttfb_s:.2f} s "
            f"(sigma per host {self.sigma_host:.2f}, per request {self.sigma_request:.2f}; capped at {c.max_ttfb_s:g} s); "
            f"bandwidth {c.bandwidth_bytes_per_s[0] / 1e6:g}-{c.bandwidth_bytes_per_s[1] / 1e6:g} MB/s per connection"
        ]
        if not c.latency:
            lines[0] += "; LATENCY OFF: every answer at once and whole (TTFB 0, no bandwidth cap)"
        for kind, n in c.kind_counts().items():
            hosts = [h for h in self.hosts if h.kind == kind]
            if kind == OK:
                lines.append(f"  {kind:<9} {n:3d} hosts")
                continue
            names = [h.address + (f"->{h.redirect_to}" if h.redirect_to else "") for h in hosts]
            lines.append(f"  {kind:<9} {n:3d} hosts: {', '.join(names)}")
        return "\n".join(lines)


def _head(code: int, text: str, length: int, close: bool, extra: str = "", content_type: str = "text/plain") -> bytes:
    """A response's status line and headers, for a body of `length` bytes."""
    head = (
        f"HTTP/1.1 {code} {text}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n{extra}"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode("ascii")


class _Site:
    """What the server process holds: the web, the prebuilt answers, and the attempts seen per URL."""

    def __init__(self, web: Web, images: list[bytes]):
        self.web, self.images, self.port = web, images, 0
        self.image_heads = {
            close: [_head(200, "OK", len(b), close, content_type="image/jpeg") for b in images]
            for close in (False, True)
        }
        self.not_found = {close: _head(404, "Not Found", 9, close) + b"not found" for close in (False, True)}
        self.attempts: Counter = Counter()

    def draw_ttfb(self, host: Host, url_index: int) -> float:
        attempt = self.attempts[(host.index, url_index)]
        self.attempts[(host.index, url_index)] = attempt + 1
        return self.web.ttfb_s(host, url_index, attempt)


def _url_index(path: bytes) -> int:
    """/img/123.jpg -> 123; -1 for any other path (answered 404 by every host)."""
    if path.startswith(b"/img/") and path.endswith(b".jpg") and path[5:-4].isdigit():
        return int(path[5:-4])
    return -1


class _Connection(asyncio.Protocol):
    """One client connection to one host: requests are answered one at a time, in order (pipelined
    ones wait), each after its own TTFB, then paced at the host's bandwidth."""

    def __init__(self, site: _Site, host: Host):
        self.site, self.host = site, host
        self.pending = b""
        self.requests: deque[tuple[int, bool]] = deque()
        self.timer: Optional[asyncio.TimerHandle] = None
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self.host.kind == NEVER:
            return  # holds the connection: reads and never answers
        buf = self.pending + data if self.pending else data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head, buf = buf[:end], buf[end + 4 :]
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            path = parts[1] if len(parts) == 3 else b""
            close = parts[-1] == b"HTTP/1.0" or b"connection: close" in headers.lower()
            self.requests.append((_url_index(path), close))
        self.pending = buf
        if not self.busy:
            self._next()

    def eof_received(self):
        return None  # close our side too

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _next(self) -> None:
        if not self.requests or self.transport.is_closing():
            self.busy = False
            return
        self.busy = True
        url_index, close = self.requests.popleft()
        delay = self.site.draw_ttfb(self.host, url_index)
        self.timer = self.loop.call_later(delay, self._answer, url_index, close)

    def _answer(self, url_index: int, close: bool) -> None:
        kind, site = self.host.kind, self.site
        if kind == RESET:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()  # closed with linger 0: the kernel sends RST
            return
        if kind == NOT_FOUND or url_index < 0:
            self.transport.write(site.not_found[close])
            return self._done(close)
        if kind == REDIRECT:
            location = f"http://{self.host.redirect_to}:{site.port}/img/{url_index}.jpg"
            self.transport.write(_head(302, "Found", 0, close, extra=f"Location: {location}\r\n"))
            return self._done(close)
        image = url_index % len(site.images)
        body = site.images[image]
        if kind == TRICKLE:
            piece, rate = 1, 1.0 / site.web.config.trickle_gap_s
        elif not site.web.config.latency:
            rate, piece = math.inf, len(body)  # the whole body in the head's send
        else:
            rate = self.host.bandwidth_bytes_per_s
            piece = max(MIN_PIECE_BYTES, int(rate * TICK_S))
        self.transport.write(site.image_heads[close][image] + body[:piece])  # one send for both
        self._schedule(memoryview(body), piece, piece, rate, self.loop.time(), close)

    def _schedule(self, body: memoryview, sent: int, piece: int, rate: float, start: float, close: bool) -> None:
        """The next piece leaves when the `sent` bytes before it would have at `rate` (a fixed
        schedule from `start`: a late timer does not lower the rate)."""
        if sent >= len(body):
            return self._done(close)
        self.timer = self.loop.call_at(start + sent / rate, self._send, body, sent, piece, rate, start, close)

    def _send(self, body: memoryview, sent: int, piece: int, rate: float, start: float, close: bool) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(body[sent : sent + piece])
        self._schedule(body, sent + piece, piece, rate, start, close)

    def _done(self, close: bool) -> None:
        self.timer = None
        if close:
            self.transport.close()
            self.busy = False
        else:
            self._next()


async def _listen(web: Web, images: list[bytes], port: int = 0, attempts: int = 20) -> list:
    """One listening socket per host address, all on one port: `port`, or (0) the first address's
    free port, tried again when another process holds that port on a later address."""
    loop = asyncio.get_running_loop()
    site = _Site(web, images)
    last_error: Optional[OSError] = None
    wanted = port
    for _ in range(attempts if wanted == 0 else 1):
        servers, port = [], wanted
        try:
            for host in web.hosts:
                server = await loop.create_server(
                    functools.partial(_Connection, site, host), host.address, port, backlog=4096
                )
                servers.append(server)
                port = server.sockets[0].getsockname()[1]
            site.port = port  # before the port is published: no connection has come yet
            return servers
        except OSError as err:
            last_error = err
            for server in servers:
                server.close()
    raise OSError(f"could not bind {len(web.hosts)} loopback addresses on port {wanted or 'any'}: {last_error}")


def serve(config: EmulatorConfig, images: list[bytes], ready, port: int = 0) -> None:
    """The emulator process: puts its port (or an error message) on `ready`, then serves forever."""

    async def main() -> None:
        try:
            servers = await _listen(Web(config), images, port)
        except OSError as err:
            ready.put(str(err))
            return
        ready.put(servers[0].sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


@dataclass(frozen=True)
class RunningEmulator:
    web: Web
    port: int
    pid: int

    def urls(self, count: int) -> list[str]:
        return [self.web.url(i, self.port) for i in range(count)]


@contextlib.contextmanager
def running(config: EmulatorConfig, images: list[bytes], port: int = 0) -> Iterator[RunningEmulator]:
    """The emulator in its own process (forked: the images are not copied through a pipe), on
    `port` (0: a free one). A fresh emulator starts every URL's attempts from 0, so runs against
    fresh emulators on the same port see the same URLs with the same draws."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    proc = ctx.Process(target=serve, args=(config, images, ready, port), daemon=True)
    proc.start()
    try:
        port = ready.get(timeout=60)
        if isinstance(port, str):
            raise RuntimeError(f"the internet emulator did not start: {port}")
        yield RunningEmulator(Web(config), port, proc.pid)
    finally:
        proc.kill()
        proc.join()
