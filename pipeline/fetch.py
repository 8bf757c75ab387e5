"""Fetch one image URL: http/https only, checked addresses, keep-alive, retries, caps.

`Fetcher.fetch(url)` never raises for a bad URL or a bad server: it returns a `FetchResult` whose
`reason` is a stable code from `pipeline.reasons` (None on success). Built on `http.client` with a
per-host pool of idle keep-alive connections shared by a download actor's threads, because that
is what lets the connection be pinned to the address the guard checked (see `address_guard`)
while sending the original Host header and TLS server name.
"""
from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from pipeline import img2dataset_parts
from pipeline.address_guard import AddressGuard, AddressRefused, ResolveError
from pipeline.reasons import http_reason

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_REASONS = frozenset({"timeout", "connection_error"})
_READ_CHUNK = 1 << 18
_MAX_DISCARD = 1 << 16  # redirect bodies larger than this close the connection instead


@dataclass
class FetchResult:
    body: Optional[bytes]
    reason: Optional[str] = None  # None: success
    detail: str = ""
    status: Optional[int] = None
    url: str = ""  # the final URL after redirects
    attempts: int = 0


class _Failure(Exception):
    def __init__(self, reason: str, detail: str, status: Optional[int] = None):
        super().__init__(detail)
        self.reason, self.detail, self.status = reason, detail, status
        self.released = False


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to `host` that connects to the already-checked address `ip`."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.pinned_ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.pinned_ip, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to `host` (certificate checked and SNI sent for `host`) over a socket to `ip`."""

    def __init__(self, host: str, port: int, ip: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.pinned_ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self.pinned_ip, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port, address), shared by threads.

    A connection is owned by one thread while in use and returned here only after its response
    was read to the end. At most `max_idle` idle connections are kept in all (oldest closed first).
    """

    def __init__(self, max_idle: int = 256, context: Optional[ssl.SSLContext] = None):
        self.max_idle = max_idle
        self.context = context or ssl.create_default_context()
        self._idle: "OrderedDict[tuple, list[http.client.HTTPConnection]]" = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()
        self.opened = 0  # connections created (for tests and benchmarks)

    def get(self, scheme: str, host: str, port: int, ip: str, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, reused)."""
        key = (scheme, host, port, ip)
        with self._lock:
            conns = self._idle.get(key)
            if conns:
                conn = conns.pop()
                self._count -= 1
                if not conns:
                    del self._idle[key]
                return conn, True
            self.opened += 1
        if scheme == "https":
            return PinnedHTTPSConnection(host, port, ip, timeout, self.context), False
        return PinnedHTTPConnection(host, port, ip, timeout), False

    def put(self, scheme: str, host: str, port: int, ip: str, conn: http.client.HTTPConnection) -> None:
        key = (scheme, host, port, ip)
        evicted = []
        with self._lock:
            self._idle.setdefault(key, []).append(conn)
            self._idle.move_to_end(key)
            self._count += 1
            while self._count > self.max_idle:
                old_key, old = next(iter(self._idle.items()))
                evicted.append(old.pop(0))
                self._count -= 1
                if not old:
                    del self._idle[old_key]
        for c in evicted:
            c.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
            self._count = 0
        for c in conns:
            c.close()




_NEEDS_QUOTING = re.compile(r'[^\x21-\x7e]|["<>\\^`{|}]')


def request_target(parts: urllib.parse.SplitResult) -> str:
    """Path and query, percent-encoded where the URL list left spaces or non-ASCII characters."""
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if _NEEDS_QUOTING.search(target) is None:  # the common case: already a valid request target
        return target
    return urllib.parse.quote(target, safe="!#$%&'()*+,/:;=?@[]~")


class Fetcher:
    """Downloads URLs with the rules of the `data` config; thread-safe, one per download actor."""

    def __init__(
        self,
        *,
        guard: Optional[AddressGuard] = None,
        timeout_s: float = 10.0,
        retries: int = 2,
        retry_backoff_s: float = 0.5,
        max_redirects: int = 5,
        max_response_bytes: int = 32 * 1024 * 1024,
        user_agent: str = "clipray",
        user_agent_token: Optional[str] = None,
        disallowed_header_directives: Iterable[str] = (),
        pool: Optional[ConnectionPool] = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.guard = guard or AddressGuard()
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.max_redirects = max_redirects
        self.max_response_bytes = max_response_bytes
        self.user_agent = user_agent
        self.user_agent_token = user_agent_token.strip().lower() if user_agent_token else None
        self.directives = {d.strip().lower() for d in disallowed_header_directives}
        self.pool = pool or ConnectionPool()
        self.sleep = sleep

    def close(self) -> None:
        self.pool.close()

    def fetch(self, url: str) -> FetchResult:
        attempt = 0
        while True:
            attempt += 1
            try:
                status, body, final_url = self._fetch_following_redirects(url)
                return FetchResult(body=body, url=final_url, status=status, attempts=attempt)
            except _Failure as f:
                retryable = f.reason in RETRY_REASONS or (f.status in RETRY_STATUSES)
                if not retryable or attempt > self.retries:
                    return FetchResult(body=None, reason=f.reason, detail=f.detail, status=f.status,
                                       url=url, attempts=attempt)
                self.sleep(self.retry_backoff_s * (2 ** (attempt - 1)))

    # --- one attempt: a chain of redirects
    def _fetch_following_redirects(self, url: str) -> tuple[int, bytes, str]:
        seen = {url}
        current = url
        for hop in range(self.max_redirects + 1):
            status, location, body = self._get(current)
            if location is None:
                return status, body, current
            nxt = urllib.parse.urljoin(current, location)
            if nxt in seen:
                raise _Failure("redirect_loop", f"{current} redirects back to {nxt}", status)
            seen.add(nxt)
            current = nxt
        raise _Failure("too_many_redirects", f"more than {self.max_redirects} redirects from {url} (last {current})")

    def _parse(self, url: str) -> tuple[str, str, int, str]:
        try:
            parts = urllib.parse.urlsplit(url.strip())
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise _Failure("unsupported_scheme", f"{scheme or 'no'} scheme in {url[:200]!r}: only http and https")
            host = parts.hostname
            if not host:
                raise _Failure("invalid_url", f"no host in {url[:200]!r}")
            port = parts.port or (443 if scheme == "https" else 80)
            if not host.isascii():
                host = host.encode("idna").decode("ascii")
            return scheme, host, port, request_target(parts)
        except _Failure:
            raise
        except (ValueError, UnicodeError) as exc:
            raise _Failure("invalid_url", f"{url[:200]!r}: {exc}") from None

    def _get(self, url: str) -> tuple[int, Optional[str], bytes]:
        """(status, redirect location or None, body) for one request; raises _Failure."""
        scheme, host, port, target = self._parse(url)
        try:
            ip = self.guard.resolve(host, port)
        except AddressRefused as exc:
            raise _Failure("blocked_address", str(exc)) from None
        except ResolveError as exc:
            raise _Failure("dns_error", str(exc)) from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            conn, reused = self.pool.get(scheme, host, port, ip, self.timeout_s)
            try:
                return self._exchange(conn, scheme, host, port, ip, target, url, deadline)
            except _Stale:
                conn.close()
                if not reused:
                    raise _Failure("connection_error", f"{url[:200]}: connection closed before a response")
                # An idle keep-alive connection the server had closed: try once more on a new one.
                continue
            except _Failure as f:
                if not f.released:
                    conn.close()
                raise
            except BaseException:
                conn.close()
                raise

    def _exchange(self, conn, scheme, host, port, ip, target, url, deadline) -> tuple[int, Optional[str], bytes]:
        headers = {
            "User-Agent": self.user_agent,
            "Accept": "image/avif,image/webp,image/*,*/*;q=0.8",
            "Accept-Encoding": "identity",
        }
        try:
            conn.timeout = max(0.001, deadline - time.monotonic())
            if conn.sock is not None:
                conn.sock.settimeout(conn.timeout)
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                raise _Stale() from exc
            status = resp.status
            if status in REDIRECT_STATUSES:
                location = resp.getheader("Location")
                self._discard(resp, conn, deadline)
                if not location:
                    raise _Failure("bad_redirect", f"{url[:200]}: HTTP {status} without Location", status)
                self._release(resp, conn, scheme, host, port, ip)
                return status, location, b""
            if not 200 <= status < 300:
                self._discard(resp, conn, deadline)
                self._release(resp, conn, scheme, host, port, ip)
                failure = _Failure(http_reason(status), f"{url[:200]}: HTTP {status} {resp.reason}", status)
                failure.released = True  # the connection went back to the pool
                raise failure
            if self.directives and img2dataset_parts.is_disallowed(resp.headers, self.user_agent_token, self.directives):
                values = ", ".join(resp.headers.get_all("X-Robots-Tag", []))
                raise _Failure("optout", f"X-Robots-Tag: {values}", status)
            length = resp.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > self.max_response_bytes:
                raise _Failure("response_too_large",
                               f"Content-Length {int(length)} > data.max_response_bytes {self.max_response_bytes}", status)
            body = self._read_body(resp, conn, deadline)
            self._release(resp, conn, scheme, host, port, ip)
            return status, None, body
        except _Failure:
            raise
        except _Stale:
            raise
        except (socket.timeout, TimeoutError):
            raise _Failure("timeout", f"{url[:200]}: no complete answer in {self.timeout_s:g}s") from None
        except ssl.SSLError as exc:
            raise _Failure("tls_error", f"{url[:200]}: {exc}") from None
        except ssl.CertificateError as exc:  # pragma: no cover - subclass of SSLError on 3.7+
            raise _Failure("tls_error", f"{url[:200]}: {exc}") from None
        except http.client.IncompleteRead as exc:
            raise _Failure("connection_error", f"{url[:200]}: response ended early ({len(exc.partial)} bytes read)") from None
        except (ConnectionError, http.client.RemoteDisconnected) as exc:
            raise _Failure("connection_error", f"{url[:200]}: {type(exc).__name__}: {exc}") from None
        except http.client.HTTPException as exc:
            raise _Failure("http_error", f"{url[:200]}: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise _Failure("connection_error", f"{url[:200]}: {type(exc).__name__}: {exc}") from None

    def _read_body(self, resp: http.client.HTTPResponse, conn, deadline: float) -> bytes:
        chunks = []
        total = 0
        while resp.length != 0:  # None: chunked or until close; 0: all announced bytes read
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            chunk = resp.read1(_READ_CHUNK)
            if not chunk:
                if resp.length:  # the server closed before the announced Content-Length
                    raise http.client.IncompleteRead(b"".join(chunks), resp.length)
                break
            total += len(chunk)
            if total > self.max_response_bytes:
                raise _Failure("response_too_large",
                               f"more than data.max_response_bytes {self.max_response_bytes} bytes", resp.status)
            chunks.append(chunk)
        resp.close()  # the response is done; the socket stays open for the next request
        return b"".join(chunks)

    def _discard(self, resp: http.client.HTTPResponse, conn, deadline: float) -> None:
        """Read a small error/redirect body so the connection can be reused; else mark it closing."""
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) <= _MAX_DISCARD:
            if conn.sock is not None:
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
            resp.read()
        else:
            resp.will_close = True
            resp.close()

    def _release(self, resp: http.client.HTTPResponse, conn, scheme, host, port, ip) -> None:
        if resp.will_close or not resp.isclosed():
            conn.close()
        else:
            self.pool.put(scheme, host, port, ip, conn)


class _Stale(Exception):
    """The server closed the connection before answering (a stale keep-alive connection)."""
