"""One GET on a libcurl easy handle: the request's options, the response head and body, the cap,
and libcurl's outcome as one of the pipeline's reason codes.

libcurl parses the response (status line, headers, Content-Length / chunked / until-close framing,
gzip and deflate content encoding, 1xx interim responses, excess bytes that close a keep-alive
connection instead of being read as the next response). What is ours:

- the connection goes only to the addresses the address guard checked: `CURLOPT_RESOLVE` pins the
  host name to them for this transfer (libcurl does no name resolution of its own), and the
  socket-open callback refuses any other address (through a proxy: the proxy's address);
- the size cap (`data.max_response_bytes`): libcurl refuses a Content-Length above it before the
  body (`CURLOPT_MAXFILESIZE_LARGE`), and the write callback counts the body as libcurl hands it
  over, *decoded* (chunked, until close, gzip/deflate), and stops the transfer at the first piece
  that passes the cap, so a small gzip body that inflates to gigabytes costs at most the cap plus
  one piece. libcurl stops such bodies itself only from 8.4.0 (bodies in progress) and 8.20.0
  (decoded bytes); a pycurl built on an older system libcurl would not, so the count is ours;
- a kept-alive connection with bytes waiting is not reused (`reuse_check.py`);
- header lines are appended to a list by a callback bound to `list.append` (no Python frame per
  line), body pieces (at most 16 KiB each) by `_write` (one short frame per piece, ~5 for a 70 kB
  image); the final head is parsed once, at the end.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Optional

import pycurl

from pipeline.http.reuse_check import ReuseCheck

STALE = "stale_connection"  # not a row's reason: the fetcher sends the request again on a new connection
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_BUFFER = 1 << 18  # libcurl's receive buffer: fewer socket reads

# libcurl error numbers -> reasons (pipeline/reasons.py). Anything else is an `http_error`.
_TLS_ERRORS = {35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98}
_CONNECTION_ERRORS = {5, 7, 18, 45, 52, 55, 56, 97}
_REASONS = {
    3: "invalid_url",
    6: "dns_error",
    28: "timeout",
    63: "response_too_large",
    **{n: "tls_error" for n in _TLS_ERRORS},
    **{n: "connection_error" for n in _CONNECTION_ERRORS},
}


def default_ca_file() -> Optional[str]:
    """The system's CA bundle (what Python's `ssl` trusts), else certifi's; None: libcurl's own."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return candidate
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


class Headers:
    """Response headers: case-insensitive, repeated names kept (`get_all`, as email.Message)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, list[str]] = {}

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(name.lower(), []).append(value)

    def fold(self, name: str, more: str) -> None:
        """An obsolete folded continuation line of the last header `name`."""
        values = self._values.get(name)
        if values:
            values[-1] = f"{values[-1]} {more}"

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self._values.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, default=None):
        return list(self._values.get(name.lower(), [])) or default


class Outcome:
    """What one exchange ended with: a response (`status`, `headers`, `body`: the whole decoded
    body for a 2xx, b"" for anything else) or a failure (`reason`, `detail`)."""

    __slots__ = ("status", "headers", "body", "reason", "detail")

    def __init__(self, status=None, headers=None, body=b"", reason=None, detail=""):
        self.status, self.headers, self.body, self.reason, self.detail = status, headers, body, reason, detail


class Exchange:
    """A libcurl easy handle and the state of the one request it carries at a time."""

    def __init__(
        self,
        *,
        user_agent: str,
        max_response_bytes: int,
        ca_file: Optional[str],
        reuse_check: ReuseCheck,
        reuse_connections: bool = True,
    ):
        self.cap = max_response_bytes
        c = self.handle = pycurl.Curl()
        c.setopt(pycurl.NOSIGNAL, 1)
        # HTTP/1.1 only: one request per connection at a time, so `reuse_check` can tell a stale
        # connection by any byte waiting on it (HTTP/2 sends frames on idle connections).
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.FOLLOWLOCATION, 0)  # redirects are followed by the fetcher, hop by hop, each checked
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.USERAGENT, user_agent)
        c.setopt(pycurl.HTTPHEADER, ["Accept: image/avif,image/webp,image/*,*/*;q=0.8"])
        c.setopt(pycurl.ACCEPT_ENCODING, "gzip, deflate")
        c.setopt(pycurl.MAXFILESIZE_LARGE, max_response_bytes)
        c.setopt(pycurl.BUFFERSIZE, _BUFFER)
        c.setopt(pycurl.SSL_VERIFYPEER, 1)
        c.setopt(pycurl.SSL_VERIFYHOST, 2)
        if ca_file:
            c.setopt(pycurl.CAINFO, ca_file)
        self._lines: list[bytes] = []  # every header line received, 1xx and proxy CONNECT heads included
        self._chunks: list[bytes] = []  # the body as libcurl hands it over (decoded)
        c.setopt(pycurl.HEADERFUNCTION, self._lines.append)
        c.setopt(pycurl.WRITEFUNCTION, self._write)
        c.setopt(pycurl.OPENSOCKETFUNCTION, self._open_socket)
        c.setopt(pycurl.PREREQFUNCTION, self._before_request)
        c.setopt(pycurl.FORBID_REUSE, 0 if reuse_connections else 1)
        self.reuse_check = reuse_check
        reuse_check.configure(c)
        self.url = ""
        self.allowed: Optional[frozenset[str]] = None
        self._reset()

    def _reset(self) -> None:
        self._lines.clear()
        self._chunks.clear()
        self._refused: Optional[str] = None
        self._stale = False  # the connection had bytes waiting: the request was not sent
        self._received = 0  # body bytes handed over (decoded)

    def prepare(
        self,
        url: str,
        host: str,
        port: int,
        addresses: list[str],
        proxy: Optional[str],
        timeout_s: float,
        fresh: bool = False,
    ) -> pycurl.Curl:
        """Set the handle up for GET `url`, connecting only to `addresses` (the guard's answer for
        `host`) or, with `proxy`, through that proxy; libcurl gives up after `timeout_s`. fresh: on
        a new connection (the last one offered was stale)."""
        self._reset()
        self.url = url
        c = self.handle
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.FRESH_CONNECT, 1 if fresh else 0)
        c.setopt(pycurl.PROXY, proxy or "")  # "" also keeps libcurl from reading proxy variables itself
        if proxy:
            self.allowed = None  # the proxy connects to the host; the guard checked the host's name
            c.setopt(pycurl.RESOLVE, [])
        else:
            self.allowed = frozenset(addresses)
            shown = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
            c.setopt(pycurl.RESOLVE, [f"+{host.strip('[]')}:{port}:{shown}"])
        ms = max(1, int(timeout_s * 1000))
        c.setopt(pycurl.TIMEOUT_MS, ms)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, ms)
        return c

    def connections_made(self) -> int:
        """New connections the last transfer opened (0: it reused a kept-alive one)."""
        return self.handle.getinfo(pycurl.NUM_CONNECTS)

    def close(self) -> None:
        self.handle.close()

    # --- libcurl's callbacks (on the network thread)

    def _open_socket(self, purpose, address):
        family, socktype, protocol, addr = address
        if self.allowed is not None and addr[0] not in self.allowed:
            self._refused = addr[0]
            return None  # CURL_SOCKET_BAD: libcurl does not connect
        return socket.socket(family, socktype, protocol)

    def _write(self, piece: bytes) -> Optional[int]:
        self._received += len(piece)
        if self._received > self.cap:
            return 0  # a short write: libcurl stops the transfer (CURLE_WRITE_ERROR)
        self._chunks.append(piece)
        return None

    def _before_request(self, primary_ip: str, local_ip: str, primary_port: int, local_port: int) -> int:
        if self.reuse_check.reusable(local_ip, local_port):
            return pycurl.PREREQFUNC_OK
        self._stale = True
        return pycurl.PREREQFUNC_ABORT

    # --- the outcome

    def outcome(self, errno: int, message: str) -> Outcome:
        """The exchange's result once libcurl finished it with `errno` (0: complete)."""
        url = self.url[:200]
        if self._stale:
            return Outcome(reason=STALE, detail=f"{url}: a kept-alive connection had bytes waiting")
        if self._refused is not None:
            return Outcome(
                reason="blocked_address",
                detail=f"{url}: libcurl was about to connect to {self._refused}, not an address the guard checked",
            )
        status, headers, complete = final_head(self._lines)
        if errno == 0:
            if status is None:
                return Outcome(reason="http_error", detail=f"{url}: not an HTTP status line: {self._status_line()!r}")
            if not complete:  # libcurl accepts a head cut off by the connection's end
                return Outcome(
                    reason="connection_error", detail=f"{url}: the connection closed inside the response head"
                )
            chunks = self._chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            return Outcome(status, headers, body)
        reason = "response_too_large" if self._received > self.cap else _REASONS.get(errno, "http_error")
        if errno == pycurl.E_RECV_ERROR and ("chunk" in message or "header" in message):
            reason = "http_error"  # bad chunked framing, headers past libcurl's cap: the server, not the network
        if reason == "response_too_large":  # announced by Content-Length, or counted as decoded
            counted = f", {self._received} bytes decoded when stopped" if self._received > self.cap else ""
            message = f"more than data.max_response_bytes {self.cap} bytes ({message}{counted})"
        return Outcome(status, headers, reason=reason, detail=f"{url}: {message} (curl {errno})")

    def _status_line(self) -> bytes:
        found = [line for line in self._lines if line[:5] == b"HTTP/"]
        return found[-1][:80] if found else b""


def final_head(lines: list[bytes]) -> tuple[Optional[int], Headers, bool]:
    """(status, headers, ended) of the last response head in `lines` (header lines as libcurl
    passes them, 1xx heads and a proxy's CONNECT answer first). status is None when the status line
    is not `HTTP/x.y NNN` (libcurl itself takes `HTTP/1.1 2000` as status 2000); ended is False when
    the head's empty line never came. Lines after that empty line are a chunked body's trailers."""
    start = len(lines) - 1
    while start >= 0 and lines[start][:5] != b"HTTP/":
        start -= 1
    headers = Headers()
    if start < 0:
        return None, headers, False
    parts = lines[start].split(None, 2)
    code = parts[1] if len(parts) > 1 else b""
    status = int(code) if len(code) == 3 and code.isdigit() else None
    last = None
    for line in lines[start + 1 :]:
        if line in (b"\r\n", b"\n"):
            return status, headers, True  # what follows are a chunked body's trailers: not headers
        if line[:1] in (b" ", b"\t"):  # an obsolete folded continuation line
            if last is not None:
                headers.fold(last, line.strip().decode("latin-1"))
            continue
        name, sep, value = line.partition(b":")
        if sep:
            last = name.strip().decode("latin-1").lower()
            headers.add(last, value.strip().decode("latin-1"))
    return status, headers, False
