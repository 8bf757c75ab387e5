"""A loopback HTTP host on raw sockets that misbehaves exactly as scripted (the hostile-host tests).

    with HostileServer({
        "/a.png": response(200, image),                          # the bytes of a whole response
        "/slow": [Pause(0.5), Send(response(200, image))],       # or a script of actions
        "/moody": lambda req: [Send(response(404 if req.method == "HEAD" else 200, image))],
    }, host="127.0.0.2") as server:
        url = server.url("/a.png")                               # http://127.0.0.2:<port>/a.png
        ...
        server.exchanges("/slow")                                # what it was asked and how it went

No http.server: the bytes on the wire are exactly the script's, so it can send what no HTTP library
would (a negative chunk size, a body longer than its Content-Length, garbage after a response, an
endless stream of headers). Each connection has its own thread: it reads a request head, runs the
path's script (unknown paths answer 404), and, unless the script closed the connection, reads the
next request on it (keep-alive). While a script pauses or trickles, the server watches for the
client hanging up and records when (`Exchange.ended`, `Exchange.aborted`): that is how the tests
see when a client gave up on a row.

It listens only on 127.0.0.0/8 (127.0.0.2, 127.0.0.3, ... need no setup on Linux). The response
builders (`response`, `chunked`, `gzip_bytes`, `gzip_bomb`) are below the server.
"""

from __future__ import annotations

import ipaddress
import itertools
import select
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence, Union

_POLL_S = 0.01  # how often a pausing script checks whether the client hung up
_MAX_REQUEST_HEAD = 64 * 1024


@dataclass
class Exchange:
    """One request the server read and how its script went. Times are `time.monotonic()`."""

    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    connection: int  # the server's number for the TCP connection (0, 1, ...)
    index: int  # 0 for the first request on its connection, 1 for the next, ...
    started: float
    ended: Optional[float] = None  # when the script finished, or when the client hung up in it
    aborted: bool = False  # the client hung up before the script was done

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class _Peer:
    """The server's side of one connection, as the actions see it."""

    def __init__(self, sock: socket.socket, stopping: threading.Event):
        self.sock = sock
        self.stopping = stopping

    def gone(self) -> bool:
        """True when the client has closed or reset the connection (or the server is stopping)."""
        if self.stopping.is_set():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds`; False as soon as the client hangs up."""
        end = time.monotonic() + seconds
        while True:
            if self.gone():
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(_POLL_S, left))


# --- script actions: each returns False when the client hung up (the script then stops)


@dataclass(frozen=True)
class Send:
    data: bytes

    def run(self, peer: _Peer) -> bool:
        return peer.send(self.data)


@dataclass(frozen=True)
class Repeat:
    """`data` sent `times` times: huge bodies without holding them in memory."""

    data: bytes
    times: int

    def run(self, peer: _Peer) -> bool:
        return all(peer.send(self.data) for _ in range(self.times))


@dataclass(frozen=True)
class Trickle:
    """`data` in pieces of `step` bytes, `every_s` apart (slowloris)."""

    data: bytes
    step: int
    every_s: float

    def run(self, peer: _Peer) -> bool:
        for start in range(0, len(self.data), self.step):
            if not peer.send(self.data[start : start + self.step]) or not peer.wait(self.every_s):
                return False
        return True


@dataclass(frozen=True)
class Pause:
    seconds: float

    def run(self, peer: _Peer) -> bool:
        return peer.wait(self.seconds)


@dataclass(frozen=True)
class Hang:
    """Send nothing more until the client hangs up (or the server stops)."""

    def run(self, peer: _Peer) -> bool:
        while peer.wait(1.0):
            pass
        return False


@dataclass(frozen=True)
class Close:
    """End the connection after what was sent (FIN): an until-close body ends here."""

    def run(self, peer: _Peer) -> bool:
        try:
            peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # Closing a socket with unread input sends a reset, which can destroy the response in the
        # client's receive buffer: wait (a while) for the client to close its side first.
        peer.wait(5.0)
        return True


@dataclass(frozen=True)
class Reset:
    """Drop the connection with a TCP reset."""

    def run(self, peer: _Peer) -> bool:
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.sock.close()
        return True


Action = Union[Send, Repeat, Trickle, Pause, Hang, Close, Reset]
Script = Union[bytes, Sequence[Action]]
Route = Union[Script, Callable[[Exchange], Script]]
_ENDS_CONNECTION = (Close, Reset, Hang)


class HostileServer:
    """Serve scripted `routes` ({target or path: Route}) on `host`:<free port> (127.0.0.0/8 only)."""

    def __init__(self, routes: Optional[dict[str, Route]] = None, host: str = "127.0.0.2"):
        if not ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).version != 4:
            raise ValueError(f"HostileServer host {host!r}: give an address in 127.0.0.0/8")
        self.routes: dict[str, Route] = dict(routes or {})
        self.host = host
        self._exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._connections = 0
        self._listener: Optional[socket.socket] = None

    # --- lifecycle
    def start(self) -> "HostileServer":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(256)
        listener.settimeout(0.1)
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name=f"hostile:{self.port}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> "HostileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() the server first"
        return self._listener.getsockname()[1]

    def url(self, target: str) -> str:
        return f"http://{self.host}:{self.port}{target}"

    def add(self, target: str, build: Callable[[str], Route]) -> str:
        """Route `target` to `build(its URL)` (so a script can serve its own URL's image); the URL."""
        url = self.url(target)
        self.routes[target] = build(url)
        return url

    # --- what it saw
    def exchanges(self, path: Optional[str] = None) -> list[Exchange]:
        """Every request read (in order), or those for `path` (the query ignored)."""
        with self._lock:
            found = list(self._exchanges)
        return found if path is None else [e for e in found if e.path == path]

    # --- serving
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                number = self._connections
                self._connections += 1
                self._sockets.add(sock)
            thread = threading.Thread(target=self._serve, args=(sock, number), daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        peer = _Peer(sock, self._stopping)
        pending = b""
        try:
            for index in itertools.count():
                head, pending = self._read_head(sock, pending)
                if head is None:
                    return
                exchange = self._parse(head, number, index)
                with self._lock:
                    self._exchanges.append(exchange)
                actions = self._script(exchange)
                finished = all(action.run(peer) for action in actions)  # stops at a hang-up
                exchange.ended, exchange.aborted = time.monotonic(), not finished
                if not finished or any(isinstance(a, _ENDS_CONNECTION) for a in actions):
                    return
        finally:
            with self._lock:
                self._sockets.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _read_head(self, sock: socket.socket, pending: bytes) -> tuple[Optional[bytes], bytes]:
        """(one request head, bytes after it) or (None, b"") when the client is gone."""
        buf = pending
        while b"\r\n\r\n" not in buf:
            if len(buf) > _MAX_REQUEST_HEAD or self._stopping.is_set():
                return None, b""
            readable, _, _ = select.select([sock], [], [], 0.1)
            if not readable:
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                return None, b""
            if not data:
                return None, b""
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        return head, rest  # GET and HEAD requests carry no body

    def _parse(self, head: bytes, number: int, index: int) -> Exchange:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        method, target = (parts + ["", ""])[:2]
        return Exchange(method, target, headers, number, index, time.monotonic())

    def _script(self, exchange: Exchange) -> Sequence[Action]:
        route = self.routes.get(exchange.target, self.routes.get(exchange.path))
        if route is None:
            route = response(404, b"not found", content_type="text/plain")
        if callable(route):
            route = route(exchange)
        if isinstance(route, (bytes, bytearray)):
            return [Send(bytes(route))]
        return list(route)


# --- response builders (bytes exactly as they go on the wire)


def _content_type(body: bytes) -> str:
    if body.startswith(b"\x89PNG"):
        return "image/png"
    if body.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return "application/octet-stream"


def response(
    status: int,
    body: bytes = b"",
    headers: Sequence[tuple[str, Union[str, bytes]]] = (),
    *,
    reason: str = "Whatever",
    content_length: Optional[str] = "auto",
    content_type: Optional[str] = "auto",
) -> bytes:
    """A response: status line, Content-Type, Content-Length (`len(body)` unless `content_length`
    gives the value as text, or None leaves it out), `headers` (a str value is sent as UTF-8, a
    bytes value as it is), a blank line and `body`."""
    lines = [f"HTTP/1.1 {status} {reason}".encode()]
    if content_type is not None:
        lines.append(f"Content-Type: {_content_type(body) if content_type == 'auto' else content_type}".encode())
    if content_length is not None:
        lines.append(f"Content-Length: {len(body) if content_length == 'auto' else content_length}".encode())
    for name, value in headers:
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode("utf-8")))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def redirect(location: str, status: int = 302) -> bytes:
    return response(status, b"", [("Location", location)])


def chunked(body: bytes, size: int = 4096) -> bytes:
    """`body` in HTTP/1.1 chunked framing, `size` bytes per chunk, with the last-chunk marker."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def gzip_bytes(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    return compressor.compress(data) + compressor.flush()


@lru_cache(maxsize=4)
def gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip stream of `inflated_mib` MiB of zeros, ~1/1000 of that size, built in a few ms: one
    MiB deflated after a full flush compresses to the same bytes every time, so it is repeated."""
    mib = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the gzip frame is ours
    block = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    if again != block:
        raise RuntimeError("zlib's output after a full flush is not repeatable here; build the bomb another way")
    tail = compressor.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(inflated_mib):
        crc = zlib.crc32(mib, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # gzip, deflate, no name, no mtime
    trailer = struct.pack("<II", crc, (inflated_mib << 20) & 0xFFFFFFFF)
    return header + block * inflated_mib + tail + trailer
