"""A loopback HTTP server for tests: serves images and misbehaves on purpose.

    from tests.support.http_server import HTTPTestServer, Route

    with HTTPTestServer({"/a.jpg": jpeg_bytes, "/gone": Route(status=404),
                         "/slow": Route(body=jpeg_bytes, delay_s=0.5), "/hang": Route(hang=True),
                         "/reset": Route(reset=True), "/loop": Route(redirect="/loop"),
                         "/optout": Route(body=jpeg_bytes, headers={"X-Robots-Tag": "noai"})}) as server:
        url = server.url("/a.jpg")          # http://127.0.0.1:<port>/a.jpg
        ...
        assert server.paths() == ["/a.jpg"]  # what it was asked for, in order

It listens on 127.0.0.1 with an OS-chosen port, speaks HTTP/1.1 with keep-alive (HTTPS when given
a server-side `ssl_context`), records every request it receives (path, headers, client address),
and answers a path it does not know with 404.
`stop()` (or leaving the `with`) also releases handlers that hang.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Union


@dataclass
class Route:
    """How the server answers one path.

    body: the response body (bytes). status: HTTP status. headers: extra headers.
    content_type: defaults from the body's magic bytes (image/jpeg, image/png, ...).
    redirect: a path or URL; answers `status` (302 when left at 200) with this Location.
    delay_s: wait this long before answering. hang: never answer (until the server stops).
    reset: read the request, then drop the connection with a TCP reset.
    truncate_to: announce the full Content-Length but send only this many bytes, then close.
    handler: a function(request_handler) -> None that writes the whole response itself.
    """

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_type: Optional[str] = None
    redirect: Optional[str] = None
    delay_s: float = 0.0
    hang: bool = False
    reset: bool = False
    truncate_to: Optional[int] = None
    handler: Optional[Callable[[BaseHTTPRequestHandler], None]] = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    client: tuple
    time: float


def guess_content_type(body: bytes) -> str:
    if body.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if body.startswith(b"\x89PNG"):
        return "image/png"
    if body.startswith(b"GIF8"):
        return "image/gif"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "image/webp"
    if body.lstrip()[:1] == b"<":
        return "text/html; charset=utf-8"
    return "application/octet-stream"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - silence the per-request log
        pass

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_GET(self):  # noqa: N802
        owner = self.server.owner
        owner._record(self)
        route = owner.routes.get(self.path.split("#", 1)[0])
        if route is None:
            route = owner.routes.get(self.path.split("?", 1)[0])
        if route is None:
            route = Route(body=b"not found", status=404, content_type="text/plain")
        elif isinstance(route, (bytes, bytearray)):
            route = Route(body=bytes(route))
        if route.handler is not None:
            route.handler(self)
            return
        if route.hang:
            owner._stopping.wait(timeout=600)
            self.close_connection = True
            return
        if route.delay_s:
            time.sleep(route.delay_s)
        if route.reset:
            # SO_LINGER with a zero timeout turns close() into a TCP RST.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        status = route.status
        headers = dict(route.headers)
        if route.redirect is not None:
            status = 302 if status == 200 else status
            headers["Location"] = route.redirect
        body = route.body
        self.send_response(status)
        self.send_header("Content-Type", route.content_type or guess_content_type(body))
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if route.truncate_to is not None:
            self.wfile.write(body[: route.truncate_to])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, owner: "HTTPTestServer", host: str):
        self.owner = owner
        super().__init__((host, 0), _Handler)

    def handle_error(self, request, client_address):
        # Clients that give up (timeouts, resets) make handlers fail on write: expected here.
        import sys

        self.owner.errors.append(repr(sys.exc_info()[1]))


class HTTPTestServer:
    """Serve `routes` ({path: bytes | Route}) on 127.0.0.1:<free port> in a background thread."""

    def __init__(
        self,
        routes: Optional[dict[str, Union[bytes, Route]]] = None,
        host: str = "127.0.0.1",
        record: bool = True,
        ssl_context=None,
    ):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the test server only listens on loopback")
        self.routes: dict[str, Union[bytes, Route]] = dict(routes or {})
        self.host = host
        self.record = record
        self.ssl_context = ssl_context  # an ssl.SSLContext (server side) to serve https
        self._requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # exceptions in handlers (clients that went away)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle
    def start(self) -> "HTTPTestServer":
        self._server = _Server(self, self.host)
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"http-test-server:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run in the calling thread (e.g. in a subprocess of a benchmark) until stop()."""
        self._server = _Server(self, self.host)
        self._server.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HTTPTestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- addresses
    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        if not path.startswith("/"):
            path = "/" + path
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}{path}"

    def add(self, path: str, route: Union[bytes, Route]) -> None:
        self.routes[path] = route

    # --- what it saw
    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        if not self.record:
            with self._lock:
                self._count = getattr(self, "_count", 0) + 1
            return
        req = RecordedRequest(
            handler.command, handler.path, dict(handler.headers.items()), handler.client_address, time.time()
        )
        with self._lock:
            self._requests.append(req)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def request_count(self) -> int:
        with self._lock:
            return len(self._requests) if self.record else getattr(self, "_count", 0)

    def connections(self) -> int:
        """Distinct client (address, port) pairs seen: fewer than requests means keep-alive worked."""
        return len({r.client for r in self.requests})


# --- images to serve (deterministic; small, so tests stay fast)


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB", quality: int = 90) -> bytes:
    """A smooth random JPEG (`mode` RGB, L or CMYK), different for each seed (photo-like: a coarse
    random grid upsampled bicubically, so resampling methods agree on it as they do on photos)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).convert(mode)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGBA") -> bytes:
    """A random PNG (`mode` RGBA for one with alpha, RGB, L, 1, ...)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A small valid JPEG whose frame header claims `width` x `height` (a decompression bomb)."""
    data = bytearray(jpeg_bytes(16, 16))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], (data[i + 2] << 8) | data[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data[i + 5 : i + 7] = height.to_bytes(2, "big")
            data[i + 7 : i + 9] = width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + length
    raise AssertionError("no frame header found")
