"""The download benchmarks' image host: photo-like JPEGs and a loopback HTTP server (its own
process: one asyncio event loop with prebuilt responses, HTTP/1.1 keep-alive, pipelined requests
answered in order, `Connection: close` and HTTP/1.0 honoured), so the server spends its CPU on the
socket work alone, as a static file server does."""

from __future__ import annotations

import asyncio
import io


def make_images(n: int, width: int = 512, height: int = 384, seed: int = 0) -> list[bytes]:
    import cv2
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.normal(128, 60, (height // 8, width // 8, 3)).clip(0, 255).astype(np.uint8)
        image = cv2.GaussianBlur(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), (0, 0), 2)
        image = (image.astype(np.int16) + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _ImageProtocol(asyncio.Protocol):
    """One connection of the benchmark's image server: HTTP/1.1 GET with keep-alive (pipelined
    requests answered in order), `Connection: close` and HTTP/1.0 honoured; every response is
    prebuilt, so the server spends its CPU on the socket work alone (like a static file server)."""

    def __init__(self, keep_alive: dict[bytes, bytes], closing: dict[bytes, bytes]):
        self.keep_alive, self.closing, self.pending = keep_alive, closing, b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.pending + data if self.pending else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.pending = buf
                return
            head, buf = buf[:end], buf[end + 4 :]
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            path = parts[1] if len(parts) == 3 else b""
            close = parts[-1] == b"HTTP/1.0" or b"connection: close" in headers.lower()
            self.transport.write((self.closing if close else self.keep_alive).get(path, NOT_FOUND))
            if close:
                self.transport.close()
                self.pending = b""
                return

    def eof_received(self):
        return None  # close our side too


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def serve(images: list[bytes], urls: int, ready) -> None:
    """The loopback image server (its own process): one asyncio event loop with prebuilt
    responses. Both tools download from it. It used to be the tests' `http.server` one, whose
    Python request handling cost 0.2-0.6 ms of CPU per image on the cores the tools run on; a
    real image host costs the downloading machine nothing, this one ~0.05 ms per image."""

    def response(body: bytes, close: bool) -> bytes:
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        return head.encode("ascii") + body

    keep_alive = [response(b, False) for b in images]
    closing = [response(b, True) for b in images]
    paths = [f"/img/{i}.jpg".encode("ascii") for i in range(urls)]
    keep_map = {p: keep_alive[i % len(images)] for i, p in enumerate(paths)}
    close_map = {p: closing[i % len(images)] for i, p in enumerate(paths)}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _ImageProtocol(keep_map, close_map), "127.0.0.1", 0, backlog=1024)
        ready.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())
