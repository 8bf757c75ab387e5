"""The hostile-host tests' own tools, without Ray: URL images survive what the pipeline does to an
image and a foreign image never passes for one; the raw server sends exactly its script, keeps the
connection alive, and sees a client hang up; the gzip bomb inflates to what it says."""

from __future__ import annotations

import io
import socket
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.support.hostile_server import (
    HostileServer,
    Pause,
    Send,
    chunked,
    gzip_bomb,
    gzip_bytes,
    redirect,
    response,
)
from tests.support.http_server import jpeg_bytes
from tests.support.url_images import decode_url_bits, identity_problems, url_bits, url_image


def pipeline_like(encoded: bytes, size: int, quality: int, interpolation: int) -> bytes:
    """Decode, resize to `size` square with OpenCV and re-encode as JPEG: what a stored image went through."""
    pixels = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    resized = cv2.resize(pixels, (size, size), interpolation=interpolation)
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize(
    "size,quality,interpolation",
    [(64, 95, cv2.INTER_AREA), (64, 50, cv2.INTER_AREA), (256, 75, cv2.INTER_LANCZOS4), (100, 90, cv2.INTER_CUBIC)],
)
def test_a_url_image_decodes_to_its_url_after_resize_and_jpeg(fmt, size, quality, interpolation):
    for url in ("http://127.0.0.2:8080/a.png", "http://127.0.0.2:8080/a.png?x=1", "http://h/é"):
        stored = pipeline_like(url_image(url, fmt), size, quality, interpolation)
        assert decode_url_bits(stored) == url_bits(url)


def test_a_foreign_image_is_not_read_as_a_url_image():
    assert decode_url_bits(jpeg_bytes(64, 64, seed=3)) is None
    assert decode_url_bits(jpeg_bytes(96, 64, seed=3)) is None  # not square
    grey = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey, "PNG")
    assert decode_url_bits(grey.getvalue()) is None


def test_identity_problems_name_whose_image_a_row_holds():
    a, b = "http://127.0.0.2/a", "http://127.0.0.2/b"
    assert url_bits(a) != url_bits(b)
    rows = [
        {"url": a, "caption": "row a", "jpg": pipeline_like(url_image(a), 64, 95, cv2.INTER_AREA)},
        {"url": b, "caption": "row b", "jpg": pipeline_like(url_image(a), 64, 95, cv2.INTER_AREA)},
        {"url": a, "caption": "row c", "jpg": jpeg_bytes(64, 64)},
    ]
    problems = identity_problems(rows, {url_bits(a): "row 'row a'"})
    assert problems == [
        f"row 'row b' ({b}) is stored with the image of row 'row a'",
        f"row 'row c' ({a}) is stored with an image that is not a URL image",
    ]


def read_until_idle(sock: socket.socket, quiet_s: float = 0.3) -> bytes:
    sock.settimeout(quiet_s)
    data = b""
    while True:
        try:
            got = sock.recv(65536)
        except socket.timeout:
            return data
        if not got:
            return data
        data += got


def test_server_sends_its_script_exactly_and_keeps_the_connection_alive():
    smuggled = response(200, b"the next one")
    raw = response(200, b"body", [("Content-Length", b"\xb2"), ("X-Note", "\u00b2")], content_length=None) + smuggled
    with HostileServer(
        {
            "/raw": raw,
            "/moody": lambda ex: response(404 if ex.method == "HEAD" else 200, ex.method.encode()),
            "/hop": redirect("/raw"),
        },
        host="127.0.0.3",
    ) as server:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"GET /raw HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until_idle(sock) == raw
            assert b"Content-Length: \xb2\r\nX-Note: \xc2\xb2\r\n" in raw  # bytes as given, str as UTF-8
            sock.sendall(b"HEAD /moody HTTP/1.1\r\nHost: x\r\n\r\nGET /moody?q HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until_idle(sock) == response(404, b"HEAD") + response(200, b"GET")
            sock.sendall(b"GET /nothing HTTP/1.1\r\n\r\n")
            assert read_until_idle(sock).startswith(b"HTTP/1.1 404 ")
        seen = server.exchanges()
        assert [(e.method, e.target, e.connection, e.index) for e in seen] == [
            ("GET", "/raw", 0, 0),
            ("HEAD", "/moody", 0, 1),
            ("GET", "/moody?q", 0, 2),
            ("GET", "/nothing", 0, 3),
        ]
        assert server.exchanges("/moody")[1].headers == {"host": "x"}
        assert server.url("/hop") == f"http://127.0.0.3:{server.port}/hop"


def test_server_records_when_a_client_hangs_up_in_a_pause():
    with HostileServer({"/slow": [Pause(30), Send(b"never")]}) as server:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
            time.sleep(0.3)
        hung_up = time.monotonic()
        for _ in range(100):
            if server.exchanges("/slow")[0].ended is not None:
                break
            time.sleep(0.02)
        (exchange,) = server.exchanges("/slow")
        assert exchange.aborted
        assert exchange.ended - hung_up < 0.5


def test_server_refuses_a_non_loopback_address():
    with pytest.raises(ValueError, match="127.0.0.0/8"):
        HostileServer({}, host="10.0.0.1")


def test_body_builders_decode_to_what_they_wrap():
    body = bytes(range(256)) * 40
    framed = chunked(body, size=1000)
    assert framed.startswith(b"3e8\r\n") and framed.endswith(b"\r\n0\r\n\r\n")
    parts, rest = [], framed
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        parts.append(rest[:size])
        rest = rest[size + 2 :]
    assert b"".join(parts) == body
    assert zlib.decompress(gzip_bytes(body), 31) == body
    bomb = gzip_bomb(64)
    assert len(bomb) < 128 * 1024
    inflated = zlib.decompressobj(31)
    total = 0
    data = inflated.decompress(bomb, 1 << 20)
    while data:
        assert not any(data)
        total += len(data)
        data = inflated.decompress(inflated.unconsumed_tail, 1 << 20)
    assert total == 64 << 20 and inflated.eof  # the gzip trailer's CRC and length were checked
