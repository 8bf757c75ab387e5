"""Fetch one image URL: http/https only, checked addresses, keep-alive, retries, caps.

`Fetcher.fetch(url)` never raises for a bad URL or a bad server: it returns a `FetchResult` whose
`reason` is a stable code from `pipeline.reasons` (None on success). A small HTTP/1.1 client over
plain sockets (GET, identity encoding; Content-Length, chunked and until-close bodies) with a
per-host pool of idle keep-alive connections shared by a download actor's threads: each connection
is pinned to the address the guard checked (see `address_guard`) while sending the original Host
header and TLS server name. (It replaced `http.client`, whose request and header-parsing machinery
cost about three times as much CPU per image request.)

Over 400 lines on purpose: one HTTP exchange (connection pool, request, response framing, redirects,
retries, caps) is read together here, since each part relies on the others' invariants (a pooled
connection is reused only after its response was read to its exact end).
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

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
    body: Optional[Union[bytes, bytearray]]  # often a bytearray: bodies are not copied into bytes
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


class PinnedConnection:
    """One keep-alive connection to `host` over a socket to the already-checked address `ip`
    (https: certificate checked and SNI sent for `host`). Connected on first use. `buffer` holds
    bytes received beyond the response being read."""

    def __init__(
        self, scheme: str, host: str, port: int, ip: str, timeout: float, context: Optional[ssl.SSLContext] = None
    ):
        self.scheme, self.host, self.port, self.pinned_ip = scheme, host, port, ip
        self.timeout = timeout
        self.context = context
        self.sock: Optional[socket.socket] = None
        self.buffer = bytearray()

    def connect(self) -> None:
        sock = socket.create_connection((self.pinned_ip, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                sock = (self.context or ssl.create_default_context()).wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        self.buffer.clear()


class Headers:
    """Response headers: case-insensitive, repeated names kept (`get_all`, as email.Message)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, list[str]] = {}

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self._values.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, default=None):
        return list(self._values.get(name.lower(), [])) or default


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port, address), shared by threads.

    A connection is owned by one thread while in use and returned here only after its response
    was read to the end. At most `max_idle` idle connections are kept in all (oldest closed first).
    """

    def __init__(self, max_idle: int = 256, context: Optional[ssl.SSLContext] = None):
        self.max_idle = max_idle
        self._context = context
        self._idle: "OrderedDict[tuple, list[PinnedConnection]]" = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()
        self.opened = 0  # connections created (for tests and benchmarks)

    @property
    def context(self) -> ssl.SSLContext:
        """The TLS context, made on the first https request (loading the system's CA certificates
        costs ~50 ms of CPU, for nothing in a run over http only)."""
        if self._context is None:
            with self._lock:
                if self._context is None:
                    self._context = ssl.create_default_context()
        return self._context

    def get(self, scheme: str, host: str, port: int, ip: str, timeout: float) -> tuple[PinnedConnection, bool]:
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
        return PinnedConnection(scheme, host, port, ip, timeout, self.context if scheme == "https" else None), False

    def put(self, scheme: str, host: str, port: int, ip: str, conn: PinnedConnection) -> None:
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


_BAD_HOST = re.compile(r"[^A-Za-z0-9._~:%!$&'()*+,;=-]")  # what may stand in a Host header (IPv6: no brackets)
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
        agent = re.sub(r"[\r\n]+", " ", user_agent)
        self._fixed_headers = (
            f"User-Agent: {agent}\r\n"
            "Accept: image/avif,image/webp,image/*,*/*;q=0.8\r\n"
            "Accept-Encoding: identity\r\n\r\n"
        ).encode("latin-1", "replace")

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
                    return FetchResult(
                        body=None, reason=f.reason, detail=f.detail, status=f.status, url=url, attempts=attempt
                    )
                self.sleep(self.retry_backoff_s * (2 ** (attempt - 1)))

    # --- one attempt: a chain of redirects
    def _fetch_following_redirects(self, url: str) -> tuple[int, bytes, str]:
        seen = {url}
        current = url
        for _hop in range(self.max_redirects + 1):
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
            if _BAD_HOST.search(host):
                raise _Failure("invalid_url", f"bad host {host[:100]!r} in {url[:200]!r}")
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
                    raise _Failure("connection_error", f"{url[:200]}: connection closed before a response") from None
                # An idle keep-alive connection the server had closed: try once more on a new one.
                continue
            except _Failure as f:
                if not f.released:
                    conn.close()
                raise
            except BaseException:
                conn.close()
                raise

    def _request_bytes(self, target: str, host: str, port: int, scheme: str) -> bytes:
        default = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        host_header = name if port == default else f"{name}:{port}"
        return f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n".encode("ascii") + self._fixed_headers

    def _exchange(
        self, conn: PinnedConnection, scheme, host, port, ip, target, url, deadline
    ) -> tuple[int, Optional[str], bytes]:
        try:
            if conn.sock is None:
                conn.timeout = max(0.001, deadline - time.monotonic())
                conn.connect()
            try:
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                conn.sock.sendall(self._request_bytes(target, host, port, scheme))
                response = _read_head(conn, deadline)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise _Stale() from exc
            status = response.status
            if status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                self._discard(response, conn, deadline)
                if not location:
                    raise _Failure("bad_redirect", f"{url[:200]}: HTTP {status} without Location", status)
                self._release(response, conn, scheme, host, port, ip)
                return status, location, b""
            if not 200 <= status < 300:
                self._discard(response, conn, deadline)
                self._release(response, conn, scheme, host, port, ip)
                failure = _Failure(http_reason(status), f"{url[:200]}: HTTP {status} {response.reason}", status)
                failure.released = True  # the connection went back to the pool (or was closed)
                raise failure
            if self.directives and img2dataset_parts.is_disallowed(
                response.headers, self.user_agent_token, self.directives
            ):
                values = ", ".join(response.headers.get_all("X-Robots-Tag", []))
                raise _Failure("optout", f"X-Robots-Tag: {values}", status)
            if response.length is not None and response.length > self.max_response_bytes:
                raise _Failure(
                    "response_too_large",
                    f"Content-Length {response.length} > data.max_response_bytes {self.max_response_bytes}",
                    status,
                )
            body = _read_body(response, conn, deadline, self.max_response_bytes)
            if body is None:
                raise _Failure(
                    "response_too_large", f"more than data.max_response_bytes {self.max_response_bytes} bytes", status
                )
            self._release(response, conn, scheme, host, port, ip)
            return status, None, body
        except (_Failure, _Stale):
            raise
        except _Incomplete as exc:
            raise _Failure("connection_error", f"{url[:200]}: response ended early ({exc})") from None
        except _ProtocolError as exc:
            raise _Failure("http_error", f"{url[:200]}: {exc}") from None
        except (socket.timeout, TimeoutError):
            raise _Failure("timeout", f"{url[:200]}: no complete answer in {self.timeout_s:g}s") from None
        except ssl.SSLError as exc:
            raise _Failure("tls_error", f"{url[:200]}: {exc}") from None
        except ssl.CertificateError as exc:  # pragma: no cover - subclass of SSLError on 3.7+
            raise _Failure("tls_error", f"{url[:200]}: {exc}") from None
        except OSError as exc:
            raise _Failure("connection_error", f"{url[:200]}: {type(exc).__name__}: {exc}") from None

    def _discard(self, response: "_Response", conn: PinnedConnection, deadline: float) -> None:
        """Read a small error/redirect body so the connection can be reused; else mark it closing."""
        if response.will_close:
            return
        if (response.length is not None and response.length <= _MAX_DISCARD) or response.chunked:
            if _read_body(response, conn, deadline, _MAX_DISCARD) is None:
                response.will_close = True
        else:
            response.will_close = True

    def _release(self, response: "_Response", conn: PinnedConnection, scheme, host, port, ip) -> None:
        if response.will_close or not response.done:
            conn.close()
        else:
            self.pool.put(scheme, host, port, ip, conn)


# --- the HTTP/1.1 response reader

_MAX_HEAD = 64 * 1024


class _Incomplete(Exception):
    """The server closed the connection before the announced end of the body."""


class _ProtocolError(Exception):
    """Not an HTTP/1.x response (bad status line, bad framing)."""


@dataclass
class _Response:
    status: int
    reason: str
    headers: Headers
    length: Optional[int]  # Content-Length (None: chunked or until close)
    chunked: bool
    will_close: bool
    done: bool = False  # the body was read to its end


def _receive(conn: PinnedConnection, deadline: float) -> int:
    """Append what the socket has (at most _READ_CHUNK bytes) to conn.buffer; 0 at end of stream."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise socket.timeout()
    conn.sock.settimeout(remaining)
    data = conn.sock.recv(_READ_CHUNK)
    conn.buffer += data
    return len(data)


def _read_head(conn: PinnedConnection, deadline: float) -> _Response:
    """Status line and headers (1xx interim responses skipped). _Stale when the connection ends
    before the first byte of a response (an idle keep-alive connection the server had closed)."""
    buf = conn.buffer
    first = True
    while True:
        searched = 0
        while True:
            end = buf.find(b"\r\n\r\n", max(0, searched - 3))
            if end >= 0:
                break
            if len(buf) > _MAX_HEAD:
                raise _ProtocolError(f"response headers longer than {_MAX_HEAD} bytes")
            searched = len(buf)
            if not _receive(conn, deadline):
                if first and not buf:
                    raise _Stale()
                raise _Incomplete(f"connection closed inside the response headers ({len(buf)} bytes)")
        first = False
        head = bytes(buf[:end])
        del buf[: end + 4]
        lines = head.split(b"\r\n")
        status_line = lines[0].decode("latin-1")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
            raise _ProtocolError(f"not an HTTP/1.x status line: {status_line[:100]!r}")
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            continue  # 100 Continue, 103 Early Hints: the real response follows
        headers = Headers()
        last = None
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t") and last is not None:  # obsolete line folding
                values = headers._values[last]
                values[-1] = values[-1] + " " + line.strip().decode("latin-1")
                continue
            name, sep, value = line.partition(b":")
            if not sep or not name.strip():
                raise _ProtocolError(f"malformed header line {line[:100]!r}")
            last = name.strip().decode("latin-1").lower()
            headers.add(last, value.strip().decode("latin-1"))
        version = parts[0]
        connection = (headers.get("Connection") or "").lower()
        chunked = "chunked" in (headers.get("Transfer-Encoding") or "").lower()
        length = None
        if status in (204, 304) or status == 101:
            length = 0
        elif not chunked:
            raw = headers.get("Content-Length")
            if raw is not None:
                raw = raw.split(",")[0].strip()
                if not raw.isdigit():
                    raise _ProtocolError(f"bad Content-Length {raw[:40]!r}")
                length = int(raw)
        will_close = (
            "close" in connection
            or (version == "HTTP/1.0" and "keep-alive" not in connection)
            or (not chunked and length is None)
        )
        return _Response(status, parts[2] if len(parts) > 2 else "", headers, length, chunked, will_close)


def _read_exactly(conn: PinnedConnection, n: int, deadline: float) -> Union[bytes, bytearray]:
    """The next `n` bytes of the stream. A body larger than what is buffered is received straight
    into its own buffer (no copy through `conn.buffer`), and never past its end, so the bytes of a
    next response stay in the socket."""
    buf = conn.buffer
    have = len(buf)
    if have == n:  # the usual case: the rest of the response came with its head; take it whole
        conn.buffer = bytearray()
        return buf
    if have > n:
        with memoryview(buf) as view:
            data = bytes(view[:n])
        del buf[:n]
        return data
    out = bytearray(n)
    out[:have] = buf
    buf.clear()
    view = memoryview(out)
    got = have
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        conn.sock.settimeout(remaining)
        received = conn.sock.recv_into(view[got:], n - got)
        if not received:
            raise _Incomplete(f"{got} of {n} bytes read")
        got += received
    view.release()
    return out


def _read_line(conn: PinnedConnection, deadline: float, limit: int = 4096) -> bytes:
    buf = conn.buffer
    while True:
        end = buf.find(b"\r\n")
        if end >= 0:
            line = bytes(buf[:end])
            del buf[: end + 2]
            return line
        if len(buf) > limit:
            raise _ProtocolError("chunk header line too long")
        if not _receive(conn, deadline):
            raise _Incomplete("connection closed inside a chunked body")


def _read_body(response: _Response, conn: PinnedConnection, deadline: float, cap: int) -> Optional[bytes]:
    """The whole body, or None when it is larger than `cap` (the connection is then unusable)."""
    if response.length is not None:
        if response.length > cap:
            response.will_close = True
            return None
        body = _read_exactly(conn, response.length, deadline)
    elif response.chunked:
        parts, total = [], 0
        while True:
            size_field = _read_line(conn, deadline).split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise _ProtocolError(f"bad chunk size {size_field[:20]!r}") from None
            if size == 0:
                while _read_line(conn, deadline):  # trailers, up to the empty line
                    pass
                break
            total += size
            if total > cap:
                response.will_close = True
                return None
            parts.append(_read_exactly(conn, size, deadline))
            if _read_exactly(conn, 2, deadline) != b"\r\n":
                raise _ProtocolError("chunk not followed by CRLF")
        body = b"".join(parts)
    else:  # until the server closes the connection
        while _receive(conn, deadline):
            if len(conn.buffer) > cap:
                response.will_close = True
                return None
        body = bytes(conn.buffer)
        conn.buffer.clear()
    response.done = True
    return body


class _Stale(Exception):
    """The server closed the connection before answering (a stale keep-alive connection)."""
